"""TASK="multilabel": AP/mAP against scikit-learn, the BCE loss against a direct computation, tail
accuracy on a hand-made case, bad labels CSVs, the split, the built-in mosaics and (slow) the whole
pipeline on a tiny multi-label folder."""
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from sklearn.metrics import average_precision_score

import run_all
from plankton import checkpoints, embedding_files, labelsets, locations, saved_predictions, settings, splits, tasks
from plankton.errors import PipelineError

LABELS = ["a", "b", "c", "u", "v"]  # a, b, c seen; u, v unseen (tiny_config's classes)


def make_multilabel_folder(root: Path, n: int = 72, size: int = 32, seed: int = 0) -> Path:
    """Noisy images with one bright square per label they carry, each label at its own place and
    colour; the first two thirds carry seen labels only. Writes root/labels.csv."""
    rng = np.random.default_rng(seed)
    (root / "pics").mkdir(parents=True, exist_ok=True)
    rows = []
    for j in range(n):
        pool = LABELS[:3] if j < 2 * n // 3 else LABELS
        carried = sorted(set(rng.choice(pool, size=rng.integers(1, 3))), key=LABELS.index)
        image = rng.integers(0, 60, (size, size, 3))
        for label in carried:
            i = LABELS.index(label)
            y, x = (i * 6) % (size - 8), (i * 13) % (size - 8)
            image[y:y + 6, x:x + 6] = [(37 * i + 120) % 256, (91 * i + 80) % 256, (151 * i + 160) % 256]
        Image.fromarray(image.astype(np.uint8)).save(root / "pics" / f"img_{j:03d}.png")
        rows.append((f"pics/img_{j:03d}.png", ";".join(carried)))
    pd.DataFrame(rows, columns=["path", "labels"]).to_csv(root / "labels.csv", index=False)
    return root


# ---- metrics ---------------------------------------------------------------------------------------

def test_average_precisions_and_map_match_sklearn_with_nan_for_a_label_without_positives():
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 2, (40, 4))
    targets[:, 3] = 0  # no image carries the last label
    scores = rng.random((40, 4))
    ap = tasks.average_precisions(targets, scores)
    for c in range(3):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
    assert math.isnan(ap[3])
    logits = np.log(scores / (1 - scores))  # sigmoid(logits) == scores
    row = tasks.MULTILABEL.classwise_metrics(logits, targets, ["w", "x", "y", "z"])
    assert row["map"] == pytest.approx(np.mean([average_precision_score(targets[:, c], scores[:, c])
                                                for c in range(3)]), abs=1e-6)
    assert row["acc_w"] == pytest.approx(((scores[:, 0] >= 0.5) & (targets[:, 0] == 1)).sum() / targets[:, 0].sum())
    assert math.isnan(row["ap_z"]) and math.isnan(row["acc_z"])


def test_a_known_ranking_gives_the_hand_computed_average_precision():
    # positives ranked 1st and 3rd of 4: AP = (1/1 + 2/3) / 2
    ap = tasks.average_precisions(np.array([[1], [0], [1], [0]]), np.array([[0.9], [0.8], [0.7], [0.1]]))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)


def test_bce_loss_matches_a_direct_computation_and_torch():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 1]])
    p = torch.sigmoid(logits.double())
    direct = -(targets * torch.log(p) + (1 - targets) * torch.log(1 - p))
    assert tasks.MULTILABEL.loss(logits, targets).item() == pytest.approx(direct.mean().item(), rel=1e-6)
    assert tasks.MULTILABEL.loss(logits, targets, reduction="sum").item() == pytest.approx(
        direct.mean(1).sum().item(), rel=1e-6)
    assert tasks.MULTILABEL.loss(logits, targets).item() == pytest.approx(
        torch.nn.BCEWithLogitsLoss()(logits, targets.float()).item(), rel=1e-7)
    assert tasks.MULTILABEL.hits(logits, targets).item() == 1  # row 1 right everywhere; row 2: logit 0 is score 0.5, decided 1


