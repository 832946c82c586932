"""torchrun: the shard and gather helpers (fast, two gloo processes), and train.py and embed.py run
as two CPU processes against a single-process run (slow)."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REPO, env, make_image_folder, settings_file

from plankton import distributed

TORCHRUN = str(Path(REPO) / ".venv" / "bin" / "torchrun")


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_contiguous_blocks_covering_everything_once(n, world):
    items = list(range(n))
    blocks = [distributed.shard(items, r, world) for r in range(world)]
    assert sum(blocks, []) == items  # in rank order they are the list itself
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    assert [distributed.shard_bounds(n, r, world) for r in range(world)] == \
        [(sum(sizes[:r]), sum(sizes[:r + 1])) for r in range(world)]


def test_helpers_pass_through_in_one_process():
    rows = np.arange(6.0).reshape(3, 2)
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.gather_rows(rows) is rows
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.sum_all([1.5, 2]) == [1.5, 2]
    assert distributed.all_true(True) and not distributed.all_true(False)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One of `world` gloo processes: its block of 0..10 (as rows i, i^2), gathered; the other collectives."""
    torch.set_num_threads(1)  # forked: OpenMP's pool, if the parent used it, is not fork-safe
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        start, stop = distributed.shard_bounds(11)
        mine = np.array([[i, i * i] for i in range(start, stop)], dtype=np.float32).reshape(-1, 2)
        gathered = distributed.gather_rows(mine)
        result = dict(gathered=gathered, total=distributed.sum_all([rank + 1.0, 1.0]),
                      agreed=distributed.all_true(rank != 1), decision=distributed.broadcast(f"rank {rank}"))
        torch.save(result, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gather_returns_every_rank_rows_in_order_on_rank_0(tmp_path):
    world = 3
    # fork: the children need not import torch and the project again (spawn: ~20 s on 2 cores)
    mp.start_processes(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world,
                       join=True, start_method="fork")
    results = [torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(world)]
    expected = np.array([[i, i * i] for i in range(11)], dtype=np.float32)
    np.testing.assert_array_equal(results[0]["gathered"], expected)
    assert results[1]["gathered"] is None and results[2]["gathered"] is None
    for result in results:
        assert result["total"] == [1.0 + 2.0 + 3.0, 3.0]
        assert result["agreed"] is False  # rank 1 said no
        assert result["decision"] == "rank 0"


class _TinyHead(torch.nn.Module):
    """A model as train_one_epoch sees it: a trunk (nothing) and forward_head, one linear layer."""

    def __init__(self):
        super().__init__()
        self.trunk, self.fc = torch.nn.Identity(), torch.nn.Linear(4, 3)

    def forward_head(self, features):
        return self.fc(features), features

    forward = forward_head


def _one_epoch(world: int, init_file: str | None, out_file: str, rank: int = 0) -> None:
    """Two SGD steps of training.train_one_epoch on 13 fixed rows, batches of 7 and 6 (uneven
    blocks over 2 ranks), in one process (world 1) or as `rank` of `world` gloo processes with DDP."""
    from dataloader import FeatureSource, Runtime
    from plankton import tasks, training
    if world > 1:  # a forked child: one thread (OpenMP's pool, used by the parent's training, is not fork-safe)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = _TinyHead()
    forward = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    rows = np.random.default_rng(1).normal(size=(13, 4)).astype(np.float32)
    source = FeatureSource(torch.arange(13) % 3, features=rows)
    figures, classwise = [], []

    def on_check(b, loss, acc, trained):
        figures.append((loss, acc))
        classwise.append(tasks.MULTICLASS.classwise_metrics(*trained, ["a", "b", "c"]))
        return False

    training.train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.5), source,
                             [[3, 0, 7, 12, 5, 1, 9], [2, 4, 6, 8, 10, 11]], Runtime(torch.device("cpu"), 8, 0, False, False),
                             {0, 1}, on_check, forward=forward, keep_outputs=True)
    torch.save(dict(weights={k: v.detach().clone() for k, v in model.state_dict().items()}, figures=figures,
                    classwise=classwise), f"{out_file}.{rank}")
    if world > 1:
        dist.destroy_process_group()


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    _one_epoch(world, init_file, out_file, rank)


def test_data_parallel_steps_equal_one_process(tmp_path):
    """Each rank's share of the batch's mean loss, averaged by DDP, is the whole batch's gradient;
    the running figures summed over ranks are the whole batches'."""
    _one_epoch(1, None, str(tmp_path / "single"))
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True,
                       start_method="fork")
    single = torch.load(tmp_path / "single.0", weights_only=False)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"ddp.{rank}", weights_only=False)
        for name, value in single["weights"].items():
            torch.testing.assert_close(ddp["weights"][name], value, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ddp["figures"], single["figures"], rtol=1e-5)
    # CLASSWISE_TRAIN="batches": rank 0 gathers every rank's outputs, so its class-wise figures are the whole
    # batches' (rank 1, which writes nothing, has only its own block's)
    ddp = torch.load(tmp_path / "ddp.0", weights_only=False)
    for got, want in zip(ddp["classwise"], single["classwise"], strict=True):
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], [want[k] for k in want], rtol=1e-5)
    assert single["weights"]["fc.bias"].abs().sum() > 0  # the steps did move the weights


