"""Images in, tensors out: finding and checking images, the persisted stratified split, the
built-in digits dataset, image transforms, and the on-disk cache of the frozen trunk's output."""
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from backbone import IMAGENET_MEAN, IMAGENET_STD
from common import PipelineError, atomic_path, num_workers, save_csv, sha256_file

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
SUBSETS = ("train", "val", "test")


# ---- the built-in dataset ------------------------------------------------------------------------

def export_digits(folder: Path) -> None:
    """Write scikit-learn's bundled handwritten digits (1,797 images, 8x8) as PNG files, once."""
    from sklearn.datasets import load_digits
    folder = Path(folder)
    if (folder / "COMPLETE").is_file():
        return
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, target) in enumerate(zip(pixels, digits.target)):
        class_dir = folder / str(target)
        class_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(class_dir / f"digit_{i:04d}.png") as tmp:
            Image.fromarray(image, mode="L").save(tmp, format="PNG")
    (folder / "COMPLETE").write_text("scikit-learn load_digits, exported by dataloader.py\n")


def data_dir(cfg) -> Path:
    """The image folder: DATA_DIR, or the built-in digits (exported on first use)."""
    if cfg.DATA_DIR is None:
        export_digits(Path(cfg.BUILTIN_DATA_DIR))
        return Path(cfg.BUILTIN_DATA_DIR).resolve()
    folder = Path(cfg.DATA_DIR).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"DATA_DIR={str(cfg.DATA_DIR)!r} is not a folder; set DATA_DIR in configfile.py")
    return folder.resolve()


# ---- finding images ------------------------------------------------------------------------------

def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def list_class_images(root: Path) -> dict[str, list[str]]:
    """{class folder: sorted relative paths of its image files}, hidden files and folders ignored."""
    classes = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
        files = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                      if not is_hidden(f) and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        classes[class_dir.name] = sorted(files)
    return classes


def check_classes(found: dict[str, list[str]], seen: list[str], unseen: list[str], root: Path) -> None:
    """Every configured class must be a sub-folder with images, and in one list only."""
    both = sorted(set(seen) & set(unseen))
    if both:
        raise PipelineError(f"{both} listed in both SEEN_CLASSES and UNSEEN_CLASSES; a class is one or the other")
    if len(seen) < 2:
        raise PipelineError("SEEN_CLASSES needs at least two classes to train a classifier")
    for name in list(seen) + list(unseen):
        if name not in found:
            existing = ", ".join(f"{c} ({len(f)})" for c, f in found.items()) or "none"
            raise PipelineError(f"class {name!r} is not a sub-folder of {root}; sub-folders (images): {existing}")
        if not found[name]:
            raise PipelineError(f"class folder {root / name} holds no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")


def print_class_counts(title: str, classes: list[str], counts: dict[str, int]) -> None:
    total = sum(counts[c] for c in classes)
    print(f"{title}:")
    for c in classes:
        print(f"  {c}: {counts[c]} images ({100.0 * counts[c] / total:.2f}%)")
    print(f"  total: {total} images")


# ---- decoding ------------------------------------------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    16-bit and float images are scaled to 8 bits (Pillow's convert would clip them); transparent
    images are composited onto white; CMYK, palette and grayscale go through Pillow's conversion."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                scale = 255.0 / 65535.0 if img.mode != "F" and array.max() > 255 else 1.0
                if img.mode == "F":
                    lo, hi = float(array.min()), float(array.max())
                    array, scale = array - lo, 255.0 / (hi - lo) if hi > lo else 0.0
                return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8)).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")


def scan_images(root: Path, relpaths: list[str], cache_file: Path) -> dict[str, str]:
    """Decode every image once; return {relative path: reason} for the ones that cannot be used.

    The result is cached by (path, size, modification time), so a second run decodes nothing."""
    cached = {}
    if cache_file.is_file():
        old = pd.read_csv(cache_file, dtype={"relpath": str, "reason": str}, keep_default_na=False)
        cached = {(r.relpath, r.size, r.mtime_ns): r.reason for r in old.itertuples()}
    rows, todo = [], []
    for rel in relpaths:
        st = os.stat(root / rel)
        key = (rel, st.st_size, st.st_mtime_ns)
        (rows.append(key + (cached[key],)) if key in cached else todo.append(key))
    for key in tqdm(todo, desc="checking images", disable=None if len(todo) >= 200 else True):
        rows.append(key + (_why_unusable(root / key[0], key[1]),))
    if todo or len(rows) != len(cached):
        save_csv(pd.DataFrame(rows, columns=["relpath", "size", "mtime_ns", "reason"]), cache_file, index=False)
    return {rel: reason for rel, _, _, reason in rows if reason}


