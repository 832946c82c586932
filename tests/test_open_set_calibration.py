"""Open-set scores and detection metrics, calibration metrics and temperature scaling, predict.py's
folder checks: against scikit-learn, scipy or a direct computation on small hand-made cases."""
import numpy as np
import pytest
from scipy.spatial.distance import mahalanobis
from sklearn.metrics import brier_score_loss, log_loss

import predict
from plankton import calibrate, hashing, locations, openset, registry, unlabelled
from plankton.errors import PipelineError

# ---- open-set ------------------------------------------------------------------------------------

def test_auroc_and_fpr95_on_a_hand_made_case():
    # unknown-scores: seen images low, unseen high, one unseen image hiding among the seen ones
    seen = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0])
    unseen = np.array([0.35, 2.5, 3.0, 3.5])
    found = openset.detection_metrics(seen, unseen)
    # pairs (seen, unseen) where the seen image scores lower: 3 unseen beat all 20; 0.35 beats 3 of them
    assert found["auroc"] == pytest.approx((3 * 20 + 3) / (20 * 4))
    # keeping 95% of the seen (19 of 20) means accepting scores up to 1.9: the unseen 0.35 is accepted
    assert found["fpr_at_95_tpr"] == pytest.approx(1 / 4)
    perfect = openset.detection_metrics(seen, np.array([2.5, 3.0]))
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0


def test_fpr95_counts_the_unseen_accepted_at_the_first_threshold_keeping_95_percent():
    rng = np.random.default_rng(0)
    seen, unseen = rng.normal(0, 1, 400), rng.normal(1.5, 1, 300)
    found = openset.detection_metrics(seen, unseen)
    cut = np.sort(seen)[int(np.ceil(0.95 * len(seen))) - 1]  # the 380th lowest seen score
    assert found["fpr_at_95_tpr"] == pytest.approx((unseen <= cut).mean())
    from sklearn.metrics import roc_auc_score
    pairs = (seen[:, None] < unseen[None, :]).mean()  # no ties among continuous draws
    assert found["auroc"] == pytest.approx(pairs) == pytest.approx(roc_auc_score(np.r_[np.zeros(400), np.ones(300)],
                                                                                  np.r_[seen, unseen]))


def test_keep_threshold_keeps_the_share_asked():
    scores = np.arange(20, 0, -1) / 10.0  # 2.0 … 0.1
    t = openset.keep_threshold(scores, 0.95)
    assert t == pytest.approx(1.9) and (scores <= t).sum() == 19
    assert openset.keep_threshold(scores, 1.0) == pytest.approx(2.0)
    assert (scores <= openset.keep_threshold(scores, 0.5)).sum() == 10


def test_energy_and_max_softmax_against_direct_computation():
    logits = np.array([[2.0, 0.0, -1.0], [10.0, 10.0, 10.0], [-3.0, 5.0, 1.0]])
    expected = -np.log(np.exp(logits).sum(1))
    np.testing.assert_allclose(openset.energy(logits), expected, rtol=1e-12)
    np.testing.assert_allclose(openset.energy(logits + 1000.0), expected - 1000.0, rtol=1e-12)  # no overflow
    msp = openset.SCORES["max_softmax"](logits, None, None)
    np.testing.assert_allclose(msp, 1 - (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).max(1))
    assert msp[1] == pytest.approx(2 / 3)


def test_mahalanobis_matches_scipy_and_uses_ledoit_wolf_of_the_class_centred_embeddings():
    from sklearn.covariance import LedoitWolf
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    train = rng.normal(size=(120, 5)) @ rng.normal(size=(5, 5)) + 4.0 * np.eye(3, 5)[labels]
    reference = openset.fit_reference(train, labels, k=3, metric="euclidean")
    means = np.stack([train[labels == c].mean(0) for c in range(3)])
    precision = LedoitWolf(assume_centered=True).fit(train - means[labels]).precision_
    np.testing.assert_allclose(reference.precision, precision)
    queries = rng.normal(size=(7, 5)) * 3
    expected = [min(mahalanobis(q, m, precision) for m in means) for q in queries]
    np.testing.assert_allclose(openset.mahalanobis_distance(queries, reference), expected, rtol=1e-10)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_kth_neighbour_distance_against_sklearn(metric, monkeypatch):
    from sklearn.neighbors import NearestNeighbors
    rng = np.random.default_rng(2)
    train, labels = rng.normal(size=(60, 8)), np.repeat([0, 1], 30)
    queries = rng.normal(size=(25, 8))
    monkeypatch.setattr(openset, "BLOCK_BYTES", 7 * 8 * len(train))  # blocks of 7 query rows: several, uneven
    reference = openset.fit_reference(train, labels, k=4, metric=metric)
    found = openset.kth_neighbour_distance(queries, reference)
    distances, _ = NearestNeighbors(n_neighbors=4, metric=metric, algorithm="brute").fit(train).kneighbors(queries)
    np.testing.assert_allclose(found, distances[:, 3], rtol=1e-9, atol=1e-9)


