"""What run_all.py's stages share in one process (a split read and checked once, the scan cache parsed
once, the imported modules frozen) must never hand a stage a stale or shared answer: a file changed
between stages, even with its size and times put back, is read and checked again."""
import gc
import os
import weakref

import pytest
from PIL import Image

from plankton import images, system
from plankton.errors import PipelineError
from plankton.hashing import ContentMemo
from plankton.locations import Paths
from plankton.splits import prepare_split


def rewrite_keeping_times(path, data: bytes) -> None:
    """New bytes, same size, modification time put back: what a stat-keyed memo could miss."""
    before = os.stat(path)
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_content_memo_makes_again_for_new_bytes_or_inputs_and_keeps_no_failure(tmp_path):
    path, made = tmp_path / "f.txt", []
    path.write_bytes(b"abc")
    memo = ContentMemo()

    def make(data):
        made.append(data)
        if data == b"bad":
            raise ValueError("bad")
        return data.upper()

    assert memo.get(path, make, ("x",)) == memo.get(path, make, ("x",)) and made == [b"abc"]
    assert memo.get(path, make, ("y",))[0] == b"ABC" and len(made) == 2  # another input
    rewrite_keeping_times(path, b"abd")
    assert memo.get(path, make, ("y",))[0] == b"ABD" and len(made) == 3  # same size and times, new bytes
    rewrite_keeping_times(path, b"bad")
    for _ in range(2):  # a failure is raised each time, never remembered as a result
        with pytest.raises(ValueError):
            memo.get(path, make, ("y",))
    assert len(made) == 5


@pytest.fixture
def split_args(tmp_path, tiny_folder):
    paths = Paths(tmp_path / "outputs", tmp_path / "checkpoints", tmp_path / "cache")
    for folder in (paths.out, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True)
    return paths, tiny_folder.resolve(), ["a", "b", "c"], ["u", "v"]


def test_split_opened_again_is_a_copy_and_sees_every_change(split_args):
    paths, root, seen, unseen = split_args
    drawn = prepare_split(paths, root, seen, unseen, create=True)
    first = prepare_split(paths, root, seen, unseen, create=False)
    first.table.loc[:, "subset"] = "test"  # one stage changing its table changes nobody else's
    second = prepare_split(paths, root, seen, unseen, create=False)
    assert list(second.table.subset) == list(drawn.table.subset) and second.sha256 == drawn.sha256
    # split.csv edited between stages, same size and times: the new content, and its own SHA-256
    text = paths.split.read_text()
    i = text.index(",train,")
    swapped = text[:i] + ",tests," + text[i + 7:]  # an unknown subset, same length
    rewrite_keeping_times(paths.split, swapped.encode())
    with pytest.raises(PipelineError, match="subset 'tests'"):
        prepare_split(paths, root, seen, unseen, create=False)
    # a valid edit (one train and one test image swap subsets), same size and times: the new table
    j = text.index(",test,")
    (a, x), (b, y) = sorted([(i, (",train,", ",test,")), (j, (",test,", ",train,"))])
    edited = text[:a] + x[1] + text[a + len(x[0]):b] + y[1] + text[b + len(y[0]):]
    rewrite_keeping_times(paths.split, edited.encode())
    moved = prepare_split(paths, root, seen, unseen, create=False)
    assert moved.sha256 != drawn.sha256
    assert (moved.table.subset != drawn.table.subset).sum() == 2
    rewrite_keeping_times(paths.split, text.encode())
    assert prepare_split(paths, root, seen, unseen, create=False).sha256 == drawn.sha256


def test_split_checked_again_when_an_image_changes_between_stages(split_args):
    paths, root, seen, unseen = split_args
    prepare_split(paths, root, seen, unseen, create=True)
    prepare_split(paths, root, seen, unseen, create=False)
    image = root / "a" / "img_000.png"
    before = os.stat(image)
    Image.new("RGB", (24, 24), (9, 9, 9)).save(image)  # another readable image, its old times put back
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(PipelineError, match="1 modified"):
        prepare_split(paths, root, seen, unseen, create=False)
    (root / "b" / "img_000.png").unlink()
    with pytest.raises(PipelineError, match="removed"):
        prepare_split(paths, root, seen, unseen, create=False)


def test_scan_cache_read_once_per_content_and_read_only(tmp_path, tiny_folder):
    cache = tmp_path / "scan.csv"
    relpaths = images.list_class_images(tiny_folder)["a"]
    images.scan_images(tiny_folder, relpaths, cache)
    held = images._read_scan_cache(cache)
    assert len(held) == len(relpaths) and images._read_scan_cache(cache) is held
    with pytest.raises(TypeError):
        held[("x", 0, 0, 0, 0)] = ("", "")
    cache.write_text("not,the,columns\n")  # a changed cache is read again: here, one from another version
    assert len(images._read_scan_cache(cache)) == 0


class Node:
    pass


def test_stages_run_with_imports_frozen_yet_what_they_leave_is_collected():
    with system.imports_frozen():
        assert gc.get_freeze_count() > 0  # what existed before the stages: walked by no collection
        kept = Node()
        kept.me = kept  # a stage's leftovers: alive past one release, garbage (a cycle) later
        system.release_free_memory()
        gone = weakref.ref(kept)
        del kept
        system.release_free_memory()
        assert gone() is None, "an object made inside the block was frozen and never collected"
    assert gc.get_freeze_count() == 0  # the caller's objects are collected as before