def _why_unusable(path: Path, size: int) -> str:
    if size == 0:
        return "empty file (0 bytes)"
    try:
        load_rgb(path)
        return ""
    except Image.DecompressionBombWarning as err:
        return f"too large (decompression-bomb limit): {err}"
    except Exception as err:  # truncated, not an image, unsupported
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"


# ---- the split -----------------------------------------------------------------------------------

def draw_split(seen: dict[str, list[str]], unseen: dict[str, list[str]], cfg) -> pd.DataFrame:
    """Split each seen class into train/val/test by the configured fractions (stratified)."""
    rng = np.random.default_rng(cfg.SEED)
    rows = []
    for class_name, files in seen.items():
        n = len(files)
        if n < 3:
            raise PipelineError(f"class {class_name!r} has {n} usable image(s); a seen class needs at least 3 "
                                f"(one each for train, validation and test)")
        n_test = max(1, int(round(cfg.TEST_FRACTION * n)))
        n_val = max(1, int(round(cfg.VAL_FRACTION * n)))
        if n - n_test - n_val < 1:
            n_test, n_val = 1, 1
        order = rng.permutation(n)
        subset = np.array(["train"] * n, dtype=object)
        subset[order[:n_test]] = "test"
        subset[order[n_test:n_test + n_val]] = "val"
        rows += [(f, class_name, s) for f, s in zip(files, subset)]
    for class_name, files in unseen.items():
        rows += [(f, class_name, "unseen") for f in files]
    return pd.DataFrame(rows, columns=["relpath", "class_name", "subset"])


@dataclass
class Split:
    root: Path
    table: pd.DataFrame  # relpath, class_name, subset
    seen_classes: list[str]
    unseen_classes: list[str]
    sha256: str

    def subset(self, name: str) -> tuple[list[str], np.ndarray]:
        """Relative paths and label indices of train/val/test (seen) or unseen."""
        part = self.table[self.table.subset == name]
        classes = self.unseen_classes if name == "unseen" else self.seen_classes
        index = {c: i for i, c in enumerate(classes)}
        return list(part.relpath), np.array([index[c] for c in part.class_name], dtype=np.int64)


