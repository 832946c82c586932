"""suspicious_labels.py: the ranking finds flipped labels on clustered features, the stage writes one
row per training image and its contact sheet, and a multi-label run is refused in one line."""
import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

import suspicious_labels
import train
from plankton.errors import PipelineError


def clustered(n_classes: int = 5, per_class: int = 80, dim: int = 16, seed: int = 0):
    """Gaussian clusters, one per class, apart but overlapping a little."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + rng.normal(size=(len(labels), dim)), labels


def test_most_flipped_labels_rank_among_the_top_twice_their_number():
    features, true = clustered()
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(true), len(true) // 20, replace=False)  # 5 %
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, 5, len(flipped))) % 5  # always another class
    probabilities = suspicious_labels.out_of_fold_probabilities(features, given, 5, folds=5, seed=0)
    assert probabilities.shape == (len(true), 5) and np.allclose(probabilities.sum(1), 1.0)
    ranked = suspicious_labels.rank_suspects(probabilities, given)
    assert sorted(ranked["rank"]) == list(range(1, len(true) + 1))
    assert (ranked.suggested != ranked.given).all()
    assert np.allclose(ranked.score, ranked.p_suggested - ranked.p_given)
    top = set(np.flatnonzero(ranked["rank"] <= 2 * len(flipped)))
    found = len(top & set(flipped)) / len(flipped)
    assert found >= 0.7, f"only {found:.0%} of the flipped labels rank in the top {2 * len(flipped)}"
    # where a flipped image is caught, the suggestion is mostly its true class
    caught = [i for i in flipped if i in top]
    assert np.mean(ranked.suggested.to_numpy()[caught] == true[caught]) >= 0.7


def test_ranking_breaks_ties_in_row_order_and_puts_a_confident_other_class_first():
    probabilities = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.9, 0.1, 0.0], [0.5, 0.5, 0.0]])
    ranked = suspicious_labels.rank_suspects(probabilities, np.array([0, 0, 0, 1]))
    assert ranked["rank"].tolist() == [3, 1, 4, 2]  # rows 0 and 2 tie: row order
    assert ranked.suggested.tolist() == [1, 1, 1, 0]


def test_a_class_with_one_training_image_is_one_error_line():
    features, labels = clustered(n_classes=2, per_class=6)
    labels[-5:] = 0
    with pytest.raises(PipelineError, match="a class has 1 training image"):
        suspicious_labels.out_of_fold_probabilities(features, labels, 2, folds=5, seed=0)


def test_the_stage_writes_one_row_per_training_image_and_the_contact_sheet(tmp_path, tiny_folder, capsys):
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=1, SUSPECT_COUNT=5)
    train.run(cfg)
    suspicious_labels.run(cfg)
    out = tmp_path / "outputs"
    table = pd.read_csv(out / "suspicious_labels.csv", dtype={"path": str, "given_class": str,
                                                             "suggested_class": str})
    split = pd.read_csv(out / "split.csv", dtype=str)
    assert list(table.columns) == suspicious_labels.COLUMNS
    assert sorted(table.path) == sorted(split.relpath[split.subset == "train"])
    assert table["rank"].tolist() == list(range(1, len(table) + 1))
    assert table.score.is_monotonic_decreasing
    assert (table.given_class != table.suggested_class).all()
    assert (table.given_class == table.path.str.split("/").str[0]).all()
    assert (out / "suspicious_labels.png").stat().st_size > 0
    assert (out / "provenance_suspicious_labels.json").is_file()
    assert "-> " in capsys.readouterr().out


def test_a_multilabel_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"suspicious_labels.py is multiclass only \(doubts each image's one "):
        suspicious_labels.run(tiny_config(tmp_path, TASK="multilabel"))
    assert not (tmp_path / "outputs").exists()