def test_the_knn_reference_is_a_sample_when_capped_and_the_class_statistics_use_every_image():
    rng = np.random.default_rng(4)
    train, labels = rng.normal(size=(90, 5)), np.repeat([0, 1, 2], 30)
    whole = openset.fit_reference(train, labels, k=3, metric="euclidean")
    capped = openset.fit_reference(train, labels, k=3, metric="euclidean", samples=20, seed=1)
    assert len(capped.train_embeddings) == 20 and len(whole.train_embeddings) == 90
    rows = {tuple(r) for r in train}
    assert all(tuple(r) in rows for r in capped.train_embeddings)  # a sample of the training rows, no copies
    assert len({tuple(r) for r in capped.train_embeddings}) == 20
    np.testing.assert_array_equal(capped.class_means, whole.class_means)
    np.testing.assert_array_equal(capped.precision, whole.precision)


def test_scores_rank_far_away_points_as_unknown():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 50)
    centres = 10.0 * np.eye(3, 6)
    train = centres[labels] + rng.normal(size=(150, 6))
    reference = openset.fit_reference(train, labels, k=5, metric="euclidean")
    seen = centres[np.repeat(np.arange(3), 10)] + rng.normal(size=(30, 6))
    unseen = -10.0 * np.eye(6)[np.repeat([3, 4], 10)] + rng.normal(size=(20, 6))
    for name in ("knn", "mahalanobis"):
        score = openset.SCORES[name]
        found = openset.detection_metrics(score(None, seen, reference), score(None, unseen, reference))
        assert found["auroc"] > 0.99, name


# ---- calibration ---------------------------------------------------------------------------------

def test_ece_nll_brier_on_a_hand_made_case():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0])
    # top scores 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (right); 15 bins of width 1/15:
    # 0.9 in (0.8667, 0.9333], 0.8 in (0.7333, 0.8], 0.7 in (0.6667, 0.7333], 0.6 in (0.5333, 0.6]
    expected_ece = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.6)) / 4
    assert calibrate.expected_calibration_error(probs, labels) == pytest.approx(expected_ece)
    # one bin holding everything: |accuracy - mean confidence|
    assert calibrate.expected_calibration_error(probs, labels, bins=1) == pytest.approx(abs(0.75 - 0.75))
    brier = np.mean([(0.1 ** 2) * 2, 0.8 ** 2 * 2, 0.3 ** 2 * 2, 0.4 ** 2 * 2])
    assert calibrate.brier_score(probs, labels) == pytest.approx(brier)
    assert calibrate.brier_score(probs, labels) == pytest.approx(
        sum(brier_score_loss(labels == c, probs[:, c]) for c in range(2)))
    logits = np.log(probs)
    assert calibrate.negative_log_likelihood(logits, labels) == pytest.approx(log_loss(labels, probs))
    assert calibrate.negative_log_likelihood(logits, labels) == pytest.approx(
        -np.mean(np.log([0.9, 0.2, 0.7, 0.6])))


def test_calibration_metrics_agree_with_sklearn_on_many_classes():
    rng = np.random.default_rng(4)
    logits, labels = rng.normal(size=(300, 6)) * 3, rng.integers(0, 6, 300)
    probs = calibrate.probabilities(logits, 1.7)
    assert calibrate.negative_log_likelihood(logits, labels, 1.7) == pytest.approx(
        log_loss(labels, probs, labels=range(6)))
    assert calibrate.brier_score(probs, labels) == pytest.approx(
        sum(brier_score_loss(labels == c, probs[:, c]) for c in range(6)))
    bins = calibrate.reliability_bins(probs, labels)
    assert bins.images.sum() == 300 and len(bins) == 15
    conf = probs.max(1)
    inside = (conf > 8 / 15) & (conf <= 9 / 15)
    assert bins.images[8] == inside.sum()


