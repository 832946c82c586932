"""The on-disk cache of the frozen trunk's output: computed once per image, reused by training,
evaluation and embedding. With FINETUNE_BLOCKS > 0 the trunk it runs is the frozen blocks before the
fine-tuned ones (the model's `trunk`), and its hash (backbone.frozen_trunk_sha256) names that cut.

    cache/trunk_<key>/chunk-<unique>.npy    n x C x H x W (float16 or float32), rows read as asked
    cache/trunk_<key>/chunk-<unique>.keys   the n images' keys, one a line, in the array's row order
    cache/trunk_<key>/lock                  held (flock) by the run that is filling the folder

The folder's key covers everything that changes the trunk's output for an image (weights and cut, image
size, resize mode, normalisation, dtype, data folder); an image's key covers the image itself: its
content's SHA-256 when the caller gives one, else its relative path, size and modification time.

Append-only: a trunk pass writes a chunk every CHUNK_ROWS images and never rewrites one, each file
moved into place whole (fileio.atomic_path), the array first and its keys file last. So a chunk
without its keys file is a write still under way (or killed) and is not read; a kill loses at most
the chunk in progress; and runs that write at the same time only add chunks, never mix one run's
rows with another's keys. Two chunks may hold the same image (two runs computed it at once): either
one is right. A chunk whose keys do not match its array (torn by a faulty disk or copy) is named in
one warning, never served, and its images are computed again; deleting dead files is fileio.py's
cleanup. The lock only saves a second run from computing what the first is computing: nothing
relies on it, and where the file system has no locks (some NFS mounts) runs simply go without.

Under torchrun (distributed.py) every rank asks for the same images: rank 0's list of the missing
ones is shared out in contiguous blocks, each rank writes its block into chunks of its own (a chunk's
name holds its pid and random digits, so none collide; appends need no lock), rank 0 alone holds the
lock, and after a barrier every rank reads the same folder.

Old-layout folders (features.npy + index.csv, before chunks) are not read: their images are
computed again into chunks, and a note says the old files can be deleted."""
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import secrets
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import dataloader
from dataloader import Preprocess, Runtime
from plankton import distributed
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, open_no_follow

DTYPES = {"float16": np.float16, "float32": np.float32}
CHUNK_ROWS = 2048  # images per chunk file: a kill loses at most this many (64 MB at 128 px, float16)
OPEN_CHUNKS = 64  # chunk files a FeatureStore keeps open at once
IOV_MAX = min(1024, os.sysconf("SC_IOV_MAX")) if "SC_IOV_MAX" in os.sysconf_names else 16  # buffers per preadv

_warned: set[str] = set()  # torn chunks already named on stderr by this process


