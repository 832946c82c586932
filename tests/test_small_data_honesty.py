"""Small-data honesty: a temperature fitted on a few validation images is applied only when it does not
make the test images' calibration worse; an unknown flag resting on too few validation images or on a
weak open-set score is said in one warning line (predict.py's output, predictions.json, the report)."""
import json

import numpy as np
import pandas as pd
import pytest

import report
from plankton import calibrate, locations, openset


def _drawn(seed: int, n: int, scale: float):
    """Labels drawn from softmax(z); the model reports scale * z (calibrated when scale = 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5)) * 1.5
    p = calibrate.probabilities(z)
    return scale * z, np.array([rng.choice(5, p=row) for row in p])


def test_a_temperature_that_makes_the_test_ece_worse_is_not_applied():
    val_logits, val_labels = _drawn(0, 6, 1.0)
    val_logits[0, val_labels[0]] -= 12.0  # one confident mistake among six images: the fitted T is large
    test_logits, test_labels = _drawn(1, 2000, 1.0)  # and the test images are calibrated at T = 1
    choice = calibrate.choose_temperature(val_logits, val_labels, test_logits, test_labels)
    assert choice.fitted > 2 and not choice.applied and choice.temperature == 1.0
    assert choice.held_out_ece_fitted > choice.held_out_ece_at_1
    assert choice.held_out_ece_at_1 == pytest.approx(
        calibrate.expected_calibration_error(calibrate.probabilities(test_logits), test_labels))
    assert "NOT applied" in choice.note and "\n" not in choice.note
    record = choice.record()
    assert record["decided_on"] == "test" and record["applied"] is False and record["fitted"] == choice.fitted


def test_a_temperature_that_helps_is_applied():
    val_logits, val_labels = _drawn(2, 400, 4.0)  # overconfident by 4 on both sets
    test_logits, test_labels = _drawn(3, 1000, 4.0)
    choice = calibrate.choose_temperature(val_logits, val_labels, test_logits, test_labels)
    assert choice.applied and choice.temperature == choice.fitted and 3 < choice.temperature < 5.5
    assert choice.held_out_ece_fitted < choice.held_out_ece_at_1


def test_an_unfitted_temperature_stays_1_and_says_why():
    logits = np.array([[3.0, 0.0], [0.0, 2.0]])
    choice = calibrate.choose_temperature(logits, np.array([0, 1]), logits, np.array([0, 1]))
    assert choice.temperature == 1.0 and choice.fitted is None and "predicted correctly" in choice.note


@pytest.mark.parametrize("val_images, auroc, words", [
    (5, None, ["only 5 validation images"]),
    (500, 0.55, ["AUROC is 0.55"]),
    (12, 0.5, ["only 12 validation images", "AUROC is 0.50"]),
    (20, 0.6, []),
    (500, None, []),
])
def test_one_warning_line_when_the_unknown_flag_rests_on_little(val_images, auroc, words):
    line = openset.small_data_warning(val_images, auroc, "knn")
    assert "\n" not in line
    assert bool(line) == bool(words) and all(w in line for w in words)


def test_the_recorded_auroc_needs_a_vouched_for_table(tmp_path):
    paths = locations.Paths(tmp_path, tmp_path / "checkpoints", tmp_path / "cache")
    assert openset.recorded_auroc(paths, "knn") is None  # no table
    pd.DataFrame(dict(score=["knn"], auroc=[0.52])).to_csv(tmp_path / "open_set_scores.csv", index=False)
    assert openset.recorded_auroc(paths, "knn") is None  # no provenance record vouches for it


def test_the_report_shows_predicts_warnings(tmp_path):
    paths = locations.Paths(tmp_path, tmp_path / "checkpoints", tmp_path / "cache")
    (tmp_path / "predictions").mkdir()
    line = openset.small_data_warning(3, None, "knn")
    (tmp_path / "predictions" / "predictions.json").write_text(json.dumps(dict(warnings=[line])))
    shown = report.predict_warnings(paths)  # at the top of the predict section (report.INTERACTIVE)
    assert shown.count('class="warn"') == 1 and "only 3 validation images" in shown
    assert "only 3 validation images" in report.INTERACTIVE["predict"](paths)
    (tmp_path / "predictions" / "predictions.json").write_text("{not json")
    assert report.predict_warnings(paths) == ""
