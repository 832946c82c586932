"""The on-disk cache of the frozen trunk's output: computed once per image, reused by training,
evaluation and embedding.

    cache/trunk_<key>/features.npy   N x C x H x W (float16 or float32), memory-mapped when read
    cache/trunk_<key>/index.csv      key (relative path | size | modification time), row

The folder's key covers everything that changes the trunk's output for an image (weights, image
size, resize mode, normalisation, dtype, data folder); an entry's key covers the file itself."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import atomic_path, save_csv
from dataloader import Preprocess, Runtime, compute_trunk_features

DTYPES = {"float16": np.float16, "float32": np.float32}


def cache_key(trunk_sha256: str, root: Path, preprocess: Preprocess, dtype: str) -> str:
    """Anything that changes the trunk's output for an image changes the cache folder."""
    spec = dict(trunk=trunk_sha256, root=str(root), size=preprocess.image_size, resize=preprocess.resize_mode,
                mean=list(preprocess.mean), std=list(preprocess.std), dtype=dtype, v=2)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class TrunkCache:
    """The cached trunk features of one trunk, preprocessing and dtype, for any data folder."""

    def __init__(self, cache_dir: Path, trunk: torch.nn.Module, trunk_sha256: str, preprocess: Preprocess,
                 runtime: Runtime, dtype: str = "float16"):
        self.cache_dir, self.trunk, self.trunk_sha256 = Path(cache_dir), trunk, trunk_sha256
        self.preprocess, self.runtime, self.dtype = preprocess, runtime, dtype

    def folder(self, root: Path) -> Path:
        return self.cache_dir / ("trunk_" + cache_key(self.trunk_sha256, root, self.preprocess, self.dtype))

    def features(self, root: Path, relpaths: list[str]) -> np.ndarray:
        """The trunk's output for each image (N x C x H x W), computing only what is missing.

        Entries are keyed by relative path, size and modification time, so an edited image is
        recomputed."""
        folder = self.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        index_file, array_file = folder / "index.csv", folder / "features.npy"
        keys = [_file_key(root, rel) for rel in relpaths]
        have = {}
        if index_file.is_file() and array_file.is_file():
            old_index = pd.read_csv(index_file, dtype={"key": str}, keep_default_na=False)
            have = dict(zip(old_index.key, old_index.row))
        missing = [i for i, k in enumerate(keys) if k not in have]
        if missing:
            new = compute_trunk_features(self.trunk, root, [relpaths[i] for i in missing], self.preprocess,
                                         self.runtime, DTYPES[self.dtype])
            have = _append(array_file, index_file, have, [keys[i] for i in missing], new)
        features = np.load(array_file, mmap_mode="r")
        return features[[have[k] for k in keys]]


def _append(array_file: Path, index_file: Path, have: dict, new_keys: list[str], new: np.ndarray) -> dict:
    """Rewrite the array with the new rows after the old ones (other images' rows are kept, the
    unseen classes' say), then the index. The old index still fits the new array's first rows, so
    a kill between the two writes is harmless."""
    old = np.load(array_file, mmap_mode="r") if have else None
    kept_keys = list(have)
    merged_keys = kept_keys + new_keys
    with atomic_path(array_file) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=new.dtype, shape=(len(merged_keys),) + new.shape[1:])
        for start in range(0, len(kept_keys), 4096):
            rows = [have[k] for k in kept_keys[start:start + 4096]]
            out[start:start + len(rows)] = old[rows]
        out[len(kept_keys):] = new
        out.flush()
        del out
    del old
    save_csv(pd.DataFrame({"key": merged_keys, "row": np.arange(len(merged_keys))}), index_file, index=False)
    return dict(zip(merged_keys, range(len(merged_keys))))


def _file_key(root: Path, rel: str) -> str:
    st = os.stat(root / rel)
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


def from_settings(cfg, cache_dir: Path, trunk: torch.nn.Module, trunk_sha256: str, preprocess: Preprocess,
                  runtime: Runtime) -> TrunkCache | None:
    """The cache CACHE_TRUNK and CACHE_DTYPE ask for, or None (every batch through the trunk)."""
    return TrunkCache(cache_dir, trunk, trunk_sha256, preprocess, runtime, cfg.CACHE_DTYPE) if cfg.CACHE_TRUNK else None
