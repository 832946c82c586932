"""Several processes, one job: train.py and embed.py under torchrun (torch.distributed).

    torchrun --standalone --nproc_per_node=4 train.py      # one node, four GPUs
    torchrun --standalone --nproc_per_node=2 embed.py      # two CPU processes (gloo): a correctness check

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process; with WORLD_SIZE > 1 runner.run_script
starts the process group (NCCL when the device is CUDA, each process on cuda:LOCAL_RANK; gloo on the
CPU), and plain `python train.py` (no such variables) runs as one process, as before. Rank 0 is the
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

TIMEOUT = datetime.timedelta(minutes=60)  # longest a rank waits for the others at one collective
ERROR_KEY = "plankton/errors"  # counted in the group's store: the first rank to fail prints the error line


def launched() -> bool:
    """True when started by torchrun (or srun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


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
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    yield  # on an error, no clean-up: a rank that failed exits, and torchrun stops the rest
    dist.destroy_process_group()


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
        return is_main()
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
