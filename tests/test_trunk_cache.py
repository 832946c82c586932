"""The trunk cache's chunk files: right features in the order asked, writers at the same time, torn
chunks, a pass killed half-way, content keys, and gathering one batch at a time."""
import hashlib
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder

import backbone
import dataloader
from plankton import trunk_cache

PREPROCESS = dataloader.Preprocess(32, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RUNTIME = dataloader.Runtime(torch.device("cpu"), batch_size=8, workers=0, channels_last=True, mixed_precision=False)
RUN_TRUNK = dataloader.run_trunk  # the real one, whatever a test has patched in


class Killed(Exception):
    """Stands in for a kill in the middle of a trunk pass."""


def new_trunk() -> torch.nn.Module:
    torch.manual_seed(0)  # the same random trunk in every process
    return backbone.PlanktonNet(3, image_size=32).trunk.eval()


@pytest.fixture
def images(tmp_path):
    return make_image_folder(tmp_path / "images", {"a": 20, "b": 20}, size=32)


def relpaths_of(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))


def direct(trunk, root, relpaths) -> np.ndarray:
    return dataloader.compute_trunk_features(trunk, root, relpaths, PREPROCESS, RUNTIME, np.float16)


def count_trunk_images(monkeypatch, kill_after_batches: int | None = None) -> list[int]:
    """Images per trunk batch from here on (the list grows); raise Killed at batch kill_after_batches + 1."""
    counted = []

    def counting(trunk, batch, runtime):
        if kill_after_batches is not None and len(counted) == kill_after_batches:
            raise Killed
        counted.append(len(batch))
        return RUN_TRUNK(trunk, batch, runtime)

    monkeypatch.setattr(dataloader, "run_trunk", counting)
    return counted


def chunk_files(folder) -> list:
    return sorted(folder.glob("chunk-*.keys"))


# ---- right rows, in the order asked, one batch at a time ---------------------------------------

def test_cached_features_equal_direct_computation_in_any_order(tmp_path, images, monkeypatch):
    trunk, relpaths = new_trunk(), relpaths_of(images)
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16", chunk_rows=16)
    store = cache.features(images, relpaths)
    expected = direct(trunk, images, relpaths)
    assert len(chunk_files(cache.folder(images))) == 3  # 16 + 16 + 8
    assert isinstance(store, trunk_cache.FeatureStore) and not isinstance(store, np.ndarray)
    assert store.shape == expected.shape and len(store) == len(relpaths) and store.dtype == np.float16
    assert np.array_equal(store[np.arange(len(store))], expected)
    order = np.random.default_rng(0).permutation(len(store))[:13].tolist() + [5, 5, 39, 0]  # across chunks, repeats
    rows = store[order]
    assert type(rows) is np.ndarray and rows.shape == (len(order),) + expected.shape[1:]
    assert np.array_equal(rows, expected[order])
    assert np.array_equal(store[3], expected[3]) and np.array_equal(store[-1], expected[-1])
    assert np.array_equal(store[10:20], expected[10:20]) and store[[]].shape == (0,) + expected.shape[1:]
    with pytest.raises(IndexError):
        store[[len(store)]]
    computed = count_trunk_images(monkeypatch)  # a hit runs no image through the trunk
    reversed_store = cache.features(images, relpaths[::-1])
    assert computed == [] and np.array_equal(reversed_store[np.arange(len(relpaths))], expected[::-1])


def test_feature_batches_ask_the_store_for_one_batch_at_a_time(tmp_path, images, monkeypatch):
    trunk, relpaths = new_trunk(), relpaths_of(images)
    labels = [int(r.startswith("b")) for r in relpaths]
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16", chunk_rows=16)
    source = dataloader.feature_source(images, relpaths, labels, PREPROCESS, cache)
    assert isinstance(source.features, trunk_cache.FeatureStore)
    asked, real_getitem = [], trunk_cache.FeatureStore.__getitem__

    def recording(store, indices):
        asked.append(len(indices))
        return real_getitem(store, indices)

    monkeypatch.setattr(trunk_cache.FeatureStore, "__getitem__", recording)
    batches = [list(range(i, min(i + 6, len(relpaths)))) for i in range(0, len(relpaths), 6)][::-1]
    got = list(dataloader.feature_batches(source, batches, trunk, RUNTIME))
    assert asked == [len(b) for b in batches]  # never more than the batch
    expected = torch.from_numpy(direct(trunk, images, relpaths)).float()
    for batch, (features, batch_labels) in zip(batches, got):
        assert torch.equal(features, expected[batch]) and batch_labels.tolist() == [labels[i] for i in batch]


