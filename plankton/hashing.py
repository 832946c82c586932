"""SHA-256 fingerprints: of a file (cached per process by inode, size and times), of a state dict's
tensors (independent of how it was stored) and of a record of tensors and plain values (a model bundle);
and ContentMemo, what a process made from a file's bytes, kept while the bytes stay the same."""
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


class ContentMemo:
    """What was made from a file's bytes (parsed and checked), kept for the file's last version:
    run_all.py runs every stage in one process, and each re-read and re-checked split.csv and the
    scan cache. Keyed by the SHA-256 of the bytes read now (not by the file's times, which a write
    in the same clock tick can leave as they were) and by the other inputs the result depends on,
    compared by value, so a changed file or input is made again: never a stale result. One entry,
    so memory stays that of one result. Callers that hand out something changeable hand out a copy."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, path: Path, make, inputs: tuple = ()) -> tuple[object, str]:
        """(make(bytes), SHA-256 of the bytes): make's result for the same bytes and inputs, else
        make(bytes) now (an exception it raises is not kept). OSError from reading propagates."""
        data = Path(path).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        key = (str(Path(path).resolve()), digest, inputs)
        if self._key is not None and self._key == key:
            return self._value, digest
        self._key, self._value = None, None  # the old result is not kept beside the new one
        value = make(data)
        self._key, self._value = key, value
        return value, digest
