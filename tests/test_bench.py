"""bench.py's measuring pieces (the benchmark itself is run by hand: its figures are not tests)."""
import numpy as np

import bench


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
