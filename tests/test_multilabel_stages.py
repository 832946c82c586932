"""The analysis stages on a multi-label run (TASK="multilabel"): each writes its files with the
right content, checked against a brute-force count or scikit-learn. One tiny multi-label run
(train, evaluate, embed) is shared by the whole module."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config
from test_multilabel import make_multilabel_folder

from plankton import labelsets, locations, registry, saved_predictions

SEEN, UNSEEN = ["a", "b", "c"], ["u", "v"]


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    """A trained, evaluated and embedded tiny multi-label run (one epoch: the stages need files, not skill)."""
    import embed
    import evaluate
    import train
    tmp = tmp_path_factory.mktemp("multilabel_run")
    folder = make_multilabel_folder(tmp / "data", n=72)
    labels = pd.read_csv(folder / "labels.csv")
    copies = labels.iloc[:12].assign(path=[p.replace("img_", "copy_") for p in labels.path[:12]])
    for old, new in zip(labels.path[:12], copies.path):  # exact copies, for leaks.py to find
        shutil.copyfile(folder / old, folder / new)
    pd.concat([labels, copies]).to_csv(folder / "labels.csv", index=False)
    cfg = tiny_config(tmp, folder, TASK="multilabel", MAX_EPOCHS=1)
    for stage in (train, evaluate, embed):
        stage.run(cfg)
    return cfg


def split_table(cfg) -> pd.DataFrame:
    return pd.read_csv(Path(cfg.OUTPUT_DIR) / "split.csv", dtype=str)


# ---- ranked images ---------------------------------------------------------------------------------

def test_ranked_picks_the_top_and_bottom_scores_of_a_label_among_its_carriers_or_all():
    import ranked_images
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, (30, 3))
    scores = rng.random((30, 3))
    highest, lowest = ranked_images.ranked(scores, labels, 1, "class", count=4)
    carriers = np.flatnonzero(labels[:, 1] > 0)
    assert set(highest) <= set(carriers) and set(lowest) <= set(carriers)
    assert scores[highest, 1].tolist() == sorted(scores[carriers, 1], reverse=True)[:4]
    assert scores[lowest, 1].tolist() == sorted(scores[carriers, 1])[:4]
    highest, _ = ranked_images.ranked(scores, labels, 1, "all", count=4)
    assert scores[highest, 1].tolist() == sorted(scores[:, 1], reverse=True)[:4]


def test_ranked_images_of_a_multilabel_run_one_figure_per_label_captioned_with_label_sets(run_cfg):
    import ranked_images
    ranked_images.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    assert sorted(p.name for p in out.glob("ranked_*.png")) == ["ranked_0_a.png", "ranked_1_b.png", "ranked_2_c.png"]
    predictions = saved_predictions.open_predictions(locations.Paths.from_settings(run_cfg))
    i = int(np.flatnonzero(predictions.labels[:, 0] == 0)[0])  # an image without label a
    text, carries = ranked_images.caption_truth(predictions, i, 0)
    carried = [n for n, on in zip(SEEN, predictions.labels[i]) if on]
    assert not carries and text == "labels " + "+".join(carried)


# ---- dataset overview ------------------------------------------------------------------------------

def test_label_counts_and_cooccurrence_match_the_label_sets(run_cfg):
    import dataset_overview
    dataset_overview.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    table = split_table(run_cfg)
    sets = [set(text.split(";")) for text in table.labels]
    counts = pd.read_csv(out / "label_counts.csv").set_index("label")
    for name in SEEN + UNSEEN:
        for subset in ("train", "val", "test", "unseen"):
            expected = sum(name in s for s, sub in zip(sets, table.subset) if sub == subset)
            assert counts.loc[name, subset] == expected, (name, subset)
    assert counts.loc[labelsets.ALL_IMAGES, "total"] == len(table)
    matrix = pd.read_csv(out / "label_cooccurrence.csv", index_col=0)
    names = SEEN + UNSEEN
    assert list(matrix.index) == names and list(matrix.columns) == names
    for x in names:
        for y in names:
            assert matrix.loc[x, y] == sum(x in s and y in s for s in sets), (x, y)
    assert {"label_counts.png", "label_cooccurrence.png", "sample_images.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "class_counts.csv").exists()
    record = (out / "provenance_dataset_overview.json").read_text()
    assert "label_cooccurrence.csv" in record and registry.stage_of("label_cooccurrence.png") == "dataset_overview"


# ---- calibration -----------------------------------------------------------------------------------

def test_label_reliability_bins_match_sklearn_calibration_curve():
    from sklearn.calibration import calibration_curve

    from plankton import calibrate
    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.random(200), [0.0, 1.0, 2 / 15, 1 / 15]])  # bin edges and ends included
    targets = (rng.random(len(scores)) < scores).astype(int)
    bins = calibrate.label_reliability_bins(scores, targets)
    used = bins[bins.images > 0]
    fraction, mean_score = calibration_curve(targets, scores, n_bins=calibrate.BINS, strategy="uniform")
    assert used.fraction_positive.to_numpy() == pytest.approx(fraction)
    assert used.confidence.to_numpy() == pytest.approx(mean_score)
    assert bins.images.sum() == len(scores)


def test_the_label_temperature_lowers_the_validation_bce_and_label_thresholds_reach_the_precision():
    from plankton import calibrate, routing
    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, (300, 3))
    logits = 8.0 * (targets - 0.5) + rng.normal(0, 3, targets.shape)  # overconfident: T > 1 helps
    t, why = calibrate.validation_label_temperature(logits, targets)
    assert not why and t > 1
    assert calibrate.binary_negative_log_likelihood(logits, targets, t) < calibrate.binary_negative_log_likelihood(
        logits, targets)
    assert calibrate.validation_label_temperature(np.where(targets > 0, 3.0, -3.0), targets)[1].startswith("not fitted")
    scores = calibrate.sigmoid_probabilities(logits, t)
    table = routing.label_thresholds(scores, targets, ["a", "b", "c"], 0.95)
    for i, row in table.iterrows():
        above = scores[:, i] >= row.threshold
        assert (targets[above, i] > 0).mean() >= 0.95 and row.val_above == above.sum()
        below = scores[:, i][scores[:, i] < row.threshold]
        if len(below):  # one image more (the next lower score) would miss the precision
            nxt = scores[:, i] >= below.max()
            assert (targets[nxt, i] > 0).mean() < 0.95


def test_calibration_of_a_multilabel_run_per_label_with_bins_summing_to_the_images(run_cfg):
    import calibration
    calibration.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    predictions = saved_predictions.open_predictions(locations.Paths.from_settings(run_cfg))
    table = pd.read_csv(out / "calibration_labels.csv")
    test_before = table[(table.subset == "test") & (table.when == "before")].set_index("label")
    assert list(test_before.index) == SEEN + ["mean"]
    for i, name in enumerate(SEEN):
        assert test_before.loc[name, "positives"] == predictions.labels[:, i].sum()
        assert test_before.loc[name, "images"] == len(predictions.relpaths)
    bins = pd.read_csv(out / "calibration_label_bins.csv")
    sums = bins.groupby(["subset", "when", "label"]).images.sum()
    assert (sums.xs("test", level="subset") == len(predictions.relpaths)).all() and len(sums) == 2 * 2 * len(SEEN)
    thresholds = pd.read_csv(out / "label_thresholds.csv")
    assert list(thresholds.label) == SEEN + ["all"]
    assert (out / "reliability_diagram_labels.png").is_file() and not (out / "reliability_diagram.png").exists()


# ---- embedding quality -----------------------------------------------------------------------------

def test_label_quality_rows_match_a_brute_force_one_vs_rest_computation():
    from sklearn.metrics import pairwise_distances, silhouette_score

    import embedding_quality
    rng = np.random.default_rng(4)
    carried = rng.integers(0, 2, (25, 3))
    carried[:, 2] = 0
    carried[0, 2] = 1  # label z: one image, nothing to recall, no silhouette
    x = rng.normal(size=(25, 4)) + carried[:, :1] * 2.0
    rows = {r["label"]: r for r in embedding_quality.label_quality_rows(x, carried, ["x", "y", "z"])}
    d = pairwise_distances(x)
    for i, name in enumerate("xy"):
        mine = carried[:, i] > 0
        pairs = ~np.eye(25, dtype=bool)
        assert rows[name]["mean_within"] == pytest.approx(d[np.outer(mine, mine) & pairs].mean())
        assert rows[name]["mean_between"] == pytest.approx(d[np.outer(mine, ~mine) | np.outer(~mine, mine)].mean())
        assert rows[name]["silhouette"] == pytest.approx(silhouette_score(x, mine))
        nearest = np.argsort(np.where(pairs, d, np.inf), axis=1, kind="stable")[:, :5]
        assert rows[name]["recall_at_5"] == pytest.approx(mine[nearest][mine].any(1).mean())
    assert rows["z"]["n_recall"] == 0 and np.isnan(rows["z"]["recall_at_1"]) and np.isnan(rows["z"]["silhouette"])


@pytest.mark.slow
def test_embedding_quality_of_a_multilabel_run_one_row_per_label_and_subset(run_cfg):
    import dimensionality_reduction
    import embedding_quality
    dimensionality_reduction.run(run_cfg)
    embedding_quality.run(run_cfg)
    table = pd.read_csv(Path(run_cfg.OUTPUT_DIR) / "embedding_quality_labels.csv")
    assert list(table.label) == SEEN + ["(mean)"] + UNSEEN + ["(mean)"]
    test = table[table.subset == "test"].set_index("label")
    predictions = saved_predictions.open_predictions(locations.Paths.from_settings(run_cfg))
    assert test.loc[SEEN, "n_carrying"].tolist() == predictions.labels.sum(0).tolist()
    assert test.loc["(mean)", "silhouette"] == pytest.approx(test.loc[SEEN, "silhouette"].mean())
    assert 0 <= test.loc["(mean)", "trustworthiness"] <= 1


# ---- leaks -----------------------------------------------------------------------------------------

def test_leaks_of_a_multilabel_run_name_label_sets(run_cfg):
    import json

    import leaks
    leaks.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    table = pd.read_csv(out / "leaks.csv", dtype=str)
    assert list(table.columns) == ["subset", "path", "labels", "train_path", "train_labels", "same_labels", "distance",
                                   "kind"]
    assert (table.same_labels == (table.labels == table.train_labels).astype(str)).all()
    exact = table[table.kind == "exact"]
    assert len(exact) >= 1 and (exact.same_labels == "True").all()  # the planted copies carry their original's set
    assert all(p.replace("copy_", "img_") == t or t.replace("copy_", "img_") == p
               for p, t in zip(exact.path, exact.train_path))
    summary = json.loads((out / "leaks_summary.json").read_text())
    split = split_table(run_cfg)
    for subset in ("val", "test", "unseen"):
        assert summary["subsets"][subset]["images"] == (split.subset == subset).sum()
        assert summary["subsets"][subset]["exact"] + summary["subsets"][subset]["near"] == (table.subset == subset).sum()


# ---- transfer learning and few-shot ----------------------------------------------------------------

@pytest.mark.slow
def test_transfer_learning_of_a_multilabel_run_each_unseen_label_one_vs_rest(run_cfg):
    import transfer_learning
    transfer_learning.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    curves = pd.read_csv(out / "transfer_learning_labels.csv")
    shots = pd.read_csv(out / "fewshot_labels.csv")
    unseen = split_table(run_cfg).query("subset == 'unseen'")
    for name in UNSEEN:
        carrying = unseen.labels.str.split(";").map(lambda s, name=name: name in s).sum()
        part = curves[curves.label == name]
        n_test = part.n_test.iloc[0]
        assert n_test == round(0.3 * carrying) + round(0.3 * (len(unseen) - carrying))  # stratified, both sides
        assert part.balanced_accuracy.between(0, 1).all()
        few = shots[shots.label == name]
        assert (few.n_train == 2 * few.shots).all()  # k with the label and k without
        assert ((few.acc_with + few.acc_without) / 2).to_numpy() == pytest.approx(few.balanced_accuracy.to_numpy())
    assert (out / "transfer_learning_labels.png").is_file() and (out / "fewshot_labels.png").is_file()


# ---- open set --------------------------------------------------------------------------------------

def test_joint_energy_and_max_sigmoid_by_hand():
    from plankton import openset
    logits = np.array([[2.0, -1.0], [-3.0, -4.0]])
    scores = {n: f(logits, None, None) for n, f in openset.MULTILABEL_SCORES.items() if n in ("max_sigmoid",
                                                                                              "joint_energy")}
    assert scores["joint_energy"] == pytest.approx([-(np.log1p(np.exp(2)) + np.log1p(np.exp(-1))),
                                                    -(np.log1p(np.exp(-3)) + np.log1p(np.exp(-4)))])
    assert scores["max_sigmoid"] == pytest.approx([1 - 1 / (1 + np.exp(-2)), 1 - 1 / (1 + np.exp(3))])


@pytest.mark.slow  # head outputs of every subset: the fast budget is spent on the stages above
def test_open_set_of_a_multilabel_run_scores_images_with_an_unseen_label(run_cfg):
    from sklearn.metrics import roc_auc_score

    import open_set
    open_set.run(run_cfg)
    out = Path(run_cfg.OUTPUT_DIR)
    images = pd.read_csv(out / "open_set_image_scores.csv", dtype={"labels": str})
    table = pd.read_csv(out / "open_set_scores.csv").set_index("score")
    assert list(table.index) == ["max_sigmoid", "joint_energy", "knn", "mahalanobis"]
    split = split_table(run_cfg).set_index("relpath")
    assert (images.labels == split.labels.loc[images.path].to_numpy()).all()
    known, unknown = images[images.subset == "test"], images[images.subset == "unseen"]
    assert all({"u", "v"} & set(s.split(";")) for s in unknown.labels)
    for name in table.index:
        y = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
        assert table.loc[name, "auroc"] == pytest.approx(roc_auc_score(y, -np.r_[known[name], unknown[name]]))


# ---- predict ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_predict_with_a_multilabel_model_writes_label_sets_from_the_label_thresholds(run_cfg):
    import copy
    import json

    import predict
    cfg = copy.copy(run_cfg)
    cfg.PREDICT_DIR = str(Path(cfg.DATA_DIR) / "pics")
    predict.run(cfg)
    folder = Path(cfg.OUTPUT_DIR) / "predictions"
    table = pd.read_csv(folder / "predictions.csv", dtype={"predicted_labels": str, "labels_at_half": str},
                        keep_default_na=False)
    summary = json.loads((folder / "predictions.json").read_text())
    assert len(table) == len(list((Path(cfg.DATA_DIR) / "pics").glob("*.png"))) == summary["images_predicted"]
    thresholds = summary["label_thresholds"]
    for row in table.itertuples():
        expected = [n for n in SEEN if thresholds[n] is not None and getattr(row, f"score_{n}") >= thresholds[n]]
        assert row.predicted_labels == ";".join(expected)
        assert row.labels_at_half == ";".join(n for n in SEEN if getattr(row, f"score_{n}") >= 0.5)
    assert (table.unknown == (table.open_set_score > summary["threshold"])).all()
    assert summary["flagged_unknown"] == table.unknown.sum()
