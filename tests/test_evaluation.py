"""evaluate.py's metrics and per-image predictions, reproduce.py and ranked_images.py: metrics against
scikit-learn and a direct computation on a hand-made case, the files' columns and rows, the
reproduction check passing on a fresh run and failing on a tampered scores file, the ranked selection
on a hand-made score table, and a seen class of 3 images (1 test image) through all three."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import dir_args, make_image_folder, one_error_line, tiny_config
from PIL import Image
from sklearn.metrics import average_precision_score, balanced_accuracy_score, precision_recall_fscore_support

import evaluate
import ranked_images
import reproduce
import train
from plankton import fileio, locations, metrics, provenance, runner, saved_predictions
from plankton.errors import PipelineError

# a hand-made case: 8 test images of 3 classes; class 2 is never predicted
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
SCORES = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1],
                   [0.6, 0.3, 0.1], [0.5, 0.2, 0.3], [0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])


def brute_force_ap(positive: np.ndarray, score: np.ndarray) -> float:
    """Mean over positives of the precision among the images scored at least as high (ties count as
    higher, as scikit-learn counts them)."""
    return float(np.mean([(positive & (score >= score[i])).sum() / (score >= score[i]).sum()
                          for i in np.flatnonzero(positive)]))


def test_metrics_equal_sklearn_and_a_direct_computation():
    predicted = SCORES.argmax(1)  # [0, 0, 1, 1, 0, 0, 1, 0]
    table = metrics.metrics_table(LABELS, predicted, SCORES, ["a", "b", "c"])
    precision, recall, f1, _ = precision_recall_fscore_support(LABELS, predicted, labels=[0, 1, 2], zero_division=0)
    np.testing.assert_allclose(table.precision[:3], precision)
    np.testing.assert_allclose(table.recall[:3], recall)
    np.testing.assert_allclose(table.f1[:3], f1)
    # by hand: class 0 predicted 5 times, 2 of them right; class 1 predicted 3 times, 1 right; class 2 never
    np.testing.assert_allclose(table.precision[:3], [2 / 5, 1 / 3, 0])
    np.testing.assert_allclose(table.recall[:3], [2 / 3, 1 / 2, 0])
    aps = [average_precision_score(LABELS == c, SCORES[:, c]) for c in range(3)]
    np.testing.assert_allclose(table.average_precision[:3], aps)
    # class 1: its images are scored 0.8 (rank 1) and 0.3 (rank 5 of 0.8, 0.7, 0.5, 0.4, 0.3, ...)
    assert aps[1] == pytest.approx((1 / 1 + 2 / 5) / 2)
    np.testing.assert_allclose(aps[:2], [brute_force_ap(LABELS == c, SCORES[:, c]) for c in (0, 1)])
    overall = table.iloc[-1]
    assert overall.class_name == "overall" and overall.n_test == 8 and overall.correct == 3
    assert overall.accuracy == pytest.approx(3 / 8)
    assert overall.precision == pytest.approx(np.mean(precision))
    assert overall.recall == pytest.approx(np.mean(recall))
    assert overall.f1 == pytest.approx(np.mean(f1))
    assert overall.average_precision == pytest.approx(np.mean(aps))
    assert overall.balanced_accuracy == pytest.approx(balanced_accuracy_score(LABELS, predicted))
    assert overall.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert table.balanced_accuracy[:3].isna().all()  # an overall-only metric


def test_softmax_sums_to_one_and_keeps_the_argmax():
    logits = np.array([[1000.0, 999.0, -5.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    scores = evaluate.softmax(logits)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores.sum(1), 1, rtol=1e-6)
    np.testing.assert_allclose(scores[0, :2], [1 / (1 + np.e ** -1), 1 / (1 + np.e)], rtol=1e-6)
    np.testing.assert_allclose(scores[1], 1 / 3, rtol=1e-6)


def _predictions(labels, scores, names=("a", "b", "c")) -> saved_predictions.Predictions:
    return saved_predictions.Predictions(np.log(scores).astype(np.float32), scores.astype(np.float32), labels,
                                 [f"x/{i}.png" for i in range(len(labels))], list(names), "/nowhere", "0" * 64)


def test_misclassified_lists_the_most_confident_mistakes_first():
    wrong = evaluate.misclassified(_predictions(LABELS, SCORES))
    assert list(wrong) == [2, 4, 5, 6, 7]  # scores of the predicted class 0.7, 0.6, 0.5, 0.5 (tie: file order), 0.4


def test_ranked_selection_on_a_hand_made_score_table():
    labels = np.array([0, 1, 0, 0, 1, 1, 0])
    scores = np.array([[.9, .1], [.8, .2], [.2, .8], [.6, .4], [.95, .05], [.1, .9], [.4, .6]])
    high, low = ranked_images.ranked(scores, labels, 0, "class", count=2)
    assert list(high) == [0, 3] and list(low) == [2, 6]
    high, low = ranked_images.ranked(scores, labels, 0, "all", count=3)
    assert list(high) == [4, 0, 1] and list(low) == [5, 2, 6]
    high, low = ranked_images.ranked(scores, labels, 1, "class", count=10)  # fewer than asked: all of them
    assert list(high) == [5, 1, 4] and list(low) == [4, 1, 5]


def test_ranked_classes_and_file_names():
    assert ranked_images.chosen_classes([], ["a", "b"]) == [0, 1]
    assert ranked_images.chosen_classes(["b"], ["a", "b"]) == [1]
    with pytest.raises(PipelineError, match=r"'zz' not among the seen classes \(a, b\)"):
        ranked_images.chosen_classes(["b", "zz"], ["a", "b"])
    assert ranked_images.file_name(3, "Rhabdo/nell idae?") == "ranked_3_Rhabdo_nell_idae_.png"
    assert ranked_images.file_name(0, "..") == "ranked_0_class.png"



def test_a_bad_ranked_classes_setting_is_one_line_naming_the_classes(tmp_path, capsys):
    line = one_error_line(capsys, ranked_images.main, [*dir_args(tmp_path), "--RANKED_CLASSES=['0', 'zz']"])
    assert "RANKED_CLASSES" in line and "'zz'" in line and "0, 1, 2, 3, 4, 5" in line, line
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny model trained for one epoch and evaluated; seen class "c" has 3 images (1 test image)."""
    tmp = tmp_path_factory.mktemp("evaluated")
    folder = make_image_folder(tmp / "images", {"a": 16, "b": 16, "c": 3, "u": 6, "v": 6})
    cfg = tiny_config(tmp, folder, MAX_EPOCHS=1)
    train.run(cfg)
    evaluate.run(cfg)
    return cfg, locations.Paths.from_settings(cfg)