def synthetic_store(folder, chunk_sizes=(5, 7, 4), row_shape=(3, 2, 2)):
    """Chunks of known rows written as a trunk pass writes them; (store, the same rows as one array)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((sum(chunk_sizes),) + row_shape).astype(np.float16)
    keys = [f"img{i}" for i in range(len(rows))]
    start = 0
    for size in chunk_sizes:
        trunk_cache._write_chunk(folder, keys[start:start + size], rows[start:start + size])
        start += size
    return trunk_cache._find(folder, keys, np.float16).store(keys), rows


def test_store_gathers_any_indices_across_chunks_in_few_reads(tmp_path, monkeypatch):
    store, rows = synthetic_store(tmp_path / "c")
    reads = []
    real = trunk_cache.os.preadv
    monkeypatch.setattr(trunk_cache.os, "preadv", lambda fd, bufs, pos: reads.append(len(bufs)) or real(fd, bufs, pos))
    for asked in (np.arange(16), np.arange(16)[::-1], np.array([3, 3, 15, 0, 9, 4, 5, 6]), np.array([-1, 2]),
                  np.array([], dtype=int)):
        assert np.array_equal(store[asked], rows[asked])
    assert np.array_equal(store[2:11:3], rows[2:11:3]) and np.array_equal(store[7], rows[7])
    reads.clear()
    store[np.arange(16)]
    assert sorted(reads) == [4, 5, 7]  # consecutive rows of a chunk: one call each
    monkeypatch.setattr(trunk_cache, "IOV_MAX", 3)
    reads.clear()
    assert np.array_equal(store[np.arange(16)], rows)
    assert max(reads) == 3 and sum(reads) == 16 and len(reads) == 7  # 4 -> 2+2, 5 -> 3+2, 7 -> 3+2+2
    with pytest.raises(IndexError):
        store[np.array([16])]


def test_store_reads_rows_without_mapping_the_cache_into_the_process(tmp_path):
    """Mapped pages count in the process's resident memory (the 50,000-image peak); reads do not."""
    store, rows = synthetic_store(tmp_path / "c")
    assert np.array_equal(store[np.arange(len(rows))], rows)
    mapped = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "c") not in mapped
    assert 0 < len(store._open) <= trunk_cache.OPEN_CHUNKS
    store.close()
    assert not store._open


def test_store_reads_right_without_preadv(tmp_path, monkeypatch):
    """Platforms without os.preadv read row by row with os.pread."""
    store, rows = synthetic_store(tmp_path / "c")
    monkeypatch.delattr(trunk_cache.os, "preadv")
    assert np.array_equal(store[np.array([15, 0, 1, 2, 7, 7])], rows[[15, 0, 1, 2, 7, 7]])


def test_a_chunk_cut_short_while_in_use_is_an_error_naming_it(tmp_path):
    store, rows = synthetic_store(tmp_path / "c", chunk_sizes=(6,))
    array_file = next((tmp_path / "c").glob("chunk-*.npy"))
    array_file.write_bytes(array_file.read_bytes()[:-rows[0].nbytes - 5])  # its last row and a bit gone
    assert np.array_equal(store[np.arange(4)], rows[:4])
    with pytest.raises(trunk_cache.PipelineError, match="cut short"):  # one error line, not a traceback
        store[np.array([5])]


def test_rows_gathers_batches_in_place_and_counts_them():
    rows = dataloader.Rows(5, np.float32)
    rows.add(torch.arange(6.).reshape(3, 2))
    rows.add(np.array([[6, 7], [8, 9]], dtype=np.int64))
    assert rows.result().dtype == np.float32 and np.array_equal(rows.result(), np.arange(10.).reshape(5, 2))
    short = dataloader.Rows(3)
    short.add(np.zeros((2, 4)))
    with pytest.raises(RuntimeError, match="2 rows gathered, 3 expected"):
        short.result()
    assert dataloader.Rows(0).result().shape == (0, 0)


def test_content_keys_compute_identical_files_once_and_survive_a_touch(tmp_path, images, monkeypatch):
    trunk = new_trunk()
    shutil.copy(images / "a/img_000.png", images / "a/copy.png")
    relpaths = relpaths_of(images)
    keys = [hashlib.sha256((images / r).read_bytes()).hexdigest() for r in relpaths]
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16")
    expected = direct(trunk, images, relpaths)
    computed = count_trunk_images(monkeypatch)
    store = cache.features(images, relpaths, keys=keys)
    assert sum(computed) == len(relpaths) - 1
    # other batches than direct()'s (one image fewer): equal to float16 rounding, not bit for bit
    np.testing.assert_allclose(store[np.arange(len(store))], expected, rtol=1e-2, atol=1e-2)
    (images / "a/img_001.png").touch()  # a new modification time, the same content
    cache.features(images, relpaths, keys=keys)
    assert sum(computed) == len(relpaths) - 1
    cache.features(images, relpaths)  # no keys: relative path, size and modification time
    assert sum(computed) == 2 * len(relpaths) - 1
    with pytest.raises(ValueError):
        cache.features(images, relpaths[:2], keys=["one", "two\nlines"])


