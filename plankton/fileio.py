"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one:
atomic_path and the savers built on it, and the sweep of temporaries that killed runs left behind."""
import contextlib
import csv
import errno
import json
import os
import re
import secrets
import stat
from pathlib import Path

import pandas as pd
import torch

from plankton.errors import PipelineError

# temporary files are named "<name>.tmp-plankton-<pid>-<8 hex digits>" beside their target; only
# names of exactly this form, of processes no longer alive, are ever cleaned up
TMP_MARK = ".tmp-plankton-"


TMP_NAME = re.compile(r".+\.tmp-plankton-(?P<pid>[0-9]+)-[0-9a-f]{8}")


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


def open_no_follow(path: Path, flags: int) -> int:
    """A descriptor of the regular file `path` in one of the pipeline's folders (a lock, a log),
    created if missing, never reached through a symbolic link: a link, a hard-linked file, a device or
    a FIFO left at that name would make the pipeline write into a file that is not its own, so each
    is one PipelineError. (atomic_path needs no such care: os.replace replaces a link, not its target.)"""
    path = Path(path)
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise PipelineError(f"{path} is a symbolic link; the pipeline keeps its own file there and never writes "
                                f"through a link: remove the link") from None
        raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(info.st_mode) else "not a regular file"
        raise PipelineError(f"{path} is {what}; the pipeline keeps its own file there: remove it")
    return fd


def own_folder(folder: Path) -> Path:
    """Create a sub-folder the pipeline keeps inside its own folders (logs/), refusing one that is a
    symbolic link: the files written into it would land in the folder it points to."""
    folder = Path(folder)
    if folder.is_symlink():
        raise PipelineError(f"{folder} is a symbolic link; the pipeline keeps its own folder there and never writes "
                            f"through a link: remove the link")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"cannot write {folder}: {err.strerror or err}") from None
    return folder


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


# ---- CSV: the one writer and the one reader of the pipeline's CSVs --------------------------------

# A cell a spreadsheet would run as a formula starts with one of these (OWASP's CSV injection list);
# it is written with a leading apostrophe, and so is a cell that starts with the apostrophe itself,
# so that read_csv gives back every name exactly. Only text is touched: -1.5 stays a number.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_ESCAPE = "'"


def escape_cell(value):
    if isinstance(value, str) and value.startswith(FORMULA_STARTS + (CSV_ESCAPE,)):
        return CSV_ESCAPE + value
    return value


def unescape_cell(value):
    if isinstance(value, str) and value.startswith(CSV_ESCAPE):
        return value[len(CSV_ESCAPE):]
    return value


def _map_text(frame, cell):
    """A copy of frame with `cell` applied to every text cell, index label and column name."""
    frame = frame.copy()
    for column in _text_columns(frame):
        frame[column] = frame[column].map(cell)
    if not pd.api.types.is_numeric_dtype(frame.columns):
        frame.columns = frame.columns.map(cell)
    if not pd.api.types.is_numeric_dtype(frame.index):  # a RangeIndex stays one
        frame.index = frame.index.map(cell)
    frame.index.names = [cell(name) for name in frame.index.names]
    return frame


def _text_columns(frame) -> list:
    return [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]


def save_csv(frame, path: Path, **kwargs) -> None:
    """frame as CSV, atomically, with every text cell that a spreadsheet would run as a formula
    neutralised (escape_cell); the raw names stay in the Parquet and JSON files beside it."""
    frame = _map_text(frame, escape_cell)
    if _holds_carriage_return(frame):  # pandas quotes "\n" but not "\r", which would end the row there
        kwargs.setdefault("quoting", csv.QUOTE_NONNUMERIC)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def _holds_carriage_return(frame) -> bool:
    texts = [frame.columns, frame.index] + [frame[c] for c in _text_columns(frame)]
    return any(isinstance(v, str) and "\r" in v for values in texts for v in values)


def read_csv(path: Path, **kwargs):
    """A CSV written by save_csv, with its names given back as they were (pandas.read_csv's arguments)."""
    return _map_text(pd.read_csv(path, **kwargs), unescape_cell)


def save_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def plain_json(obj):
    """obj as plain JSON values (tuples become lists, anything else its str): what records keep."""
    return json.loads(json.dumps(obj, default=str))
