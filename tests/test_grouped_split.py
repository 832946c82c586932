"""Grouped splits (GROUP_BY): every image of a group in one subset, stratified by class as far as the
groups allow, a warning naming classes with too few groups, the group in split.csv, and a changed or
impossible GROUP_BY as one error line."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import dir_args, one_error_line, tiny_config
from PIL import Image

import train
from plankton import locations, splits
from plankton.errors import PipelineError


def grouped_folder(root: Path, groups_per_class: dict[str, int], per_group: int = 3) -> Path:
    """root/<class>/tow_<j>/img_<i>.png: `per_group` tiny images in each tow folder; tows are named
    across classes (tow_0 of class a and tow_0 of class b are one group with path:2)."""
    rng = np.random.default_rng(0)
    for name, n_groups in groups_per_class.items():
        for j in range(n_groups):
            folder = root / name / f"tow_{j}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_group):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"img_{i}.png")
    return root


def draw(tmp_path, folder, create=True, **settings):
    cfg = tiny_config(tmp_path, folder, **settings)
    return splits.split_from_settings(cfg, locations.prepare_output_dirs(cfg), create=create)


def test_assign_groups_keeps_groups_whole_and_near_the_fractions():
    rng = np.random.default_rng(1)
    group_ids = rng.integers(0, 300, 3000).astype(str)
    labels = rng.integers(0, 4, 3000)
    subset = splits.assign_groups(labels, group_ids, (0.75, 0.05, 0.2), seed=0)
    per_group = pd.DataFrame(dict(g=group_ids, s=subset)).groupby("g").s.nunique()
    assert (per_group == 1).all()
    for c in range(4):
        shares = np.bincount(subset[labels == c], minlength=3) / (labels == c).sum()
        assert np.allclose(shares, (0.75, 0.05, 0.2), atol=0.05), (c, shares)


def test_a_class_with_three_groups_gets_one_in_each_subset():
    labels = np.array([0] * 90 + [1] * 9)  # class 1: three groups of 3 images
    group_ids = np.array([f"big{i // 3}" for i in range(90)] + ["r0"] * 3 + ["r1"] * 3 + ["r2"] * 3)
    subset = splits.assign_groups(labels, group_ids, (0.75, 0.05, 0.2), seed=0)
    assert set(subset[labels == 1]) == {0, 1, 2}


def test_grouped_split_records_groups_and_warns_of_classes_with_few_groups(tmp_path, capsys):
    folder = grouped_folder(tmp_path / "images", {"a": 12, "b": 8, "c": 1, "u": 2, "v": 2})
    split = draw(tmp_path, folder, GROUP_BY="path:2")
    table = pd.read_csv(tmp_path / "outputs" / "split.csv", dtype=str)
    assert list(table.columns) == ["relpath", "class_name", "subset", "sha256", "group"]
    assert (table.group == table.relpath.map(lambda p: Path(p).parts[1])).all()
    seen = table[table.subset != "unseen"]
    assert (seen.groupby("group").subset.nunique() == 1).all()  # no tow on two sides
    assert set(seen.subset[seen.class_name == "a"]) == {"train", "val", "test"}
    assert set(seen.subset[seen.class_name == "c"]) == {"train"}  # one tow: train only
    warning = [line for line in capsys.readouterr().err.splitlines() if "GROUP_BY" in line]
    assert len(warning) == 1 and "'c' (1 group: no val/test images)" in warning[0] and "'a'" not in warning[0]
    assert split.subset("train")[0]  # the split reads back, groups and all
    draw(tmp_path, folder, create=False, GROUP_BY="path:2")  # the same GROUP_BY: trusted


def test_a_changed_group_by_is_detected(tmp_path):
    folder = grouped_folder(tmp_path / "images", {"a": 4, "b": 4, "c": 4, "u": 1, "v": 1})
    draw(tmp_path, folder, GROUP_BY="path:2")
    with pytest.raises(PipelineError, match="GROUP_BY is None now"):
        draw(tmp_path, folder, create=False, GROUP_BY=None)
    with pytest.raises(PipelineError, match="other groups than GROUP_BY='path:1'"):
        draw(tmp_path, folder, create=False, GROUP_BY="path:1")
    (tmp_path / "outputs" / "split.csv").unlink()
    draw(tmp_path, folder)  # drawn image by image
    with pytest.raises(PipelineError, match="drawn image by image"):
        draw(tmp_path, folder, create=False, GROUP_BY="path:2")


def test_groups_from_a_csv_column(tmp_path):
    folder = grouped_folder(tmp_path / "images", {"a": 3, "b": 3, "c": 3, "u": 1, "v": 1}, per_group=4)
    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    csv = tmp_path / "meta.csv"
    pd.DataFrame(dict(path=paths, station=[f"st{i % 5}" for i in range(len(paths))])).to_csv(csv, index=False)
    draw(tmp_path, folder, GROUP_BY="csv:station", GROUP_CSV=str(csv))
    table = pd.read_csv(tmp_path / "outputs" / "split.csv", dtype=str)
    assert set(table.group) == {f"st{i}" for i in range(5)}
    assert (table[table.subset != "unseen"].groupby("group").subset.nunique() == 1).all()


def test_groups_from_ecotaxa_sample_id(tmp_path):
    from test_ecotaxa import tiny_export  # samples of 5 objects: s0, s1, ... per class
    tsv = tiny_export(tmp_path / "export", {"a": 15, "b": 15, "c": 15, "u": 5, "v": 5}, statuses=("validated",))
    draw(tmp_path, None, ECOTAXA_EXPORT=str(tsv), ECOTAXA_MIN_COUNT=3, GROUP_BY="sample_id")
    table = pd.read_csv(tmp_path / "outputs" / "split.csv", dtype=str)
    objects = pd.read_csv(tmp_path / "outputs" / "ecotaxa_objects.csv", dtype=str)
    assert dict(zip(table.relpath, table.group)) == dict(zip(objects.relpath, objects.sample_id))
    assert (table[table.subset != "unseen"].groupby("group").subset.nunique() == 1).all()
    assert set(table.subset[table.class_name == "a"]) == {"train", "val", "test"}  # three samples: one each


@pytest.mark.parametrize("settings, words", [
    (["--GROUP_BY=path:3"], "has no level 3"),
    (["--GROUP_BY=csv:station", "--GROUP_CSV={meta}"], "has no column 'station'"),
    (["--GROUP_BY=csv:station"], "needs GROUP_CSV"),
    (["--GROUP_BY=sample_id"], "comes with ECOTAXA_EXPORT"),
    (["--GROUP_BY=tow"], "GROUP_BY='tow': must be"),
])
def test_bad_group_by_is_one_error_line(tmp_path, capsys, settings, words):
    folder = grouped_folder(tmp_path / "images", {"a": 3, "b": 3, "c": 3, "u": 1, "v": 1}, per_group=1)
    meta = tmp_path / "meta.csv"
    meta.write_text("path,tow\na/tow_0/img_0.png,1\n")
    argv = [f"--DATA_DIR={folder}", "--SEEN_CLASSES=['a','b','c']", "--UNSEEN_CLASSES=['u','v']",
            "--WEIGHTS=None", "--DEVICE=cpu", *dir_args(tmp_path)] + [s.format(meta=meta) for s in settings]
    line = one_error_line(capsys, train.main, argv)
    assert words in line, line
    assert not (tmp_path / "outputs" / "split.csv").exists()
