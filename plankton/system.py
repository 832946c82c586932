"""The machine: seeds, the device, DataLoader workers, and handing freed memory back between stages."""
import contextlib
import ctypes
import gc
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from plankton.errors import PipelineError

REPO_DIR = Path(__file__).resolve().parents[1]  # the scripts' folder, above this package


def _find_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()  # looked up here: between fork and exec a child must not load libraries


def die_with_parent() -> None:
    """For subprocess's preexec_fn: the child gets SIGTERM when the process that started it ends,
    however it ends (a stopped pytest, a killed run_all.py), so no stage or compile process is left
    running. Linux's PR_SET_PDEATHSIG; elsewhere nothing (the child then ends when its work does)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def release_free_memory() -> None:
    """Hand the heap's free blocks back to the system (glibc's malloc_trim; nothing elsewhere).
    run_all.py calls it between stages: glibc keeps what a stage freed, so without it one process
    running every stage holds the sum of their leftovers, not just the largest stage's peak."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass  # not glibc (macOS, musl): its allocator returns memory its own way


@contextlib.contextmanager
def imports_frozen():
    """Collect, then exempt what is left (the imported modules of torch, pandas, matplotlib and the
    stages: most of the process's objects) from every collection until the block ends (gc.freeze):
    run_all.py runs its stages in it, so release_free_memory's collection between stages and the
    stages' own full collections walk only what the stages made. Frozen once, before the first
    stage, not after each: what a stage leaves in a library's cache (matplotlib's) and lets go
    later would never be collected (a digits run_all ended 20-35 MB larger that way)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # the caller's objects are collected as before


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(setting: str) -> torch.device:
    """"auto" means CUDA when present, else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(setting).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"DEVICE={setting!r} but no CUDA device is visible; use DEVICE='auto' or 'cpu'")
    return torch.device(setting)


def num_workers(setting) -> int:
    """DataLoader workers. "auto": none on 2 cores or fewer, where the trunk's threads already keep
    every core busy and a worker process only competes with them (bench.py on the built-in data:
    embed at 0.95x the trunk limit with 0 workers, 0.82x with 1); else one per core but one, up to 8."""
    if setting == "auto":
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else min(8, cores - 1)
    return int(setting)