# ---- train.py and embed.py as two gloo processes -------------------------------------------------

def _torchrun(script: str, settings: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", script, f"--config={settings}", *args],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def _python(script: str, settings: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(REPO) / ".venv" / "bin" / "python"), script, f"--config={settings}"], cwd=REPO,
                          env=env(), capture_output=True, text=True, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _cached_rows(cache_dir: Path) -> dict[str, np.ndarray]:
    """Every complete chunk's rows by image key, read straight from the files."""
    rows = {}
    for keys_file in sorted(cache_dir.glob("trunk_*/chunk-*.keys")):
        array = np.load(keys_file.with_suffix(".npy"))
        rows.update(zip(keys_file.read_text().split("\n")[:-1], array))
    return rows


def _run_settings(tmp: Path, data: Path) -> Path:
    tmp.mkdir()
    return settings_file(tmp / "settings.py", DATA_DIR=str(data), SEEN_CLASSES=["a", "b", "c"],
                         UNSEEN_CLASSES=["u", "v"], IMAGE_SIZE=32, WEIGHTS=None, NUM_WORKERS=0, DEVICE="cpu",
                         BATCH_SIZE=8, MAX_EPOCHS=2, PATIENCE=100, VAL_PER_EPOCH=2, UMAP_SAMPLES=200,
                         UMAP_NEIGHBORS=5, CLOSE_FAR_COUNT=3, TRANSFER_REPEATS=2, OUTPUT_DIR=str(tmp / "outputs"),
                         CHECKPOINT_DIR=str(tmp / "checkpoints"), CACHE_DIR=str(tmp / "cache"))


@pytest.mark.slow
def test_two_processes_make_the_cache_and_embeddings_of_one(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 20, "b": 20, "c": 20, "u": 9, "v": 9}, size=24)
    two, one = tmp_path / "two", tmp_path / "one"
    two_settings, one_settings = _run_settings(two, data), _run_settings(one, data)

    # training as two processes (DDP, each its block of every batch, each its block of the trunk pass)
    trained = _torchrun("train.py", two_settings)
    _ok(trained)
    assert "processes=2 (torchrun)" in trained.stdout and "shared out over 2 processes" in trained.stdout
    assert trained.stdout.count("epoch 2:") == 1  # rank 1's console is silent
    last = torch.load(two / "checkpoints" / "last.pth", weights_only=False)
    assert last["finished"] and len(last["history"]) == 2 * 2
    assert sorted(p.name for p in (two / "outputs" / "logs").iterdir()) == ["train.log"]

    # the same checkpoint embedded by one process (its own cache) and by two
    (one / "outputs").mkdir(), (one / "checkpoints").mkdir()
    shutil.copy(two / "outputs" / "split.csv", one / "outputs")
    shutil.copy(two / "checkpoints" / "best.pth", one / "checkpoints")
    _ok(_python("embed.py", one_settings))
    _ok(_torchrun("embed.py", two_settings))

    # cache: the same images, the same values up to float16 rounding. The trunk runs in float32 on
    # batches of other sizes in the two runs, so its last bits may differ and round to neighbouring
    # float16 values: allow 2 float16 steps (2 x 2^-10 relative), and 1e-3 near zero
    single, shared = _cached_rows(one / "cache"), _cached_rows(two / "cache")
    assert len(single) == 12 + 45 + 18 and set(single) <= set(shared)  # test, train, unseen (+ val in two)
    for key, row in single.items():
        np.testing.assert_allclose(shared[key].astype(np.float32), row.astype(np.float32), rtol=2 ** -9, atol=1e-3)
    # embeddings: the same rows in the same order, equal up to what that rounding moves (float32 head)
    for subset in ("train", "test", "unseen"):
        a = pd.read_pickle(two / "outputs" / f"embeddings_{subset}.pkl")
        b = pd.read_pickle(one / "outputs" / f"embeddings_{subset}.pkl")
        assert list(a.path) == list(b.path) and list(a.label) == list(b.label) and a.attrs == b.attrs
        columns = [c for c in a if c.startswith("e") and c[1:].isdigit()]
        np.testing.assert_allclose(a[columns].to_numpy(), b[columns].to_numpy(), rtol=1e-3, atol=1e-4)
    assert sorted(p.name for p in (two / "outputs" / "logs").iterdir()) == ["embed.log", "train.log"]

    # every later stage takes the checkpoint two processes trained (run_all: train is already done)
    everything = _python("run_all.py", two_settings)
    _ok(everything)
    assert "training already finished" in everything.stdout
    for stage in ("evaluate", "embed", "compute_average_distances", "dimensionality_reduction", "transfer_learning"):
        assert (two / "outputs" / f"provenance_{stage}.json").is_file(), stage


@pytest.mark.slow
def test_an_error_under_torchrun_is_one_line(tmp_path, tiny_folder):
    settings = _run_settings(tmp_path / "run", tiny_folder)
    missing = _torchrun("embed.py", settings)  # after the group started: rank 0 fails, rank 1 is stopped
    refused = _torchrun("evaluate.py", settings)  # before it: every rank would fail alike
    for done, says in ((missing, "run train.py first"), (refused, "runs in one process")):
        assert done.returncode != 0
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and says in errors[0], done.stderr[-3000:]
