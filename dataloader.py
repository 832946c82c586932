"""Tensors for the model: how an image becomes the trunk's input (Preprocess), how batches are
loaded and run through the trunk (Runtime), and a subset's trunk features, cached or streamed."""
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from plankton import distributed, orientations
from plankton.images import load_rgb, resize
from plankton.progress import Progress
from plankton.system import num_workers, pick_device


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns an image file into the trunk's input; recorded in the checkpoint."""
    image_size: int
    resize_mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_trunk(cls, trunk: str, image_size: int, resize_mode: str) -> "Preprocess":
        """The normalisation the trunk's pretrained weights expect."""
        import backbone
        mean, std = backbone.normalization(trunk)
        return cls(int(image_size), resize_mode, tuple(mean), tuple(std))


@dataclass(frozen=True)
class Runtime:
    """How the model runs: where, in what batches, with which speed options."""
    device: torch.device
    batch_size: int
    workers: int
    channels_last: bool
    mixed_precision: bool


def runtime_from_settings(cfg) -> Runtime:
    """The device chosen once (CUDA if present, else CPU; under torchrun cuda:LOCAL_RANK), and the speed settings."""
    return Runtime(distributed.local_device(pick_device(cfg.DEVICE)), int(cfg.BATCH_SIZE), num_workers(cfg.NUM_WORKERS),
                   bool(cfg.CHANNELS_LAST), bool(cfg.MIXED_PRECISION))


# ---- images to tensors ---------------------------------------------------------------------------