def test_predictions_files_hold_every_test_image_once(evaluated):
    cfg, paths = evaluated
    table = pd.read_csv(paths.predictions, dtype={"path": str})
    split = pd.read_csv(paths.split)
    test = split[split.subset == "test"]
    assert list(table.columns) == ["path", "true_class", "predicted_class", "score_a", "score_b", "score_c"]
    assert list(table.path) == list(test.relpath) and list(table.true_class) == list(test.class_name)
    assert (table.true_class == "c").sum() == 1
    saved = saved_predictions.open_predictions(paths)
    assert saved.scores.dtype == np.float32 and saved.logits.dtype == np.float32
    np.testing.assert_array_equal(saved.scores, table[["score_a", "score_b", "score_c"]].to_numpy(np.float32))
    np.testing.assert_allclose(saved.scores.sum(1), 1, rtol=1e-5)
    assert list(table.predicted_class) == [saved.class_names[i] for i in saved.predicted]
    written = pd.read_csv(paths.out / "test_metrics.csv")
    direct = metrics.metrics_table(saved.labels, saved.predicted, saved.scores, saved.class_names)
    pd.testing.assert_frame_equal(written, direct, check_dtype=False)
    record = json.loads(provenance.provenance_path(paths, "evaluate").read_text())
    assert sorted(record["outputs"]) == sorted(["test_metrics.csv", "test_metrics.json", "confusion_matrix.png",
                                                "misclassified_test_images.png", "test_predictions.csv",
                                                "test_predictions.parquet", "test_scores.npz", "tail_accuracy.csv",
                                                "tail_accuracy.png"])
    assert Image.open(paths.out / "misclassified_test_images.png").size[0] > 300


def test_reproduction_passes_on_a_fresh_run_and_fails_on_a_tampered_score(evaluated, capsys):
    cfg, paths = evaluated
    argv = [f"--OUTPUT_DIR={cfg.OUTPUT_DIR}", f"--CHECKPOINT_DIR={cfg.CHECKPOINT_DIR}"]
    reproduce.run(cfg)
    check = json.loads((paths.out / "reproduction_check.json").read_text())
    assert check["passed"] and check["overall"]["max_abs_score_difference"] <= cfg.REPRO_TOLERANCE
    assert check["overall"]["same_prediction_share"] == 1.0
    table = pd.read_csv(paths.out / "reproduction_check.csv")
    assert list(table.class_name) == ["a", "b", "c", "overall"] and (table.ap_difference <= 1e-6).all()
    original = paths.scores.read_bytes()
    try:
        with np.load(paths.scores) as stored:
            arrays = dict(stored)
        arrays["scores"][0, 0] += 0.25  # one score edited
        with open(paths.scores, "wb") as handle:
            np.savez(handle, **arrays)
        line = one_error_line(capsys, lambda a: runner.run_script(lambda _s: reproduce.run(cfg), a), argv)
        assert "reproduction check failed" in line and "0.25" in line and "REPRO_TOLERANCE" in line, line
        failed = json.loads((paths.out / "reproduction_check.json").read_text())
        assert not failed["passed"] and failed["overall"]["max_abs_score_difference"] == pytest.approx(0.25, abs=1e-6)
    finally:
        paths.scores.write_bytes(original)


def test_predictions_of_another_checkpoint_are_refused(evaluated, tmp_path):
    cfg, paths = evaluated
    other = locations.Paths(paths.out, tmp_path, paths.cache)
    fileio.save_torch({"stand_in": np.zeros(1).tolist()}, other.best)
    with pytest.raises(PipelineError, match="another checkpoint.*re-run evaluate.py"):
        saved_predictions.open_predictions(other)


@pytest.mark.parametrize("among", ["class", "all"])
def test_ranked_images_of_a_class_with_one_test_image(evaluated, among):
    cfg, paths = evaluated
    cfg.RANKED_AMONG, cfg.RANKED_CLASSES = among, ["c", "a"]
    ranked_images.run(cfg)
    record = json.loads(provenance.provenance_path(paths, "ranked_images").read_text())
    assert sorted(record["outputs"]) == ["ranked_0_a.png", "ranked_2_c.png"]
    assert Image.open(paths.out / "ranked_2_c.png").size[0] > 1000


def test_no_misclassified_images_is_a_panel_saying_so(tmp_path):
    labels = np.array([0, 1, 2])
    path = tmp_path / "gallery.png"
    evaluate.plot_misclassified(_predictions(labels, np.eye(3) * 0.9 + 0.05), tmp_path, path)
    assert Image.open(path).size[0] > 300
