"""SHA-256 fingerprints: of a file (cached per process by inode, size and times), of a state dict's
tensors (independent of how it was stored) and of a record of tensors and plain values (a model bundle)."""
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import torch


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(state_dict: dict) -> str:
    """A hash of a state dict's names and values, independent of how it was stored."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def record_sha256(record) -> str:
    """A hash of nested dicts and lists of tensors and plain JSON values (str, int, float, bool, None;
    inf and NaN too), independent of how they were stored: dict keys in sorted order, each tensor by
    its dtype, shape and values. Anything else is a TypeError (a programming error)."""
    digest = hashlib.sha256()

    def feed(value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(b"T" + json.dumps([str(value.dtype), list(value.shape)]).encode())
            digest.update(tensors_sha256({"": value}).encode())
        elif isinstance(value, dict):
            digest.update(b"D%d" % len(value))
            for key in sorted(value):
                if not isinstance(key, str):
                    raise TypeError(f"record_sha256: a {type(key).__name__} key")
                digest.update(json.dumps(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(b"L%d" % len(value))
            for item in value:
                feed(item)
        elif value is None or isinstance(value, (str, int, float, bool)):
            digest.update(b"V" + json.dumps(value).encode())
        else:
            raise TypeError(f"record_sha256: a {type(value).__name__} value")
    feed(record)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, inode, size, modification times)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256_file(Path(path))
