"""Image files: the built-in digits, finding and checking a folder's images, decoding them to RGB,
resizing, and drawing the stratified split. Nothing here knows about models or saved artifacts."""
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common import PipelineError, atomic_path, save_csv

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


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
    (folder / "COMPLETE").write_text("scikit-learn load_digits, exported by images.py\n")


def data_dir(data_dir_setting: str | None, builtin_dir: str) -> Path:
    """The image folder: DATA_DIR, or the built-in digits (exported on first use)."""
    if data_dir_setting is None:
        export_digits(Path(builtin_dir))
        return Path(builtin_dir).resolve()
    folder = Path(data_dir_setting).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"DATA_DIR={str(data_dir_setting)!r} is not a folder; set DATA_DIR in configfile.py")
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


# ---- decoding and resizing -----------------------------------------------------------------------

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


# ---- checking every image once -------------------------------------------------------------------

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


def usable_images(root: Path, seen: list[str], unseen: list[str], scan_cache: Path, bad_report: Path,
                  bad_images: str) -> dict[str, list[str]]:
    """{class: readable images} for every configured class. Unreadable files are listed in
    `bad_report` and left out (bad_images="skip") or stop the run ("error")."""
    found = list_class_images(root)
    check_classes(found, seen, unseen, root)
    wanted = [f for c in seen + unseen for f in found[c]]
    bad = scan_images(root, wanted, scan_cache)
    if bad:
        save_csv(pd.DataFrame(sorted(bad.items()), columns=["relpath", "reason"]), bad_report, index=False)
        if bad_images == "error":
            raise PipelineError(f"{len(bad)} unreadable image(s), listed in {bad_report} "
                                f"(BAD_IMAGES='error'); remove or fix them")
        print(f"warning: {len(bad)} unreadable image(s) left out; see {bad_report}", file=sys.stderr)
    usable = {c: [f for f in found[c] if f not in bad] for c in seen + unseen}
    for c, files in usable.items():
        if not files:
            raise PipelineError(f"class {c!r} has no readable images (see {bad_report})")
    return usable


# ---- the split -----------------------------------------------------------------------------------

def draw_split(seen: dict[str, list[str]], unseen: dict[str, list[str]], val_fraction: float,
               test_fraction: float, seed: int) -> pd.DataFrame:
    """Split each seen class into train/val/test by the given fractions (stratified); the unseen
    classes' images all go to "unseen". Columns: relpath, class_name, subset."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_name, files in seen.items():
        n = len(files)
        if n < 3:
            raise PipelineError(f"class {class_name!r} has {n} usable image(s); a seen class needs at least 3 "
                                f"(one each for train, validation and test)")
        n_test = max(1, int(round(test_fraction * n)))
        n_val = max(1, int(round(val_fraction * n)))
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
