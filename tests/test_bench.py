"""bench.py's measuring pieces (the benchmark itself is run by hand: its figures are not tests)."""
import sys

import numpy as np
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench  # noqa: E402


def test_the_owned_memory_sampler_sees_a_short_lived_allocation_and_not_a_mapped_file(tmp_path):
    mapped = tmp_path / "big.bin"
    mapped.write_bytes(b"\1" * (150 << 20))
    sampler = bench.AnonymousPeak()
    sampler.start()
    before = bench.rss_mib("RssAnon")
    pages = np.memmap(mapped, dtype=np.uint8, mode="r")
    assert int(pages[:: 4096].sum()) == (150 << 20) // 4096  # every page of the file read: file pages, not owned
    del pages
    owned = np.ones(200 << 20, dtype=np.uint8)  # 200 MiB owned for a moment, then freed
    bench.time.sleep(0.5)
    del owned
    peak = sampler.stop()
    assert 180 < peak - before < 290, (before, peak)


def test_decoding_measures_both_libraries_on_the_same_preprocessing(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    monkeypatch.setattr(bench, "DECODE_IMAGES", 4)
    preprocess = bench.dataloader.Preprocess(32, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    found = bench.measure_decoding(preprocess)
    libraries = ["pillow"] + bench.tensor_decoders()
    assert set(found["images_per_s"]) == {f"{lib}_{suffix}" for lib in libraries for suffix in ("png", "jpg")}
    assert all(rate > 0 for rate in found["images_per_s"].values())
    folder = tmp_path / f"decode_{bench.DECODE_SIDE}"
    assert len(list(folder.glob("*.png"))) == len(list(folder.glob("*.jpg"))) == 4
    # the torchvision path is the same preprocessing: same shape, nearly the same values (resampling differs)
    dataset = bench.dataloader.ImageDataset(folder, ["img_0001.png"], np.zeros(1), preprocess)
    mean = bench.torch.tensor(preprocess.mean).view(3, 1, 1)
    std = bench.torch.tensor(preprocess.std).view(3, 1, 1)
    ours = dataset[0][0]
    for library in bench.tensor_decoders():
        theirs = bench.tensor_item(folder / "img_0001.png", preprocess, mean, std, library)
        assert theirs.shape == ours.shape == (3, 32, 32)
        assert float((ours - theirs).abs().mean()) < 0.05 * float(ours.std()), library


def test_the_peak_starts_again_after_a_reset():
    """bench.py's per-stage peaks rest on this: VmHWM falls back to the current size."""
    block = np.ones(300 << 20, dtype=np.uint8)
    block[:: 4096] = 2  # every page touched
    del block
    high = bench.rss_mib("VmHWM")
    assert bench.reset_peak()
    assert high - bench.rss_mib("VmHWM") > 200, high
