"""Several processes, one job: train.py and embed.py under torchrun (torch.distributed).

    torchrun --standalone --nproc_per_node=4 train.py      # one node, four GPUs
    torchrun --standalone --nproc_per_node=2 embed.py      # two CPU processes (gloo): a correctness check

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; with WORLD_SIZE > 1 runner.run_script
starts the process group (NCCL when the device is CUDA, each process on cuda:LOCAL_RANK; gloo on the
CPU), and plain `python train.py` (no such variables) runs as one process, as before. The launcher's
variables are all set or none (check_launch_variables), and the processes find each other within
PLANKTON_RENDEZVOUS_SECONDS or stop with one line naming the missing ones (rendezvous). Rank 0 is the
main process: it alone holds the folder locks, keeps the log and writes files; the others' console
output is silenced. Every helper here is a no-op, or returns its input, in a single process.

Work is shared out in contiguous blocks (shard_bounds), so concatenating the blocks in rank order
(gather_rows) gives back the original order."""
import contextlib
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from plankton.errors import PipelineError

TIMEOUT = datetime.timedelta(minutes=60)  # longest a rank waits for the others at one collective
ERROR_KEY = "plankton/errors"  # counted in the group's store: the first rank to fail prints the error line
JOINED_KEY = "plankton/joined/"  # + rank: set by each process at the rendezvous
# what torchrun sets in every process: all of them, or none (a plain `python train.py`)
LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_VARIABLE = "PLANKTON_RENDEZVOUS_SECONDS"  # how long the processes wait to find each other
RENDEZVOUS_SECONDS = 300.0  # its default: torchrun starts every process at once, so minutes are plenty
_alone = False  # True while this process waits at the rendezvous: an error there is its own to print


def _whole(name: str, default: int) -> int:
    """An environment variable as a whole number; the default when it is unset or not one (it is
    checked once, by check_launch_variables: the error path must not raise again)."""
    text = os.environ.get(name, "").strip()
    return int(text) if text.isascii() and text.isdigit() else default


def launched() -> bool:
    """True when started by torchrun (or srun) with more than one process, its variables in order
    (else the process runs alone and says why: check_launch_variables)."""
    return _whole("WORLD_SIZE", 1) > 1 and launch_problem() is None


def check_launch_variables() -> None:
    """torchrun's variables, checked before anything starts: one PipelineError if launch_problem finds one."""
    problem = launch_problem()
    if problem is not None:
        raise PipelineError(problem)