# ---- torn, incomplete and killed writes -------------------------------------------------------

def truncate_array(keys_file):
    array_file = keys_file.with_suffix(".npy")
    array_file.write_bytes(array_file.read_bytes()[:-100])


def extra_key_first(keys_file):  # if it were served, every row would be another image's
    keys_file.write_text("an/extra/line.png|1|1\n" + keys_file.read_text())


def keys_not_yet_written(keys_file):  # a writer killed between its array and its keys
    keys_file.unlink()


@pytest.mark.parametrize("tear", [truncate_array, extra_key_first, keys_not_yet_written])
def test_a_torn_chunk_is_named_and_recomputed_never_served(tmp_path, images, monkeypatch, capsys, tear):
    trunk, relpaths = new_trunk(), relpaths_of(images)
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16", chunk_rows=16)
    cache.features(images, relpaths)
    first_chunk = chunk_files(cache.folder(images))[0]
    tear(first_chunk)
    capsys.readouterr()
    computed = count_trunk_images(monkeypatch)
    store = cache.features(images, relpaths)
    assert sum(computed) == 16  # that chunk's images, no more
    assert np.array_equal(store[np.arange(len(store))], direct(trunk, images, relpaths))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "torn" in line]
    if tear is keys_not_yet_written:
        assert warnings == []  # an incomplete write is not an error
    else:
        assert len(warnings) == 1 and first_chunk.stem in warnings[0]
        assert first_chunk.is_file()  # left for the cleanup


def test_a_pass_killed_after_a_chunk_keeps_it_and_the_restart_computes_only_the_rest(tmp_path, images,
                                                                                      monkeypatch):
    trunk, relpaths = new_trunk(), relpaths_of(images)
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16", chunk_rows=16)
    count_trunk_images(monkeypatch, kill_after_batches=3)  # batches of 8: one chunk written, one batch lost
    with pytest.raises(Killed):
        cache.features(images, relpaths)
    folder = cache.folder(images)
    assert len(chunk_files(folder)) == 1 and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    computed = count_trunk_images(monkeypatch)
    store = cache.features(images, relpaths)
    assert sum(computed) == len(relpaths) - 16
    assert np.array_equal(store[np.arange(len(store))], direct(trunk, images, relpaths))


# ---- two writers at once, in two processes ---------------------------------------------------

def _writer(cache_dir, root, relpaths, lock, barrier, results):
    """One run: its own process, its own trunk, started at the same moment as the other."""
    torch.set_num_threads(1)
    counted = []
    dataloader.run_trunk = lambda trunk, batch, runtime: counted.append(len(batch)) or RUN_TRUNK(trunk, batch, runtime)
    cache = trunk_cache.TrunkCache(cache_dir, new_trunk(), "sha", PREPROCESS, RUNTIME, "float16", chunk_rows=8,
                                   lock=lock)
    barrier.wait()
    cache.features(root, relpaths)
    results.put(sum(counted))


@pytest.mark.parametrize("lock", [False, True])
def test_two_runs_filling_one_folder_at_once_leave_every_image_right(tmp_path, images, lock):
    """Without the lock both runs compute and append (one in reverse order, so their chunks
    interleave); with it the second finds the first's work. Either way every key's rows are right."""
    trunk, relpaths = new_trunk(), relpaths_of(images)
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    runs = [context.Process(target=_writer, args=(tmp_path / "cache", images, order, lock, barrier, results))
            for order in (relpaths, relpaths[::-1])]
    for run in runs:
        run.start()
    computed = sorted(results.get(timeout=240) for _ in runs)
    for run in runs:
        run.join(timeout=60)
        assert run.exitcode == 0
    if lock:
        assert sum(computed) == len(relpaths)  # no image computed twice
    cache = trunk_cache.TrunkCache(tmp_path / "cache", trunk, "sha", PREPROCESS, RUNTIME, "float16")
    folder = cache.folder(images)
    expected = direct(trunk, images, relpaths)
    for keys_file in chunk_files(folder):  # every chunk, not just the one a reader happens to pick
        rows = np.load(keys_file.with_suffix(".npy"))
        for key, row in zip(keys_file.read_text().splitlines(), rows):
            np.testing.assert_allclose(row, expected[relpaths.index(key.split("|")[0])], rtol=1e-2, atol=1e-2)
    store = cache.features(images, relpaths)
    np.testing.assert_allclose(store[np.arange(len(store))], expected, rtol=1e-2, atol=1e-2)