def test_sigmoid_is_stable_for_large_logits():
    scores = tasks.sigmoid(np.array([[-1000.0, 0.0, 1000.0]]))
    assert scores.tolist() == [[0.0, 0.5, 1.0]]


# ---- tail accuracy ---------------------------------------------------------------------------------

def test_tail_accuracy_on_a_hand_made_case_with_nan_where_no_image_remains():
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    scores = np.array([[0.9, 0.2], [0.6, 0.7], [0.55, 0.1], [0.95, 0.3]])
    table = tasks.tail_accuracy(targets, scores, ["p", "q"], np.array([0.5, 0.8, 0.96]))
    at = {(r.label, r.threshold): r for r in table.itertuples()}
    assert at["p", 0.5].n_above == 4 and at["p", 0.5].tail_accuracy == pytest.approx(2 / 4)
    assert at["p", 0.8].n_above == 2 and at["p", 0.8].tail_accuracy == pytest.approx(1 / 2)  # 0.9 yes, 0.95 no
    assert at["q", 0.5].n_above == 1 and at["q", 0.5].tail_accuracy == 1.0
    assert at["q", 0.8].n_above == 0 and math.isnan(at["q", 0.8].tail_accuracy)  # none left: NaN, not 0
    assert at["mean", 0.8].tail_accuracy == pytest.approx(0.5)  # the mean over the labels that have images
    assert at["mean", 0.5].tail_accuracy == pytest.approx((0.5 + 1.0) / 2)
    assert at["mean", 0.96].n_above == 0 and math.isnan(at["mean", 0.96].tail_accuracy)
    assert at["p", 0.5].coverage == 1.0 and at["q", 0.5].coverage == 0.25


def test_tail_accuracy_of_a_single_label_run_is_precision_above_the_softmax_threshold():
    labels = np.array([0, 1, 1, 2])
    scores = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    table = tasks.tail_accuracy(tasks.MULTICLASS.indicator(labels, 3), scores, ["x", "y", "z"], np.array([0.5]))
    assert table.tail_accuracy.tolist()[:3] == [0.5, 1.0, 1.0]
    assert tasks.tail_thresholds(scores, 4).tolist() == pytest.approx([0.5, 0.6, 0.7, 0.8])


# ---- the labels CSV --------------------------------------------------------------------------------

def write_labels(folder: Path, rows: list[tuple[str, str]]) -> Path:
    path = folder / "labels.csv"
    pd.DataFrame(rows, columns=["path", "labels"]).to_csv(path, index=False)
    return path


@pytest.mark.parametrize("rows, words", [
    (None, "no labels CSV at"),
    ([("pics/img_000.png", "a;zebra")], "label 'zebra' is in neither SEEN_CLASSES nor UNSEEN_CLASSES"),
    ([("pics/missing.png", "a")], "no such image in"),
    ([("pics/img_000.png", " ; ")], "no labels; every image needs at least one"),
    ([("pics/img_000.png", "a"), ("pics/img_001.png", "b"), ("pics/img_000.png", "c")],
     "line 4 ('pics/img_000.png'): the image is listed a second time (first on line 2)"),
    ([("../img_000.png", "a")], "must be relative to DATA_DIR"),
])
def test_each_bad_labels_csv_ends_in_one_clear_line(tmp_path, rows, words):
    folder = make_multilabel_folder(tmp_path / "data", n=6)
    path = tmp_path / "nothing.csv" if rows is None else write_labels(folder, rows)
    with pytest.raises(PipelineError) as caught:
        labelsets.read_labels_csv(path, folder, LABELS[:3], LABELS[3:])
    message = str(caught.value)
    assert words in message and "\n" not in message