def prepare_split(cfg, paths, create: bool) -> Split:
    """Find and check the images, then draw the split (create=True) or verify the persisted one.

    A split that no longer matches the usable images on disk stops the run: re-drawing it
    silently could move test images into training."""
    root = data_dir(cfg)
    seen_names, unseen_names = list(cfg.SEEN_CLASSES), list(cfg.UNSEEN_CLASSES)
    found = list_class_images(root)
    check_classes(found, seen_names, unseen_names, root)
    wanted = [f for c in seen_names + unseen_names for f in found[c]]
    bad = scan_images(root, wanted, paths.cache / f"scan_{_short_hash(str(root))}.csv")
    if bad:
        report = pd.DataFrame(sorted(bad.items()), columns=["relpath", "reason"])
        save_csv(report, paths.bad_images, index=False)
        if cfg.BAD_IMAGES == "error":
            raise PipelineError(f"{len(bad)} unreadable image(s), listed in {paths.bad_images} "
                                f"(BAD_IMAGES='error'); remove or fix them")
        print(f"warning: {len(bad)} unreadable image(s) left out; see {paths.bad_images}", file=sys.stderr)
    usable = {c: [f for f in found[c] if f not in bad] for c in seen_names + unseen_names}
    for c, files in usable.items():
        if not files:
            raise PipelineError(f"class {c!r} has no readable images (see {paths.bad_images})")
    if create:  # train.py reports the data; later scripts only check it
        print_class_counts("Seen classes", seen_names, {c: len(usable[c]) for c in seen_names})
        print_class_counts("Unseen classes", unseen_names, {c: len(usable[c]) for c in unseen_names})

    if paths.split.is_file():
        table = pd.read_csv(paths.split, dtype=str, keep_default_na=False)
        _check_split_matches(table, usable, seen_names, unseen_names, paths.split)
    elif not create:
        raise PipelineError(f"no split file at {paths.split} — run train.py first")
    else:
        table = draw_split({c: usable[c] for c in seen_names}, {c: usable[c] for c in unseen_names}, cfg)
        save_csv(table, paths.split, index=False)
        print(f"split drawn and saved to {paths.split}")
    counts = table.subset.value_counts()
    print("split: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SUBSETS + ("unseen",)) + " images")
    return Split(root, table, seen_names, unseen_names, sha256_file(paths.split))


def _check_split_matches(table, usable, seen_names, unseen_names, split_path) -> None:
    fix = (f"set OUTPUT_DIR and CHECKPOINT_DIR to new folders for a new run, or delete {split_path} "
           f"and checkpoints to re-split and retrain")
    split_seen = list(dict.fromkeys(table.class_name[table.subset != "unseen"]))
    split_unseen = list(dict.fromkeys(table.class_name[table.subset == "unseen"]))
    if split_seen != seen_names or split_unseen != unseen_names:
        raise PipelineError(f"{split_path} was drawn for seen {split_seen} / unseen {split_unseen}, "
                            f"but the settings now say {seen_names} / {unseen_names}; {fix}")
    on_disk = {f for files in usable.values() for f in files}
    in_split = set(table.relpath)
    added, removed = on_disk - in_split, in_split - on_disk
    if added or removed:
        example = sorted(added or removed)[0]
        raise PipelineError(f"the images changed since {split_path} was drawn ({len(added)} added, "
                            f"{len(removed)} removed or unreadable, e.g. {example}); {fix}")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- transforms and datasets ---------------------------------------------------------------------

def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """"stretch" to size x size, or "pad" to a square with the border's median colour first."""
    if mode == "pad":
        w, h = img.size
        side = max(w, h)
        array = np.asarray(img)
        border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
        fill = tuple(int(v) for v in np.median(border, axis=0))
        square = Image.new("RGB", (side, side), fill)
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    elif mode != "stretch":
        raise PipelineError(f"RESIZE_MODE={mode!r}; use 'stretch' or 'pad'")
    return img.resize((size, size), Image.BILINEAR)


class ImageDataset(Dataset):
    """(normalised image tensor, label) for a list of relative paths."""

    def __init__(self, root: Path, relpaths: list[str], labels, image_size: int, resize_mode: str,
                 augment: bool = False):
        self.root, self.relpaths = Path(root), list(relpaths)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.image_size, self.resize_mode, self.augment = image_size, resize_mode, augment
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)  # what the trunk's weights expect
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int):
        img = resize(load_rgb(self.root / self.relpaths[i]), self.image_size, self.resize_mode)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        if self.augment:  # plankton have no up or down: flips and quarter turns keep the class
            if torch.rand(()) < 0.5:
                x = x.flip(2)
            x = torch.rot90(x, int(torch.randint(4, ())), dims=(1, 2))
        return (x - self.mean) / self.std, self.labels[i]


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in DataLoader workers from torch's per-worker seed."""
    import random
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_loader(dataset: Dataset, batch_size: int, workers: int, device: torch.device,
                 batch_sampler=None, seed: int = 0) -> DataLoader:
    """A DataLoader that keeps the order given (or the dataset's), seeded and pinned on CUDA."""
    kwargs = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(batch_size=batch_size)
    return DataLoader(dataset, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=False, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


# ---- the frozen trunk's output, computed once per image ------------------------------------------

def trunk_cache_key(trunk_sha256: str, root: Path, image_size: int, resize_mode: str, dtype: str) -> str:
    """Anything that changes the trunk's output for an image changes the cache folder."""
    spec = dict(trunk=trunk_sha256, root=str(root), size=image_size, resize=resize_mode, dtype=dtype, v=1)
    return _short_hash(json.dumps(spec, sort_keys=True))


def trunk_features(trunk: torch.nn.Module, trunk_sha256: str, root: Path, relpaths: list[str], cfg,
                   cache_dir: Path, device: torch.device) -> np.ndarray:
    """The trunk's output for each image (N x 64 x S/8 x S/8), from the disk cache where possible.

    Entries are keyed by relative path, size and modification time, so an edited image is
    recomputed; the folder is keyed by trunk weights, image size, resize mode and dtype."""
    folder = cache_dir / ("trunk_" + trunk_cache_key(trunk_sha256, root, cfg.IMAGE_SIZE, cfg.RESIZE_MODE,
                                                     cfg.CACHE_DTYPE))
    folder.mkdir(parents=True, exist_ok=True)
    index_file, array_file = folder / "index.csv", folder / "features.npy"
    keys = [_file_key(root, rel) for rel in relpaths]
    have = {}
    if index_file.is_file() and array_file.is_file():
        old_index = pd.read_csv(index_file, dtype={"key": str}, keep_default_na=False)
        have = dict(zip(old_index.key, old_index.row))
    missing = [i for i, k in enumerate(keys) if k not in have]
    if missing:
        old = np.load(array_file, mmap_mode="r") if have else None
        new = compute_trunk_features(trunk, root, [relpaths[i] for i in missing], cfg, device)
        kept_keys = list(have)  # keep entries of other images too (the unseen classes, say)
        merged_keys = kept_keys + [keys[i] for i in missing]
        with atomic_path(array_file) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=new.dtype, shape=(len(merged_keys),) + new.shape[1:])
            for start in range(0, len(kept_keys), 4096):
                rows = [have[k] for k in kept_keys[start:start + 4096]]
                out[start:start + len(rows)] = old[rows]
            out[len(kept_keys):] = new
            out.flush()
            del out
        del old
        # the old index still fits the new array's first rows, so a kill between the two writes is harmless
        save_csv(pd.DataFrame({"key": merged_keys, "row": np.arange(len(merged_keys))}), index_file, index=False)
        have = dict(zip(merged_keys, range(len(merged_keys))))
    features = np.load(array_file, mmap_mode="r")
    return features[[have[k] for k in keys]]