class ImageDataset(Dataset):
    """(normalised image tensor, label) for a list of relative paths."""

    def __init__(self, root: Path, relpaths: list[str], labels, preprocess: Preprocess, augment: bool = False,
                 color_jitter: float = 0.0, orientation: int = 0):
        self.root, self.relpaths, self.orientation = Path(root), list(relpaths), int(orientation)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        self.preprocess, self.augment = preprocess, augment
        self.jitter = None  # brightness, contrast and saturation, each by a random factor in [1 - s, 1 + s]
        if augment and color_jitter > 0:
            from torchvision.transforms import ColorJitter
            self.jitter = ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
        self.mean = torch.tensor(preprocess.mean).view(3, 1, 1)  # what the trunk's weights expect
        self.std = torch.tensor(preprocess.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.relpaths)

    def pixels(self, i: int) -> torch.Tensor:
        """Image i decoded and resized: uint8, 3 x size x size."""
        img = resize(load_rgb(self.root / self.relpaths[i]), self.preprocess.image_size, self.preprocess.resize_mode)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return orientations.orient(x, self.orientation) if self.orientation else x  # TTA (plankton/orientations.py)

    def __getitem__(self, i: int):
        if not self.augment:  # in numpy, one thread, bit for bit the torch sums below (tests/test_speed_paths.py)
            return torch.from_numpy(self.normalised(self.pixels(i).numpy())), self.labels[i]
        x = self.pixels(i).float().div_(255.0)  # plankton have no up or down: flips and quarter turns keep the class
        if torch.rand(()) < 0.5:
            x = x.flip(2)
        x = torch.rot90(x, int(torch.randint(4, ())), dims=(1, 2))
        if self.jitter is not None:
            x = self.jitter(x)
        return (x - self.mean) / self.std, self.labels[i]


    def normalised(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 3 x H x W pixels as the trunk's input, float32: (pixels / 255 - mean) / std.

        Why numpy: torch splits an operation on one image (49,152 values at 128 px) over its thread
        pool, and every split waits for each thread to be scheduled; on a loaded machine the four
        sums of one image took 180 ms through torch, 9 ms with the decoding through numpy (docs/speed.md)."""
        mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (self.preprocess.mean, self.preprocess.std))
        return np.ascontiguousarray((pixels.astype(np.float32) / np.float32(255.0) - mean) / std)


def stack_batch(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    """default_collate for (image, label) items, the images stacked by numpy in one thread (see
    ImageDataset.normalised: torch.stack of a batch waited on the thread pool as well)."""
    images = torch.from_numpy(np.ascontiguousarray(np.stack([image.numpy() for image, _ in items])))
    return images, torch.as_tensor(np.array([label.numpy() for _, label in items]))


class DecodedImages(ImageDataset):
    """(uint8 image, label): ImageDataset's items before they become floats, 4x smaller to keep."""

    def __getitem__(self, i: int):
        return self.pixels(i), self.labels[i]


def decode_images(root: Path, relpaths: list[str], preprocess: Preprocess, runtime: "Runtime") -> torch.Tensor:
    """Every image decoded and resized once (on the loader's workers), uint8, N x 3 x size x size: for
    a caller that runs several models over the same images (feature_maps.py)."""
    rows = Rows(len(relpaths), np.uint8)
    for pixels, _ in image_loader(DecodedImages(root, relpaths, np.zeros(len(relpaths)), preprocess), runtime):
        rows.add(pixels)
    return torch.from_numpy(rows.result()) if relpaths else torch.zeros((0, 3) + (preprocess.image_size,) * 2,
                                                                         dtype=torch.uint8)


def normalise(pixels: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """uint8 images (N x 3 x H x W) as the trunk's input: exactly what ImageDataset gives un-augmented."""
    mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
    return (pixels.float().div_(255.0) - mean) / std


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in DataLoader workers from torch's per-worker seed."""
    import random
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_loader(dataset: Dataset, runtime: Runtime, batch_sampler=None, seed: int = 0) -> DataLoader:
    """A DataLoader that keeps the order given (or the dataset's), seeded and pinned on CUDA."""
    kwargs = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(batch_size=runtime.batch_size)
    return DataLoader(dataset, num_workers=runtime.workers, pin_memory=runtime.device.type == "cuda",
                      persistent_workers=False, worker_init_fn=seed_worker, collate_fn=stack_batch,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def run_trunk(trunk: torch.nn.Module, images: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """The trunk on one batch: channels-last, bfloat16 autocast on CUDA only, float32 out."""
    images = images.to(runtime.device, non_blocking=True)
    if runtime.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    use_amp = runtime.mixed_precision and runtime.device.type == "cuda"
    with torch.autocast(device_type=runtime.device.type, dtype=torch.bfloat16, enabled=use_amp):
        return trunk(images).float()


def trunk_feature_batches(trunk: torch.nn.Module, root: Path, relpaths: list[str], preprocess: Preprocess,
                          runtime: Runtime, dtype=np.float32, orientation: int = 0):
    """Yield the trunk's output batch by batch, in order, decoded and resized on the loader's workers:
    a caller that stores each batch as it comes never holds the whole pass (trunk_cache.py). Each image
    in `orientation` (plankton/orientations.py)."""
    dataset = ImageDataset(root, relpaths, np.zeros(len(relpaths)), preprocess, orientation=orientation)
    for images, _ in Progress(image_loader(dataset, runtime), f"trunk features of {len(relpaths)} images",
                              unit="batches"):
        with torch.inference_mode():  # closed before the yield, like feature_batches' no_grad
            features = run_trunk(trunk, images, runtime).cpu().numpy().astype(dtype)
        yield features


def compute_trunk_features(trunk: torch.nn.Module, root: Path, relpaths: list[str], preprocess: Preprocess,
                           runtime: Runtime, dtype=np.float32) -> np.ndarray:
    """The trunk's output for each image, in order, as one array."""
    rows = Rows(len(relpaths), dtype)
    for features in trunk_feature_batches(trunk, root, relpaths, preprocess, runtime, dtype):
        rows.add(features)
    return rows.result()


class Rows:
    """Per-batch results written into one array of `n` rows, allocated at the first batch.

    Why not a list of batches and one np.concatenate: each kept batch is a small block placed just
    above the big per-batch temporaries that were freed before it, so the next batch's temporaries no
    longer fit the hole and take fresh memory. glibc's heap then grows by about a batch of
    temporaries per batch and keeps it (measured: 0.2 to 1.3 GB, varying from run to run, over the
    22,538 training images of the 50,000-image bench folder, against 12 MB of results; 50 MB with
    one array written in place)."""

    def __init__(self, n: int, dtype=None):
        self.n, self.dtype, self.array, self.filled = int(n), dtype, None, 0

    def add(self, batch) -> None:
        if torch.is_tensor(batch):
            batch = batch.detach().cpu().numpy()
        if self.array is None:
            self.array = np.empty((self.n,) + batch.shape[1:], self.dtype or batch.dtype)
        self.array[self.filled:self.filled + len(batch)] = batch
        self.filled += len(batch)

    def result(self) -> np.ndarray:
        if self.filled != self.n:
            raise RuntimeError(f"{self.filled} rows gathered, {self.n} expected")
        return self.array if self.array is not None else np.zeros((0, 0), self.dtype or np.float32)


# ---- one subset's trunk features, cached or streamed ---------------------------------------------

class FeatureRows(Protocol):
    """Rows of trunk features gathered on demand: an np.ndarray, or trunk_cache.FeatureStore (rows
    read from the chunk files as asked, so a subset of a million images is never loaded whole)."""
    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, indices) -> np.ndarray: ...


@dataclass
class FeatureSource:
    """A subset's trunk features: rows from the cache, or images run through the trunk."""
    labels: torch.Tensor
    features: FeatureRows | None = None
    dataset: ImageDataset | None = None

    def __len__(self) -> int:
        return len(self.labels)


class RowView:
    """Some rows of a feature store or array (`indices`), indexed like one."""

    def __init__(self, rows, indices: np.ndarray):
        self.rows, self.indices = rows, np.asarray(indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices),) + tuple(self.rows.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, idx) -> np.ndarray:
        return self.rows[self.indices[np.asarray(idx)]]


def sample_source(source: FeatureSource, limit: int, seed: int) -> FeatureSource:
    """The source itself, or a fixed random sample of `limit` of its items (sorted, so reads stay in order)."""
    if len(source) <= limit:
        return source
    return select_rows(source, np.sort(np.random.default_rng(seed).choice(len(source), size=limit, replace=False)))


def select_rows(source: FeatureSource, picked: np.ndarray) -> FeatureSource:
    """The items `picked` (indices, in that order) of a source, as a source."""
    picked = np.asarray(picked, dtype=np.int64)
    if source.features is not None:
        return FeatureSource(source.labels[picked], features=RowView(source.features, picked))
    return FeatureSource(source.labels[picked], dataset=torch.utils.data.Subset(source.dataset, picked.tolist()))


def feature_source(root: Path, relpaths: list[str], labels, preprocess: Preprocess, cache=None,
                   augment: bool = False, keys: list[str] | None = None, color_jitter: float = 0.0,
                   orientation: int = 0) -> FeatureSource:
    """Features from `cache` (a trunk_cache.TrunkCache) when one is given, else from the images
    (flipped, turned and colour-jittered by `color_jitter` when `augment`), each image in `orientation`
    (test-time augmentation, plankton/orientations.py).
    `keys` (one string per image, e.g. its content's SHA-256) name the images in the cache; without
    them the cache keys each image by relative path, size and modification time."""
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if cache is not None:
        return FeatureSource(labels, features=cache.oriented(orientation).features(root, relpaths, keys))
    return FeatureSource(labels, dataset=ImageDataset(root, relpaths, labels, preprocess, augment=augment,
                                                      color_jitter=color_jitter, orientation=orientation))


def feature_batches(source: FeatureSource, batches: list, trunk, runtime: Runtime, seed: int = 0):
    """Yield (trunk features, labels) on the device for each list of indices in `batches`.

    `seed` seeds the loader's workers (augmentation); pass a different one each epoch."""
    if source.features is not None:
        for idx in batches:
            idx = np.asarray(idx, dtype=np.int64)
            features = torch.from_numpy(np.ascontiguousarray(source.features[idx]))  # this batch's rows only
            yield features.to(runtime.device, non_blocking=True).float(), source.labels[idx].to(runtime.device)
        return
    for images, labels in image_loader(source.dataset, runtime, batch_sampler=batches, seed=seed):
        with torch.no_grad():  # closed before the yield: grad mode is global, the caller may train
            features = run_trunk(trunk, images, runtime)
        yield features, labels.to(runtime.device)


def in_order(n: int, batch_size: int) -> list:
    """Batches of indices 0..n-1 in order (evaluation)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