def cache_key(trunk_sha256: str, root: Path, preprocess: Preprocess, dtype: str, orientation: int = 0) -> str:
    """Anything that changes the trunk's output for an image changes the cache folder."""
    spec = dict(trunk=trunk_sha256, root=str(root), size=preprocess.image_size, resize=preprocess.resize_mode,
                mean=list(preprocess.mean), std=list(preprocess.std), dtype=dtype, v=2)
    if orientation:  # test-time augmentation's turned or mirrored images (the upright ones keep their key)
        spec["orientation"] = int(orientation)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class TrunkCache:
    """The cached trunk features of one trunk, preprocessing and dtype, for any data folder."""

    def __init__(self, cache_dir: Path, trunk: torch.nn.Module, trunk_sha256: str, preprocess: Preprocess,
                 runtime: Runtime, dtype: str = "float16", chunk_rows: int = CHUNK_ROWS, lock: bool = True):
        self.cache_dir, self.trunk, self.trunk_sha256 = Path(cache_dir), trunk, trunk_sha256
        self.preprocess, self.runtime, self.dtype = preprocess, runtime, dtype
        self.chunk_rows, self.lock = int(chunk_rows), lock
        self.orientation = 0  # the images turned or mirrored first (plankton/orientations.py)

    def oriented(self, orientation: int) -> "TrunkCache":
        """The same cache for images in another orientation (a folder of their own)."""
        if orientation == self.orientation:
            return self
        other = copy.copy(self)
        other.orientation = int(orientation)
        return other

    def folder(self, root: Path) -> Path:
        return self.cache_dir / ("trunk_" + cache_key(self.trunk_sha256, root, self.preprocess, self.dtype,
                                                      self.orientation))

    def features(self, root: Path, relpaths: list[str], keys: list[str] | None = None) -> "FeatureStore":
        """The trunk's output for each image (N x C x H x W rows, gathered on demand), computing only
        what no complete chunk holds.

        `keys` name the images (e.g. each file's SHA-256); without them an image's key is its relative
        path, size and modification time, so an edited image is recomputed."""
        root, folder = Path(root), self.folder(root)
        folder.mkdir(parents=True, exist_ok=True)
        keys = [_file_key(root, rel) for rel in relpaths] if keys is None else [str(k) for k in keys]
        if len(keys) != len(relpaths):
            raise ValueError(f"{len(keys)} keys for {len(relpaths)} images")
        if any("\n" in k or not k for k in keys):
            raise ValueError("an image key is empty or holds a line break")
        _note_old_layout(folder)
        found, distinct = _find(folder, keys, DTYPES[self.dtype]), len(set(keys))
        if not distributed.all_true(len(found.where) == distinct):
            with _filling(folder, self.lock and distributed.is_main()):
                found = _find(folder, keys, DTYPES[self.dtype])  # another run may have filled it meanwhile
                todo = distributed.broadcast(_missing(keys, relpaths, found))  # under torchrun: rank 0's list
                if todo:
                    ranks = distributed.world_size()
                    print(f"trunk cache: computing {len(todo)} of {distinct} images into {folder}"
                          + (f", shared out over {ranks} processes" if ranks > 1 else ""))
                    mine = dict(distributed.shard(list(todo.items())))  # each rank its block, its own chunks
                    if mine:
                        self._fill(root, folder, mine)
                distributed.barrier()  # every rank's chunks are in place before any rank reads
                found = _find(folder, keys, DTYPES[self.dtype])
        missing = [k for k in keys if k not in found.where]
        if missing:  # only a chunk torn the moment after it was written gets here
            raise RuntimeError(f"{folder}: {len(missing)} images still missing after the trunk pass, "
                               f"e.g. {missing[0]!r}")
        return found.store(keys)

    def _fill(self, root: Path, folder: Path, todo: dict[str, str]) -> None:
        """Run the trunk on `todo`'s images, writing a chunk every chunk_rows images and at the end."""
        keys, relpaths = list(todo), list(todo.values())
        batches = dataloader.trunk_feature_batches(self.trunk, root, relpaths, self.preprocess, self.runtime,
                                                   DTYPES[self.dtype], self.orientation)
        written, filled, chunk = 0, 0, None  # one chunk's buffer, reused (dataloader.Rows says why)
        for batch in batches:
            if chunk is None or filled + len(batch) > len(chunk):  # the first batch (or an odd, larger one)
                grown = np.empty((self.chunk_rows + len(batch),) + batch.shape[1:], batch.dtype)
                if filled:
                    grown[:filled] = chunk[:filled]
                chunk = grown
            chunk[filled:filled + len(batch)] = batch
            filled += len(batch)
            if filled >= self.chunk_rows:
                written += _write_chunk(folder, keys[written:], chunk[:filled])
                filled = 0
        if filled:
            written += _write_chunk(folder, keys[written:], chunk[:filled])
        assert written == len(keys), (written, len(keys))


def _missing(keys: list[str], relpaths: list[str], found: "_Found") -> dict[str, str]:
    """key -> one image with that key, for the keys no complete chunk holds (identical files share a
    content key), in the images' order."""
    todo = {}
    for key, rel in zip(keys, relpaths):
        if key not in found.where:
            todo.setdefault(key, rel)
    return todo


# ---- chunks on disk ------------------------------------------------------------------------------

def _write_chunk(folder: Path, keys: list[str], features: np.ndarray) -> int:
    """The array, then its keys (one a line): each to a temporary name, synced, moved into place.
    Syncing the array before its keys file exists means even a power cut cannot leave keys that
    point at rows never written. Returns the number of rows written."""
    name = f"chunk-{time.time_ns():016x}-{os.getpid()}-{secrets.token_hex(4)}"
    with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features))
        f.flush()
        os.fsync(f.fileno())
    with atomic_path(folder / f"{name}.keys") as tmp, open(tmp, "wb") as f:
        f.write("".join(k + "\n" for k in keys[:len(features)]).encode())
        f.flush()
        os.fsync(f.fileno())
    return len(features)


def _chunk_keys_files(folder: Path) -> list[Path]:
    """Complete chunks (those with their keys file), newest first: a chunk written again after a torn
    one was found is then read before it, and the torn one is not even opened."""
    return sorted(folder.glob("chunk-*.keys"), reverse=True)


