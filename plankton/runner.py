"""Running a script: settings read and checked, the output folders locked, the console kept in a log,
and a PipelineError turned into one `error:` line with exit status 1. Also a stage run in a
process of its own (run_stage_process), so that no stage imports another."""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from plankton import distributed, fileio, system
from plankton.errors import FILE_SYSTEM_FAULTS, PipelineError
from plankton.provenance import code_version
from plankton.system import pick_device


def run_script(run, argv: list[str] | None = None, numba_cache: Path | None = None,
               lock_folders: bool = True, distributed_ok: bool = False) -> None:
    """Run a script's run(cfg); a PipelineError ends in one line on stderr and exit status 1.

    While it runs, the script holds OUTPUT_DIR and CHECKPOINT_DIR (lock_folders): a second run of
    the pipeline on the same folders stops at once instead of interleaving its files with this
    one's. numba keeps compiled code (umap-learn's, the distance pass) in <CACHE_DIR>/numba, or in
    `numba_cache`: set here, once, before anything imports numba. Under torchrun (distributed_ok:
    train.py, embed.py) every process joins the group, rank 0 alone holds the folders and keeps the
    log, and the others start once it does; another script under torchrun stops with one line."""
    from plankton import settings  # settings.py raises PipelineError: imported here, not at the top
    with contextlib.ExitStack() as held:
        try:
            distributed.check_launch_variables()  # torchrun's variables: all or none, numbers in range
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
    except OSError as err:
        raise PipelineError(f"cannot write {folder}: {err.strerror or err}")
    # never through a link or into a hard-linked file: the lock file is truncated below
    handle = os.fdopen(fileio.open_no_follow(folder / ".plankton.lock", os.O_RDWR), "r+")
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
    """Copy everything printed (stdout and stderr) into log_path, started afresh, while the block runs.
    The log and its folder are the pipeline's own: a link at either is refused, never written through."""
    fileio.own_folder(log_path.parent)
    fd = fileio.open_no_follow(log_path, os.O_WRONLY)
    os.ftruncate(fd, 0)
    with open(fd, "w", encoding="utf-8", errors="backslashreplace") as log:
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


def run_stage_process(name: str, cfg, log_path: Path) -> None:
    """Run stage `name` (its script) in a process of its own with exactly these settings, each passed
    as --KEY=VALUE; everything it prints goes to log_path. A failure raises PipelineError with the
    stage's own error line. (Stages never import each other: seeds.py trains through this.)"""
    args = [f"--{name_}={value!r}" for name_, value in vars(cfg).items()]
    with fileio.atomic_path(log_path) as tmp, open(tmp, "w", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, str(system.REPO_DIR / f"{name}.py"), *args], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                              preexec_fn=system.die_with_parent)
    if done.returncode != 0:
        lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        said = next((line[len("error: "):] for line in reversed(lines) if line.startswith("error: ")),
                    lines[-1] if lines else f"exit status {done.returncode}")
        raise PipelineError(f"{name}.py stopped: {said} (its output: {log_path})")
