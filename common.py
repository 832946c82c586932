"""Shared plumbing for the pipeline's scripts: running one, errors, seeds, devices, atomic file writes,
figures and hashes. The artifacts themselves (split, checkpoint, embeddings, provenance) are
artifacts.py's; the model is backbone.py's; images are images.py's."""
import contextlib
import ctypes
import errno
import gc
import hashlib
import json
import os
import platform
import random
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import distributed

REPO_DIR = Path(__file__).resolve().parent
# temporary files are named "<name>.tmp-plankton-<pid>-<8 hex digits>" beside their target; only
# names of exactly this form, of processes no longer alive, are ever cleaned up
TMP_MARK = ".tmp-plankton-"
TMP_NAME = re.compile(r".+\.tmp-plankton-(?P<pid>[0-9]+)-[0-9a-f]{8}")
# what the file system says when it is full, read-only or not ours: the user's to fix, not a bug
FILE_SYSTEM_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class PipelineError(Exception):
    """An error the user can fix (wrong path, missing step, stale artifact): printed as one line."""


# ---- running a script ----------------------------------------------------------------------

def run_script(run, argv: list[str] | None = None, numba_cache: Path | None = None,
               lock_folders: bool = True, distributed_ok: bool = False) -> None:
    """Run a script's run(cfg); a PipelineError ends in one line on stderr and exit status 1.

    While it runs, the script holds OUTPUT_DIR and CHECKPOINT_DIR (lock_folders): a second run of
    the pipeline on the same folders stops at once instead of interleaving its files with this
    one's. numba keeps compiled code (umap-learn's, the distance pass) in <CACHE_DIR>/numba, or in
    `numba_cache`: set here, once, before anything imports numba. Under torchrun (distributed_ok:
    train.py, embed.py) every process joins the group, rank 0 alone holds the folders and keeps the
    log, and the others start once it does; another script under torchrun stops with one line."""
    import settings  # settings.py raises PipelineError: imported here, not at the top
    with contextlib.ExitStack() as held:
        try:
            cfg = settings.load_settings(argv)
            use_numba_cache(numba_cache or Path(cfg.CACHE_DIR) / "numba")
            script = Path(sys.argv[0]).stem if run.__module__ == "__main__" else run.__module__
            if distributed.launched():
                if not distributed_ok:
                    raise PipelineError(f"{script}.py runs in one process: start it with python, not torchrun "
                                        f"(only train.py and embed.py run distributed)")
                held.enter_context(distributed.quiet_unless_main())
                held.enter_context(distributed.process_group(pick_device(cfg.DEVICE)))
            if lock_folders and distributed.is_main():
                for folder in dict.fromkeys(Path(f).resolve() for f in (cfg.OUTPUT_DIR, cfg.CHECKPOINT_DIR)):
                    held.enter_context(folder_lock(folder))
                # the console output is also kept, error line included, in <OUTPUT_DIR>/logs/<script>.log
                held.enter_context(tee_output(Path(cfg.OUTPUT_DIR) / "logs" / f"{script}.log"))
            distributed.barrier()  # the other ranks start once rank 0 holds the folders
            run(cfg)
        except BaseException as err:
            _exit_for(err)