def _file_key(root: Path, rel: str) -> str:
    st = os.stat(root / rel)
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


@torch.inference_mode()
def compute_trunk_features(trunk: torch.nn.Module, root: Path, relpaths: list[str], cfg,
                           device: torch.device) -> np.ndarray:
    dataset = ImageDataset(root, relpaths, np.zeros(len(relpaths)), cfg.IMAGE_SIZE, cfg.RESIZE_MODE)
    loader = image_loader(dataset, cfg.BATCH_SIZE, num_workers(cfg.NUM_WORKERS), device, seed=cfg.SEED)
    dtype = np.float16 if cfg.CACHE_DTYPE == "float16" else np.float32
    chunks = []
    for images, _ in tqdm(loader, desc="trunk features", unit="batch", leave=False, disable=None):
        chunks.append(run_trunk(trunk, images, device, cfg).cpu().numpy().astype(dtype))
    return np.concatenate(chunks)


def run_trunk(trunk: torch.nn.Module, images: torch.Tensor, device: torch.device, cfg) -> torch.Tensor:
    """The trunk on one batch: channels-last, bfloat16 autocast on CUDA only, float32 out."""
    images = images.to(device, non_blocking=True)
    if cfg.CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    use_amp = bool(cfg.MIXED_PRECISION) and device.type == "cuda"
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
        return trunk(images).float()


# ---- one subset's trunk features, cached or streamed ---------------------------------------------

@dataclass
class FeatureSource:
    """A subset's trunk features: an in-memory array from the cache, or images run through the trunk."""
    labels: torch.Tensor
    features: np.ndarray | None = None
    dataset: ImageDataset | None = None

    def __len__(self) -> int:
        return len(self.labels)


def feature_source(split: Split, subset: str, trunk, trunk_sha256: str, cfg, cache_dir: Path,
                   device: torch.device, use_cache: bool, augment: bool = False) -> FeatureSource:
    relpaths, labels = split.subset(subset)
    labels = torch.as_tensor(labels)
    if use_cache:
        features = trunk_features(trunk, trunk_sha256, split.root, relpaths, cfg, cache_dir, device)
        return FeatureSource(labels, features=features)
    return FeatureSource(labels, dataset=ImageDataset(split.root, relpaths, labels, cfg.IMAGE_SIZE,
                                                      cfg.RESIZE_MODE, augment=augment))


def feature_batches(source: FeatureSource, batches: list, trunk, device: torch.device, cfg, seed: int = 0):
    """Yield (trunk features, labels) on `device` for each list of indices in `batches`.

    `seed` seeds the loader's workers (augmentation); pass a different one each epoch."""
    if source.features is not None:
        for idx in batches:
            idx = np.asarray(idx)
            features = torch.from_numpy(np.ascontiguousarray(source.features[idx]))
            yield features.to(device, non_blocking=True).float(), source.labels[idx].to(device)
        return
    loader = image_loader(source.dataset, cfg.BATCH_SIZE, num_workers(cfg.NUM_WORKERS), device,
                          batch_sampler=batches, seed=seed)
    for images, labels in loader:
        with torch.no_grad():  # closed before the yield: grad mode is global, the caller may train
            features = run_trunk(trunk, images, device, cfg)
        yield features, labels.to(device)


def in_order(n: int, batch_size: int) -> list:
    """Batches of indices 0..n-1 in order (evaluation)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@torch.inference_mode()
def head_outputs(model, source: FeatureSource, device: torch.device, cfg) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of every item of a FeatureSource, in order, model in eval mode."""
    model.eval()
    logits, embeddings = [], []
    for features, _ in feature_batches(source, in_order(len(source), cfg.BATCH_SIZE), model.trunk, device, cfg):
        out, emb = model.forward_head(features)
        logits.append(out.float().cpu().numpy())
        embeddings.append(emb.float().cpu().numpy())
    return np.concatenate(logits), np.concatenate(embeddings)


def open_trained_model(cfg, paths, device: torch.device):
    """(checkpoint, split, model) for the scripts after train.py, with every consistency check:
    the checkpoint exists and loads safely, the split still matches the images, and both belong
    to the current settings."""
    from backbone import model_from_checkpoint
    from common import check_checkpoint_matches, load_checkpoint
    checkpoint = load_checkpoint(paths.best)
    split = prepare_split(cfg, paths, create=False)
    check_checkpoint_matches(checkpoint, cfg, split.sha256, paths.best)
    return checkpoint, split, model_from_checkpoint(checkpoint, device, cfg.CHANNELS_LAST)
