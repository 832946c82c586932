"""Spreadsheet formula injection (issue 19, item 4): a class, label or file name beginning with =, +,
-, @, a tab or a carriage return is written to every CSV with a leading apostrophe (OWASP), by the one
CSV writer (fileio.save_csv); numbers stay numbers; the pipeline's own readers (fileio.read_csv) give
back the names exactly, so a split drawn for a class folder named "+plus" still matches its images."""
import csv

import numpy as np
import pandas as pd
from conftest import make_image_folder, tiny_config

from plankton import fileio, images, locations, splits

HOSTILE = ["=cmd|' /C calc'!A0", "+plus", "-x", "@SUM(A1)", "\tTab", "\rcr", "'quoted", "plain", "-1.5", ""]


def raw_cells(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_formula_cells_are_neutralised_and_numbers_stay_numbers(tmp_path):
    frame = pd.DataFrame({"class_name": HOSTILE, "score": np.linspace(-2.5, 1, len(HOSTILE)),
                          "count": np.arange(-5, len(HOSTILE) - 5)})
    fileio.save_csv(frame, tmp_path / "t.csv", index=False)
    header, *rows = raw_cells(tmp_path / "t.csv")
    assert header == ["class_name", "score", "count"]
    names = [row[0] for row in rows]
    for written, name in zip(names, HOSTILE):
        runs_as_formula = name[:1] in ("=", "+", "-", "@", "\t", "\r")
        assert not written[:1] in ("=", "+", "-", "@", "\t", "\r"), written
        assert written == ("'" + name if runs_as_formula or name.startswith("'") else name)
    assert [float(row[1]) for row in rows] == list(frame.score)  # "-2.5" as a number, no apostrophe
    assert rows[0][2] == "-5"
    pd.testing.assert_frame_equal(fileio.read_csv(tmp_path / "t.csv", dtype={"class_name": str},
                                                  keep_default_na=False), frame)


def test_an_index_and_column_names_are_neutralised_too_and_read_back(tmp_path):
    names = ["=a", "-b", "c"]
    frame = pd.DataFrame(np.eye(3), index=pd.Index(names, name="class_name"), columns=names)
    fileio.save_csv(frame, tmp_path / "m.csv")
    header, *rows = raw_cells(tmp_path / "m.csv")
    assert header == ["class_name", "'=a", "'-b", "c"] and [row[0] for row in rows] == ["'=a", "'-b", "c"]
    pd.testing.assert_frame_equal(fileio.read_csv(tmp_path / "m.csv", index_col=0), frame)
    assert frame.index[0] == "=a"  # the caller's frame is left as it was


def test_a_split_for_class_folders_named_like_formulas_still_matches_its_images(tmp_path):
    seen, unseen = ["+plus", "-minus", "=eq"], ["@at", "plain"]
    root = make_image_folder(tmp_path / "images", {name: 10 for name in seen + unseen})
    cfg = tiny_config(tmp_path, root, SEEN_CLASSES=seen, UNSEEN_CLASSES=unseen)
    paths = locations.prepare_output_dirs(cfg)
    drawn = splits.prepare_split(paths, root, seen, unseen, create=True)
    assert not any(cell[:1] in "=+-@" for row in raw_cells(paths.split)[1:] for cell in row if cell)
    again = splits.prepare_split(paths, root, seen, unseen, create=False)  # checked against the images
    pd.testing.assert_frame_equal(again.table, drawn.table)
    assert set(again.table.class_name) == set(seen + unseen)
    relpaths, labels = again.subset("train")
    assert all((root / p).is_file() for p in relpaths) and set(labels) == {0, 1, 2}


def test_the_image_scan_cache_keeps_its_verdicts_for_such_names(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "images", {"-minus": 3, "=eq": 3})
    cache, report = tmp_path / "scan.csv", tmp_path / "bad.csv"
    wanted = ["-minus/img_000.png", "=eq/img_001.png"]
    images.scan_and_report(root, wanted, cache, report, "skip")
    checked = []
    monkeypatch.setattr(images, "_check_image", lambda path, size: checked.append(path) or ("", "0" * 64))
    images.scan_and_report(root, wanted, cache, report, "skip")
    assert checked == []  # both verdicts came from the cache: the names were read back as written
