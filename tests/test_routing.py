"""Per-class operating thresholds (plankton/routing.py): chosen on validation images for a target
precision, applied to new ones; and calibration.py's table and figure of them on the test set."""
import numpy as np
import pandas as pd
import pytest

import calibration
import evaluate
import train
from plankton import locations, routing


def _scores(rng, n, classes, accuracy):
    """Softmax-like scores whose top class is right with probability `accuracy`, right ones scoring higher."""
    labels = rng.integers(0, classes, n)
    right = rng.random(n) < accuracy
    predicted = np.where(right, labels, (labels + rng.integers(1, classes, n)) % classes)
    top = np.where(right, rng.uniform(0.6, 1.0, n), rng.uniform(0.35, 0.8, n))
    probs = np.full((n, classes), 0.0)
    probs[np.arange(n), predicted] = top
    rest = (1 - top) / (classes - 1)
    probs += np.where(probs == 0, rest[:, None], 0)
    return probs, labels


def test_each_threshold_keeps_the_longest_top_run_that_reaches_the_target():
    rng = np.random.default_rng(0)
    probs, labels = _scores(rng, 600, 3, accuracy=0.8)
    table = routing.class_thresholds(probs, labels, ["a", "b", "c"], target_precision=0.95)
    predicted, top = probs.argmax(1), probs.max(1)
    for c, row in table.iterrows():
        mine = predicted == c
        kept = mine & (top >= row.threshold)
        assert row.val_confident == kept.sum() and (labels[kept] == c).mean() >= 0.95
        # one more image (the next lower score) would fall below the target, or there is none
        lower = np.sort(top[mine & (top < row.threshold)])
        if len(lower):
            wider = mine & (top >= lower[-1])
            assert (labels[wider] == c).mean() < 0.95 or np.isclose(lower[-1], row.threshold)
    # new images: confident exactly when the predicted class's score reaches its threshold
    routes = routing.route(probs, table)
    assert set(routes) <= {routing.CONFIDENT, routing.REVIEW}
    assert (routes == routing.CONFIDENT).sum() == table.val_confident.sum()


def test_a_class_never_predicted_or_never_precise_enough_has_no_confident_predictions():
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0]])
    labels = np.array([1, 1, 0])  # class a's predictions are both wrong; c is never predicted
    table = routing.class_thresholds(probs, labels, ["a", "b", "c"], target_precision=0.9)
    assert np.isinf(table.threshold[0]) and "not reached" in table.note[0]
    assert np.isinf(table.threshold[2]) and "no validation image" in table.note[2]
    assert list(routing.route(probs, table)) == [routing.REVIEW, routing.REVIEW, routing.REVIEW]
    routed = routing.routing_table(probs, labels, table)
    assert routed.class_name.iloc[-1] == "all" and routed.test_coverage.iloc[-1] == 0


def test_calibration_writes_the_thresholds_table_and_figure(tmp_path, tiny_cfg):
    tiny_cfg.MAX_EPOCHS = 1
    train.run(tiny_cfg)
    evaluate.run(tiny_cfg)
    calibration.run(tiny_cfg)
    out = locations.Paths.from_settings(tiny_cfg).out
    table = pd.read_csv(out / "class_thresholds.csv")
    assert list(table.class_name) == ["a", "b", "c", "all"]
    assert table.test_coverage.dropna().between(0, 1).all()
    assert table.test_predicted.iloc[-1] == table.test_predicted.iloc[:-1].sum()
    assert (out / "class_thresholds.png").stat().st_size > 5_000


@pytest.mark.parametrize("value", ["0", "1.5"])
def test_a_target_precision_out_of_range_is_refused(value):
    from plankton import settings
    from plankton.errors import PipelineError
    with pytest.raises(PipelineError, match="ROUTE_PRECISION"):
        settings.load_settings([f"--ROUTE_PRECISION={value}"])