def test_a_bad_labels_csv_through_the_script_is_one_error_line(tmp_path, capsys):
    import train
    folder = make_multilabel_folder(tmp_path / "data", n=6)
    write_labels(folder, [("pics/img_000.png", "a;zebra")])
    with pytest.raises(SystemExit) as stopped:
        train.main([f"--DATA_DIR={folder}", "--TASK=multilabel", "--SEEN_CLASSES=['a','b','c']",
                    "--UNSEEN_CLASSES=['u','v']", f"--OUTPUT_DIR={tmp_path / 'o'}", f"--CHECKPOINT_DIR={tmp_path / 'c'}",
                    f"--CACHE_DIR={tmp_path / 'k'}"])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: labels CSV") and "'zebra'" in err[0]


def test_a_configured_label_no_image_carries_is_an_error(tmp_path):
    folder = make_multilabel_folder(tmp_path / "data", n=6)
    write_labels(folder, [("pics/img_000.png", "a;b")])
    with pytest.raises(PipelineError, match="label 'c' .*is carried by no image"):
        labelsets.read_labels_csv(folder / "labels.csv", folder, LABELS[:3], LABELS[3:])


def test_settings_refuse_labels_csv_for_a_single_label_run_and_label_smoothing_for_multilabel():
    with pytest.raises(PipelineError, match="LABELS_CSV='x.csv': read only with TASK='multilabel'"):
        settings.load_settings(["--LABELS_CSV=x.csv"])
    with pytest.raises(PipelineError, match="LABEL_SMOOTHING=0.1"):
        settings.load_settings(["--TASK=multilabel", "--LABEL_SMOOTHING=0.1"])
    with pytest.raises(PipelineError, match="TASK='multi': must be 'multiclass' or 'multilabel'"):
        settings.load_settings(["--TASK=multi"])


# ---- the split and the demo ------------------------------------------------------------------------

def test_images_with_any_unseen_label_are_held_out_and_the_split_is_checked(tmp_path):
    folder = make_multilabel_folder(tmp_path / "data")
    cfg = tiny_config(tmp_path, folder, TASK="multilabel")
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    sets = split.table.set_index("relpath").labels.str.split(";")
    unseen = split.table.subset == "unseen"
    assert all(bool({"u", "v"} & set(s)) for s in sets[unseen.to_numpy()])
    assert not any({"u", "v"} & set(s) for s in sets[~unseen.to_numpy()])
    relpaths, targets = split.subset("train")
    assert targets.shape == (len(relpaths), 3) and targets.sum(1).min() >= 1
    again = splits.split_from_settings(cfg, paths, create=False)  # re-read and checked
    assert again.sha256 == split.sha256 and again.task == "multilabel"
    table = pd.read_csv(folder / "labels.csv")
    table.loc[0, "labels"] = "a;b;c" if table.loc[0, "labels"] != "a;b;c" else "a"
    table.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(PipelineError, match="1 relabelled"):
        splits.split_from_settings(cfg, paths, create=False)


def test_rarest_label_uses_the_counts_given():
    targets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 0]])
    assert labelsets.rarest_labels(targets, np.array([5, 9, 2])).tolist() == [0, 2, 0]


def test_the_builtin_mosaics_are_deterministic_and_labelled_with_the_digits_shown(tmp_path):
    labelsets.export_mosaics(tmp_path / "one")
    labelsets.export_mosaics(tmp_path / "two")
    first = (tmp_path / "one" / "labels.csv").read_bytes()
    assert first == (tmp_path / "two" / "labels.csv").read_bytes()
    table = pd.read_csv(tmp_path / "one" / "labels.csv", dtype=str)
    assert len(table) == labelsets.MOSAICS_SEEN_ONLY + labelsets.MOSAICS_ANY
    assert all(set(s.split(";")) <= set("012345") for s in table.labels[:labelsets.MOSAICS_SEEN_ONLY])
    assert Image.open(tmp_path / "one" / table.path[0]).size == (16, 16)
    from sklearn.datasets import load_digits
    digits = load_digits()
    tile = np.asarray(Image.open(tmp_path / "one" / table.path[0]))[:8, :8]  # the top-left digit
    match = [d for d in range(len(digits.images))
             if np.array_equal(np.round(digits.images[d] * 255 / 16).astype(np.uint8), tile)]
    assert match and str(digits.target[match[0]]) in table.labels[0].split(";")