def _exit_for(err: BaseException) -> None:
    """One line and exit status 1 for what a user can fix; anything else goes on as it was."""
    if isinstance(err, PipelineError):
        message = str(err)
    elif isinstance(err, OSError) and err.errno in FILE_SYSTEM_FAULTS:  # outside the atomic writers
        message = f"{err.filename}: {err.strerror or err}" if err.filename else str(err.strerror or err)
    elif isinstance(err, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    elif distributed.launched() and distributed.another_rank_failed():
        sys.exit(1)  # a collective broken by a rank that failed first and said why
    else:
        raise err
    if distributed.should_print_error():  # once, not once per process
        print(f"error: {message}", file=distributed.error_stream())
    sys.exit(1)


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold <folder>/.plankton.lock (an exclusive flock, released when the process ends, however it
    ends) or stop with one line naming the process that holds it."""
    import fcntl
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".plankton.lock", "a+")
    except OSError as err:
        raise PipelineError(f"cannot write {folder}: {err.strerror or err}")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise PipelineError(f"{folder} is in use by another run of this pipeline ({holder}); wait for it to "
                                f"finish, or set OUTPUT_DIR and CHECKPOINT_DIR to other folders")
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Tee:
    """A text stream that writes to the console stream and to a log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def __getattr__(self, name):  # isatty, fileno, encoding, flush …: the console stream's
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_output(log_path: Path):
    """Copy everything printed (stdout and stderr) into log_path, started afresh, while the block runs."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8", errors="backslashreplace") as log:
        log.write(f"# {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M:%S')}, code {code_version()})\n")
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = saved


def use_numba_cache(folder: Path) -> None:
    """Keep numba's compiled code in `folder`; only takes effect before numba is first imported.
    A NUMBA_CACHE_DIR set by the caller's environment wins."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(Path(folder).resolve()))


# ---- progress --------------------------------------------------------------------------------

PROGRESS_EVERY = 30.0  # seconds between progress lines when the output is a log file, not a terminal


class Progress:
    """A tqdm bar on a terminal; where the output goes to a file (a cluster job's log), where bars
    are off, a plain line every PROGRESS_EVERY seconds instead, so a long step is never silent."""

    def __init__(self, iterable, desc: str, total: int | None = None, unit: str = "it", min_total: int = 0):
        from tqdm import tqdm
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        shown = self.total is None or self.total >= min_total
        self.bar = tqdm(iterable, desc=desc, total=self.total, unit=unit, leave=False) \
            if shown and sys.stderr.isatty() else None
        self.quiet, self.postfix = not shown, {}

    def __iter__(self):
        if self.bar is not None:
            yield from self.bar
            return
        started = last = time.monotonic()
        for done, item in enumerate(self.iterable, 1):
            yield item
            now = time.monotonic()
            if not self.quiet and now - last >= PROGRESS_EVERY:
                print(self.line(done, now - started), flush=True)
                last = now

    def line(self, done: int, seconds: float) -> str:
        of = f"/{self.total} ({100 * done / self.total:.0f}%)" if self.total else ""
        left = f", about {seconds * (self.total - done) / done:.0f} s left" if self.total else ""
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {done}{of} {self.unit} in {seconds:.0f} s{left}{extra}"

    def set_postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**values)
        self.postfix = values

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- reproducibility and devices -----------------------------------------------------------------

def release_free_memory() -> None:
    """Hand the heap's free blocks back to the system (glibc's malloc_trim; nothing elsewhere).
    run_all.py calls it between stages: glibc keeps what a stage freed, so without it one process
    running every stage holds the sum of their leftovers, not just the largest stage's peak."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass  # not glibc (macOS, musl): its allocator returns memory its own way


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


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages whose behaviour the results depend on."""
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "umap-learn", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


# ---- atomic writes -----------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success move it into place with os.replace.

    A kill at any moment leaves either the old file or the new one, never half of one. A full,
    read-only or foreign folder ends in a PipelineError naming `path` (the temporary is removed)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise PipelineError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def remove_abandoned_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries under `folder` that atomic_path made in processes no longer alive
    (a killed run's). A live process's temporary, and every other file, is left alone: a pid
    reused since only keeps a leftover for one more run."""
    removed = []
    for leftover in Path(folder).rglob(f"*{TMP_MARK}*"):
        match = TMP_NAME.fullmatch(leftover.name)
        if match and leftover.is_file() and not _process_alive(int(match["pid"])):
            with contextlib.suppress(OSError):  # a read-only folder: the write that follows says so
                leftover.unlink(missing_ok=True)
                removed.append(leftover)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never one of ours: os.kill(0, ...) would mean the process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid at all: leave it
        return True
    return True


def save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk as "enforce fail ..."
            if "enforce fail" not in str(err) and "PytorchStreamWriter" not in str(err):
                raise
            reason = str(err).strip().splitlines()[0][:200]
            raise PipelineError(f"cannot write {path}: the write failed, is the disk full? ({reason})") from err


def save_csv(frame, path: Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def save_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_ticks(ax, class_names: list[str]) -> None:
    """Class names on both axes of a class x class matrix; long names slanted so they never overlap."""
    slant = max(map(len, class_names)) > 3
    ax.set_xticks(range(len(class_names)), class_names, rotation=45 if slant else 0, ha="right" if slant else "center")
    ax.set_yticks(range(len(class_names)), class_names)


FIGURE_NOTE = {"text": ""}  # set by note_trunk_weights once a stage knows which weights made its numbers


def note_trunk_weights(weights_source: str) -> None:
    """Every figure saved from now on says which trunk weights made it, unless they are ImageNet's:
    a random trunk's figures look like results, and a reader of a report must not take them for any."""
    pretrained = weights_source.startswith("ImageNet")
    FIGURE_NOTE["text"] = "" if pretrained else f"Trunk weights: {weights_source}, not ImageNet-pretrained"


def save_figure(fig, path: Path) -> None:
    if FIGURE_NOTE["text"]:  # below everything else; bbox_inches="tight" grows the canvas to hold it
        fig.text(0.5, -0.02, FIGURE_NOTE["text"], ha="center", va="top", fontsize=8, color="darkred")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


# ---- provenance ----------------------------------------------------------------------------------

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