def launch_problem() -> str | None:
    """What is wrong with the launcher variables, or None: all of LAUNCH_VARIABLES or none, whole
    numbers in range, a rendezvous timeout that is a positive number of seconds."""
    given = {name: os.environ[name] for name in LAUNCH_VARIABLES if name in os.environ}
    if not given:
        return None
    fix = "start the script with torchrun, which sets them all, or unset them to run one process"
    missing = [name for name in LAUNCH_VARIABLES if name not in given]
    if missing:
        shown = ", ".join(f"{name}={value!r}" for name, value in given.items())
        return f"{shown} set but not {', '.join(missing)}: {fix}"
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        if not (given[name].strip().isascii() and given[name].strip().isdigit()):
            return f"{name}={given[name]!r}: must be a whole number >= 0; {fix}"
    world, rank_, local, port = (int(given[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"))
    problems = [(world < 1, f"WORLD_SIZE={world}: must be >= 1"),
                (rank_ >= world, f"RANK={rank_}: must be below WORLD_SIZE={world}"),
                (local >= world, f"LOCAL_RANK={local}: must be below WORLD_SIZE={world}"),
                (not 1 <= port <= 65535, f"MASTER_PORT={port}: must be a port from 1 to 65535"),
                (not given["MASTER_ADDR"].strip(), f"MASTER_ADDR={given['MASTER_ADDR']!r}: must name rank 0's host"),
                (rendezvous_seconds() is None, f"{RENDEZVOUS_VARIABLE}={os.environ.get(RENDEZVOUS_VARIABLE)!r}: "
                                               f"must be a number of seconds > 0")]
    return next((f"{problem}; {fix}" for failed, problem in problems if failed), None)


def rendezvous_seconds() -> float | None:
    """How long the processes wait to find each other; None if RENDEZVOUS_VARIABLE is no positive number."""
    try:
        seconds = float(os.environ.get(RENDEZVOUS_VARIABLE, RENDEZVOUS_SECONDS))
    except ValueError:
        return None
    return seconds if 0 < seconds < float("inf") else None


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if active():
        return dist.get_rank()
    return _whole("RANK", 0) if launched() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """The device of this process: cuda:LOCAL_RANK for a CUDA device under torchrun, else `device`."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@contextlib.contextmanager
def process_group(device: torch.device):
    """Join the torchrun job for the block's duration: NCCL for CUDA (after set_device, so each
    process drives its own GPU), gloo on the CPU. Not under torchrun: nothing. The group is left
    (destroy_process_group) only when the block ends normally: after an error, waiting on peers
    that may be gone could hang, and the process is about to exit anyway."""
    if not launched():
        yield
        return
    device = local_device(device)
    store, group = rendezvous(), dict(rank=rank(), world_size=_whole("WORLD_SIZE", 1), timeout=TIMEOUT)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, device_id=device, **group)
    else:
        dist.init_process_group("gloo", store=store, **group)
    yield  # on an error, no clean-up: a rank that failed exits, and torchrun stops the rest
    dist.destroy_process_group()


def rendezvous() -> "dist.TCPStore":
    """The group's store at MASTER_ADDR:MASTER_PORT (rank 0 serves it), once every process has joined
    it within rendezvous_seconds(); else one PipelineError naming what never came (rank 0, or the
    ranks that did not join), instead of waiting the collective timeout in silence."""
    seconds, me, world = rendezvous_seconds() or RENDEZVOUS_SECONDS, rank(), _whole("WORLD_SIZE", 1)
    where = f"MASTER_ADDR:MASTER_PORT={os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    fix = f"start every process of the job (torchrun does), or give them longer with {RENDEZVOUS_VARIABLE}"
    wait = datetime.timedelta(seconds=seconds)
    global _alone
    _alone = True  # until every process has joined, a failure here is this process's own to report
    with _native_stderr_silenced():
        store = _join(me, world, wait, where, seconds, fix)
    _alone = False
    store.set_timeout(TIMEOUT)
    return store


def _join(me: int, world: int, wait: datetime.timedelta, where: str, seconds: float, fix: str) -> "dist.TCPStore":
    # under torchrun its agent already serves the store there (as torch's own env:// start assumes);
    # else rank 0 serves it
    serves = me == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=serves,
                              timeout=wait, wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, OSError) as err:  # torch's DistNetworkError and DistStoreError are RuntimeErrors
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        if serves:
            raise PipelineError(f"rank 0 cannot serve the rendezvous at {where} ({reason}); choose a free "
                                f"MASTER_PORT") from None
        raise PipelineError(f"rank {me} found no rank 0 at {where} within {seconds:g} s; {fix}") from None
    # a restarted torchrun job meets in the same agent store: its keys are its own
    prefix = f"{JOINED_KEY}{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    keys = [f"{prefix}{r}" for r in range(world)]
    try:
        store.set(keys[me], "1")
        store.wait(keys, wait)
    except (RuntimeError, OSError):
        try:
            absent = [r for r, key in enumerate(keys) if not store.check([key])]
        except (RuntimeError, OSError):  # rank 0, and its store, gave up first
            raise PipelineError(f"rank {me}: rank 0 stopped while waiting for the other processes at {where}; "
                                f"{fix}") from None
        raise PipelineError(f"{len(absent)} of the {world} processes never joined the rendezvous at {where} within "
                            f"{seconds:g} s (rank {', '.join(map(str, absent))} missing); {fix}") from None
    return store


@contextlib.contextmanager
def _native_stderr_silenced():
    """c10d's C++ code logs each connection retry and timeout, with a native stack, straight to file
    descriptor 2; the PipelineError that follows says what happened, once."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _collective_device() -> torch.device:
    """Where tensors for a collective live: the current GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- sharing work out and collecting results -----------------------------------------------------

def shard_bounds(n: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous block of n items; block sizes differ by at most one."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (rank_ < extra)


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous block of `items` (all of them in a single process)."""
    start, stop = shard_bounds(len(items), rank_, world)
    return items[start:stop]


def gather_rows(rows: np.ndarray | None) -> np.ndarray | None:
    """On rank 0: every rank's rows concatenated in rank order (None or no rows for an empty block);
    on the others: None. In a single process: `rows` itself."""
    if not active():
        return rows
    parts = [None] * world_size() if is_main() else None
    dist.gather_object(rows, parts, dst=0)
    if not is_main():
        return None
    parts = [p for p in parts if p is not None and len(p)]
    return np.concatenate(parts) if parts else rows


def broadcast(obj):
    """Rank 0's `obj` on every rank (a decision every rank must take alike)."""
    if not active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_all(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64)."""
    if not active():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.cpu().tolist()


def all_true(flag: bool) -> bool:
    """True only if `flag` is true on every rank."""
    if not active():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may write: a split, a scan cache); the others wait, then run
    it and find its files in place."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


# ---- errors and console output -----------------------------------------------------------------

def should_print_error() -> bool:
    """Whether this rank prints the `error:` line of a failure, so that it is printed once. Before
    the group starts every rank fails alike (the same settings): rank 0 prints. After, the first
    rank to fail prints (counted in the group's store); should the store be gone, every rank does."""
    if not active():
        return is_main() or _alone
    try:
        return dist.distributed_c10d._get_default_store().add(ERROR_KEY, 1) == 1
    except Exception:  # noqa: BLE001 - the store went down with rank 0: better twice than never
        return True


def another_rank_failed() -> bool:
    """True when some rank has already reported an error (so this rank's broken collective is its echo)."""
    if not active():
        return False
    try:
        return dist.distributed_c10d._get_default_store().add(ERROR_KEY, 0) > 0
    except Exception:  # noqa: BLE001 - the store went down: a peer is gone
        return True


@contextlib.contextmanager
def quiet_unless_main():
    """Silence stdout and stderr on ranks other than 0 (they would repeat rank 0's lines); their
    error line goes to sys.__stderr__, and an unexpected traceback prints after the block."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield


def error_stream():
    """Where an error line goes: the real stderr on ranks whose output is silenced."""
    return sys.stderr if is_main() else sys.__stderr__