def _overconfident(seed: int, n: int = 2000, scale: float = 4.0):
    """Labels drawn from softmax(z); the model reports scale * z: overconfident when scale > 1."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 5)) * 1.5
    p = calibrate.probabilities(z)
    labels = np.array([rng.choice(5, p=row) for row in p])
    return scale * z, labels


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_nll():
    logits, labels = _overconfident(5)
    t = calibrate.fit_temperature(logits, labels)
    assert 3.0 < t < 5.5  # the true factor is 4
    before = calibrate.calibration_row(logits, labels, 1.0)
    after = calibrate.calibration_row(logits, labels, t)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] and after["brier"] < before["brier"]
    assert after["accuracy"] == before["accuracy"]  # a temperature never changes a prediction
    test_logits, test_labels = _overconfident(6)  # and it carries over to fresh images
    assert calibrate.negative_log_likelihood(test_logits, test_labels, t) < \
        calibrate.negative_log_likelihood(test_logits, test_labels)
    under, under_labels = _overconfident(7, scale=0.4)
    assert calibrate.fit_temperature(under, under_labels) < 1.0  # underconfident: T < 1 sharpens


def test_fitted_temperature_is_the_nll_minimum():
    logits, labels = _overconfident(8, n=500, scale=2.0)
    t = calibrate.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(-2, 3, 2001))
    best = grid[np.argmin([calibrate.negative_log_likelihood(logits, labels, g) for g in grid])]
    assert t == pytest.approx(best, rel=0.01)


# ---- predict.py: the folder ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["unset", "missing", "empty", "only_text", "all_corrupt"])
def test_a_bad_predict_dir_is_one_error(tmp_path, tiny_cfg, case):
    folder = tmp_path / "new"
    if case != "missing":
        folder.mkdir()
    if case == "only_text":
        (folder / "notes.txt").write_text("no images here")
    if case == "all_corrupt":
        (folder / "sub").mkdir()
        (folder / "sub" / "a.png").write_bytes(b"not a png")
        (folder / "b.jpg").write_bytes(b"")
    paths = locations.prepare_output_dirs(tiny_cfg)
    with pytest.raises(PipelineError) as err:
        unlabelled.find_new_images(None if case == "unset" else str(folder), paths)
    message = str(err.value)
    assert "\n" not in message and "PREDICT_DIR" in message
    expected = {"unset": "not set", "missing": "not a folder", "empty": "no image files",
                "only_text": "no image files", "all_corrupt": "none of its 2 image files can be read"}[case]
    assert expected in message


def test_new_images_are_found_at_any_depth_and_the_corrupt_ones_listed(tmp_path, tiny_folder, tiny_cfg):
    import shutil
    folder = tmp_path / "new"
    (folder / "deep" / "er").mkdir(parents=True)
    shutil.copy(tiny_folder / "a" / "img_000.png", folder / "top.png")
    shutil.copy(tiny_folder / "u" / "img_000.png", folder / "deep" / "er" / "low.png")
    (folder / "deep" / "broken.png").write_bytes(b"\x89PNG truncated")
    (folder / ".hidden.png").write_bytes(b"ignored")
    root, relpaths, hashes, bad = unlabelled.find_new_images(str(folder), locations.prepare_output_dirs(tiny_cfg))
    assert relpaths == ["deep/er/low.png", "top.png"] and list(bad) == ["deep/broken.png"]
    assert hashes == [hashing.sha256_file(root / p) for p in relpaths]


def test_prediction_table_lists_top_classes_in_order_and_flags_above_the_threshold():
    probs = np.array([[0.1, 0.7, 0.2, 0.0], [0.25, 0.25, 0.4, 0.1]])
    table = predict.prediction_table(["x.png", "y.png"], ["h1", "h2"], probs, ["a", "b", "c", "d"],
                                     np.array([0.2, 0.9]), 0.5, None)
    assert table.predicted_class.tolist() == ["b", "c"]
    assert table.top2_class.tolist() == ["c", "a"] and table.top3_class.tolist() == ["a", "b"]
    np.testing.assert_allclose(table.top1_score, [0.7, 0.4])
    assert table.unknown.tolist() == [False, True]


def test_a_validation_set_without_mistakes_keeps_t_at_1_and_says_why():
    logits = np.array([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.5, 4.0]])
    labels = np.array([0, 1, 2])
    assert calibrate.fit_temperature(logits, labels) < 0.05  # the search runs to its lower bound (e^-5 = 0.0067)
    t, why = calibrate.validation_temperature(logits, labels)
    assert t == 1.0 and "all 3 validation images are predicted correctly" in why
    t, why = calibrate.validation_temperature(logits, np.array([0, 2, 2]))
    assert why == "" and t == pytest.approx(calibrate.fit_temperature(logits, np.array([0, 2, 2])))


def test_run_all_runs_predict_only_when_predict_dir_is_set(tiny_cfg):
    names = [s.name for s in registry.run_all_stages(tiny_cfg)]
    assert names[-4:] == ["open_set", "calibration", "export_model", "report"]
    assert not {"predict", "annotate_next"} & set(names)
    assert names.index("open_set") == names.index("transfer_learning") + 1
    tiny_cfg.PREDICT_DIR = "/some/folder"  # the report stays last
    assert [s.name for s in registry.run_all_stages(tiny_cfg)][-3:] == ["predict", "annotate_next", "report"]
