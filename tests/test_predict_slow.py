"""Slow tests (`pytest -m slow`): predict.py, open_set.py and calibration.py on a trained tiny model."""
import json
import shutil
import subprocess

import pandas as pd
import pytest
from conftest import PYTHON, REPO, dir_args, env, make_image_folder
from PIL import Image

import calibration
import evaluate
import open_set
import predict
import train
from plankton import abundance, calibrate, locations, openset, provenance

pytestmark = pytest.mark.slow


def _mixed_folder(tmp_path):
    """New images never trained on: 6 of each seen class and of each unseen class, at two depths,
    and one corrupt file."""
    fresh = make_image_folder(tmp_path / "fresh", {"a": 6, "b": 6, "c": 6, "u": 6, "v": 6}, size=24, seed=11)
    mixed = tmp_path / "new_campaign"
    for i, cls in enumerate(["a", "b", "c", "u", "v"]):
        target = mixed / ("day1" if i % 2 else "day2/station")
        target.mkdir(parents=True, exist_ok=True)
        for image in sorted((fresh / cls).iterdir()):
            shutil.copy(image, target / f"{cls}_{image.name}")
    (mixed / "day1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return mixed


def test_predict_flags_unseen_images_and_lists_the_corrupt_one(tmp_path, tiny_cfg, capsys):
    tiny_cfg.MAX_EPOCHS = 6
    train.run(tiny_cfg)
    paths = locations.Paths.from_settings(tiny_cfg)
    split_before, best_before = paths.split.read_bytes(), paths.best.read_bytes()
    tiny_cfg.PREDICT_DIR = str(_mixed_folder(tmp_path))
    predict.run(tiny_cfg)
    out = paths.predictions_dir
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 30 and {"top1_class", "top3_score", "open_set_score", "unknown", "sha256"} <= set(table.columns)
    assert table.path.str.startswith(("day1/", "day2/station/")).all()
    assert set(table.route) <= {"confident", "to review"} and (table.route[table.unknown] == "to review").all()
    bad = pd.read_csv(out / "bad_files.csv")
    assert bad.path.tolist() == ["day1/corrupt.png"]
    assert "1 unreadable file(s)" in capsys.readouterr().err
    seen = table.path.str.contains("/[abc]_")
    assert table.unknown[~seen].sum() > table.unknown[seen].sum()
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["bad_files"] == 1 and summary["images_predicted"] == 30 and summary["open_set_score"] == "knn"
    assert summary["flagged_unknown"] == int(table.unknown.sum()) and summary["val_kept"] >= tiny_cfg.PREDICT_KEEP
    assert Image.open(out / "predictions.png").size[0] > 300
    assert paths.split.read_bytes() == split_before and paths.best.read_bytes() == best_before
    record = json.loads(provenance.provenance_path(paths, "predict").read_text())
    assert set(record["outputs"]) == {"predictions/predictions.csv", "predictions/predictions.json",
                                      "predictions/bad_files.csv", "predictions/predictions.png",
                                      "predictions/ecotaxa_import.tsv", "predictions/abundance.csv",
                                      "predictions/abundance_ecotaxa.tsv", "predictions/abundance.png"}
    assert provenance.stale_outputs(paths, "predict") == []
    found = pd.read_csv(out / "abundance.csv")  # two samples: the two folders
    assert sorted(found["sample"].unique()) == ["day1", "day2_station"]
    assert set(found.estimator) == set(abundance.ESTIMATORS) and set(found.taxon) == {"a", "b", "c"}
    cc = found[found.estimator == "cc"].groupby("sample")
    assert (cc["count"].sum() + cc.flagged_unknown.first()).tolist() == [12, 18]  # b, u in day1; a, c, v in day2
    assert summary["warnings"] and "validation images" in summary["warnings"][0]  # 3 validation images
    assert summary["temperature_choice"]["decided_on"] == "test"

    tiny_cfg.PREDICT_EMBEDDINGS = True  # again, with embeddings, from the trunk cache
    predict.run(tiny_cfg)
    again = pd.read_csv(out / "predictions.csv")
    assert [f"e{i}" for i in range(128)] == [c for c in again.columns if c.startswith("e") and c[1:].isdigit()]
    pd.testing.assert_frame_equal(again[table.columns], table, check_exact=False, atol=1e-6)

    evaluate.run(tiny_cfg)  # open_set and calibration run and record what they wrote
    open_set.run(tiny_cfg)
    calibration.run(tiny_cfg)
    scores = pd.read_csv(paths.out / "open_set_scores.csv")
    assert scores.score.tolist() == list(openset.SCORES) and scores.auroc.between(0, 1).all()
    table = pd.read_csv(paths.out / "calibration.csv")
    assert table[["subset", "when"]].values.tolist() == [["val", "before"], ["val", "after"], ["test", "before"],
                                                          ["test", "after"]]
    val = table[table.subset == "val"].set_index("when")
    assert val.nll["after"] <= val.nll["before"] + 1e-9  # fitted there: it can only lower the NLL
    assert calibrate.BINS == 15 and provenance.stale_outputs(paths, "calibration") == []
    choice = json.loads((paths.out / "calibration.json").read_text())["temperature_choice"]
    assert set(choice) >= {"fitted", "applied", "held_out_ece_at_1", "held_out_ece_fitted", "decided_on"}


def test_predict_command_line_bad_folder_is_one_error_line(tmp_path):
    done = subprocess.run([PYTHON, "predict.py", f"--PREDICT_DIR={tmp_path / 'nowhere'}",
                                         *dir_args(tmp_path)], cwd=REPO, env=env(), capture_output=True, text=True,
                                        timeout=300)
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: PREDICT_DIR=") and "not a folder" in lines[0], done.stderr
    assert "Traceback" not in done.stdout