def _check_chunk(keys_file: Path, lines: list[str], dtype) -> tuple[int, tuple] | None:
    """The chunk's array's data offset and shape; None, with one warning, if it and its keys disagree."""
    array_file = keys_file.with_suffix(".npy")
    try:
        with open(array_file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, fortran_order, file_dtype = read_header[version](f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except (OSError, ValueError, KeyError) as err:
        return _torn(keys_file, f"array unreadable: {err}")
    if lines[-1] != "" or len(lines) - 1 != (shape[0] if shape else -1):
        return _torn(keys_file, f"{len(lines) - 1} keys for {shape[0] if shape else 0} rows")
    if len(shape) != 4 or fortran_order or file_dtype != dtype:
        return _torn(keys_file, f"array of shape {shape}, {file_dtype}, expected 4-d {np.dtype(dtype)}")
    if size != offset + int(np.prod(shape)) * file_dtype.itemsize:
        return _torn(keys_file, f"{array_file.name} holds {size} bytes, its header says "
                                f"{offset + int(np.prod(shape)) * file_dtype.itemsize}")
    return offset, tuple(shape)


def _torn(keys_file: Path, reason: str) -> None:
    """Name a torn chunk on stderr, once per process; None, for the caller to return."""
    if str(keys_file) not in _warned:
        _warned.add(str(keys_file))
        print(f"warning: trunk cache chunk {keys_file.with_suffix('')}.{{npy,keys}} is torn ({reason}); "
              f"ignored, its images are computed again", file=sys.stderr)
    return None


class _Found:
    """Where each wanted key is: chunk number and row, over the complete chunks read."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.where: dict[str, tuple[int, int]] = {}
        self.chunks: list[tuple[Path, int, tuple]] = []  # array file, data offset, shape

    def store(self, keys: list[str]) -> "FeatureStore":
        chunk_of = np.array([self.where[k][0] for k in keys], dtype=np.int32)
        row_of = np.array([self.where[k][1] for k in keys], dtype=np.int64)
        row_shape = self.chunks[0][2][1:] if self.chunks else (0, 0, 0)
        return FeatureStore(self.chunks, chunk_of, row_of, row_shape, self.dtype)


def _find(folder: Path, keys: list[str], dtype) -> _Found:
    """Read the keys files of every complete chunk; only the wanted keys are kept (a subset's index
    stays the subset's size however big the cache grows), and only chunks that add one are checked."""
    found, wanted = _Found(dtype), set(keys)
    for keys_file in _chunk_keys_files(folder):
        if len(found.where) == len(wanted):
            break
        try:
            lines = keys_file.read_bytes().decode("utf-8").split("\n")
        except OSError:
            continue  # removed since the listing
        except UnicodeDecodeError as err:
            _torn(keys_file, f"keys unreadable: {err}")
            continue
        if not any(k in wanted and k not in found.where for k in lines):
            continue
        chunk = _check_chunk(keys_file, lines, dtype)
        if chunk is None:
            continue
        chunk_keys, (offset, shape) = lines[:-1], chunk
        if found.chunks and shape[1:] != found.chunks[0][2][1:]:
            _torn(keys_file, f"rows of shape {shape[1:]}, other chunks' are {found.chunks[0][2][1:]}")
            continue
        number = len(found.chunks)
        found.chunks.append((keys_file.with_suffix(".npy"), offset, shape))
        for row, key in enumerate(chunk_keys):
            if key in wanted and key not in found.where:
                found.where[key] = (number, row)
    return found


@contextlib.contextmanager
def _filling(folder: Path, lock: bool):
    """An exclusive flock on <folder>/lock while this run computes and appends, so a second run waits
    and then finds the images instead of computing them too. Correctness never depends on it."""
    if not lock:
        yield
        return
    with os.fdopen(open_no_follow(folder / "lock", os.O_RDONLY), "rb") as f:  # never through a link
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"trunk cache: waiting for another run that is filling {folder}", file=sys.stderr)
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass  # no locks on this file system: the chunks are safe without one
        yield  # closing the file releases the lock; so does the kernel if this process is killed


def _note_old_layout(folder: Path) -> None:
    old = folder / "features.npy"
    if old.is_file() and str(old) not in _warned:
        _warned.add(str(old))
        print(f"note: {old} and index.csv are the trunk cache's old layout, no longer read; "
              f"delete them to free {old.stat().st_size / 1e6:.0f} MB", file=sys.stderr)


def _file_key(root: Path, rel: str) -> str:
    st = os.stat(root / rel)
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


# ---- reading rows --------------------------------------------------------------------------------

class FeatureStore:
    """A subset's cached trunk features, read-only, N x C x H x W: store[indices] gathers just those
    rows from the chunk files, in the order asked. Nothing holds the whole subset.

    Rows are read with pread into the output array, not through memory maps: a mapped page read
    once stays in the process's resident memory until the map closes, so reading a 50,000-image
    cache through maps added its 1.6 GB to the process's peak; read this way it stays in the kernel's
    page cache (fast the second time, dropped when memory is short) and the process holds only the
    batch. Consecutive rows of a chunk are read in one call."""

    def __init__(self, chunks: list[tuple[Path, int, tuple]], chunk_of: np.ndarray, row_of: np.ndarray,
                 row_shape: tuple, dtype):
        self.chunks, self.chunk_of, self.row_of, self.dtype = chunks, chunk_of, row_of, np.dtype(dtype)
        self.shape = (len(chunk_of),) + tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._open: OrderedDict[int, int] = OrderedDict()  # chunk number -> open file descriptor, most recent last

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> np.ndarray:
        if isinstance(indices, (int, np.integer)):
            return self[np.array([indices])][0]
        if isinstance(indices, slice):
            indices = np.arange(len(self))[indices]
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1:
            raise IndexError("FeatureStore takes an integer, a slice or a 1-d list of indices")
        indices = np.where(indices < 0, indices + len(self), indices)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        out = np.empty((len(indices),) + self.shape[1:], self.dtype)
        if not len(indices) or not self.row_bytes:
            return out
        chunk, row = self.chunk_of[indices], self.row_of[indices]
        order = np.lexsort((row, chunk))  # by chunk, then by row: each chunk read front to back
        flat = out.reshape(len(out), -1).view(np.uint8)  # one writable byte row per output row
        # a run: rows of one chunk that follow each other on disk (a row asked twice starts a new run)
        starts = np.flatnonzero(np.r_[True, (np.diff(chunk[order]) != 0) | (np.diff(row[order]) != 1)])
        for run in np.split(order, starts[1:]):
            for part in np.array_split(run, -(-len(run) // IOV_MAX)):
                self._read_rows(int(chunk[part[0]]), int(row[part[0]]), [flat[i] for i in part])
        return out

    def _read_rows(self, number: int, first_row: int, buffers: list) -> None:
        """Fill `buffers` (one row each) from consecutive rows of a chunk, starting at first_row."""
        path, offset, _ = self.chunks[number]
        fd, position = self._descriptor(number), offset + first_row * self.row_bytes
        got = os.preadv(fd, buffers, position) if hasattr(os, "preadv") else 0  # no preadv (older macOS): row by row
        for k, buffer in enumerate(buffers):  # a short read (rare on local disks) goes on row by row
            done = min(max(got - k * self.row_bytes, 0), self.row_bytes)
            while done < self.row_bytes:
                more = _pread_into(fd, buffer[done:], position + k * self.row_bytes + done)
                if more <= 0:  # a chunk is never rewritten: the file was cut after it was checked
                    raise PipelineError(f"{path}: ends before row {first_row + k}; the cache file was cut short "
                                        f"while in use; run again to compute its images anew")
                done += more

    def _descriptor(self, number: int) -> int:
        if number in self._open:
            self._open.move_to_end(number)
        else:
            self._open[number] = os.open(self.chunks[number][0], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if len(self._open) > OPEN_CHUNKS:
                os.close(self._open.popitem(last=False)[1])
        return self._open[number]

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1])

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self) -> dict:  # to a DataLoader worker: the paths, not the open files
        return {**self.__dict__, "_open": OrderedDict()}


def _pread_into(fd: int, buffer: np.ndarray, position: int) -> int:
    """Read into `buffer` (bytes, contiguous) from `position`; the number of bytes read (0 at the end)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [buffer], position)
    data = os.pread(fd, len(buffer), position)
    memoryview(buffer)[:len(data)] = data
    return len(data)


def from_settings(cfg, cache_dir: Path, trunk: torch.nn.Module, trunk_sha256: str, preprocess: Preprocess,
                  runtime: Runtime) -> TrunkCache | None:
    """The cache CACHE_TRUNK and CACHE_DTYPE ask for, or None (every batch through the trunk)."""
    return TrunkCache(cache_dir, trunk, trunk_sha256, preprocess, runtime, cfg.CACHE_DTYPE) if cfg.CACHE_TRUNK else None