# ---- the whole pipeline ------------------------------------------------------------------------------

@pytest.mark.slow
def test_multilabel_pipeline_end_to_end(tmp_path):
    folder = make_multilabel_folder(tmp_path / "data", n=96)
    cfg = tiny_config(tmp_path, folder, TASK="multilabel", MAX_EPOCHS=4, VAL_FRACTION=0.15, TEST_FRACTION=0.25,
                      TRAIN_FRACTION=0.6)
    times = run_all.run(cfg)
    assert "suspicious_labels" not in times and "seeds" not in times  # single-label only
    assert {"dataset_overview", "leaks", "ranked_images", "embedding_quality", "transfer_learning", "open_set",
            "calibration", "embed"} <= set(times)
    out = Path(cfg.OUTPUT_DIR)
    history = pd.read_csv(out / "training_history.csv")
    assert {"val_map", "train_map", "val_ap_a", "train_ap_c"} <= set(history.columns)
    best = checkpoints.open_checkpoint(Path(cfg.CHECKPOINT_DIR) / "best.pth")
    assert best.task == "multilabel" and best.val_map == pytest.approx(history.val_map.max())
    metrics = pd.read_csv(out / "test_metrics.csv")
    predictions = saved_predictions.open_predictions(locations.Paths.from_settings(cfg))
    assert predictions.task == "multilabel" and predictions.labels.shape == (len(predictions.relpaths), 3)
    expected = [average_precision_score(predictions.labels[:, c], predictions.scores[:, c])
                if predictions.labels[:, c].any() else np.nan for c in range(3)]
    assert metrics.average_precision.iloc[:3].to_numpy() == pytest.approx(np.array(expected), nan_ok=True)
    assert metrics.average_precision.iloc[-1] == pytest.approx(np.nanmean(expected))
    tail = pd.read_csv(out / "tail_accuracy.csv")
    assert set(tail.label) == {"a", "b", "c", "mean"} and (tail.n_above >= 0).all()
    assert (tail.n_above == 0).eq(tail.tail_accuracy.isna()).all()
    frame = embedding_files.open_embeddings(locations.Paths.from_settings(cfg), "unseen")
    assert "labels" in frame.columns and all({"u", "v"} & set(s.split(";")) for s in frame["labels"])
    for name in ("training_plot.png", "training_classwise_ap.png", "tail_accuracy.png", "test_label_metrics.png",
                 "umap_embeddings.png", "average_angular_distances_test.png", "reproduction_check.csv"):
        assert (out / name).is_file(), name
    with pytest.raises(PipelineError, match="trained for TASK='multilabel'"):
        import evaluate
        evaluate.run(tiny_config(tmp_path, folder))


def test_close_far_figures_cover_every_label_over_the_images_carrying_it(capsys):
    import dimensionality_reduction
    rng = np.random.default_rng(0)
    texts = ["a;b", "b", "a;b;c", "c", "b;c", "a", "b", "a;c"]
    train = pd.DataFrame(dict(path=[f"i{n}.png" for n in range(8)], labels=texts,
                              label=[0, 1, 0, 2, 2, 0, 1, 0],  # a rarest label, as embed.py writes it: never "b" here
                              class_name=["a", "b", "a", "c", "c", "a", "b", "a"],
                              **{f"e{d}": rng.normal(size=8) for d in range(4)}))
    membership, noun = dimensionality_reduction.label_membership(train, ["a", "b", "c"])
    assert noun == "label" and membership.sum(0).tolist() == [4, 5, 4]
    assert membership[0].tolist() == [True, True, False]
    _, selections = dimensionality_reduction.close_far_selections(None, train, ["a", "b", "c"], "embedding", 2)
    assert [name for _, name, _ in selections] == ["a", "b", "c"]  # "b" too, though it is no image's rarest label
    _, _, rows = selections[1]
    (closest, _), (furthest, _), (closest_other, _) = rows
    assert all(membership[j, 1] for j in list(closest) + list(furthest))
    assert not any(membership[j, 1] for j in closest_other)
