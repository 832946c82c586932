"""Rare classes trained fairly: class weights, balanced sampling, a cap per class and the figure that
picks the best model (CLASS_WEIGHTS, BALANCED_SAMPLING, MAX_PER_CLASS, SELECT_BY)."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_image_folder, one_error_line, tiny_config
from sklearn.metrics import balanced_accuracy_score

import train
from plankton import checkpoints, heads, tasks, training
from plankton.errors import PipelineError

LABELS = np.array([0] * 500 + [1] * 50 + [2] * 10)  # 50:1 between the largest and the smallest class


def test_class_weights_balanced_and_square_root():
    n, k, counts = len(LABELS), 3, np.array([500, 50, 10])
    balanced = training.class_weights("balanced", LABELS, k).numpy()
    assert np.allclose(balanced, n / (k * counts))
    assert np.allclose(training.class_weights("sqrt", LABELS, k).numpy(), np.sqrt(n / (k * counts)))
    assert training.class_weights("none", LABELS, k) is None
    with pytest.raises(PipelineError, match="has no training image"):
        training.class_weights("balanced", LABELS, 4)  # a fourth class without images


def test_weighted_cross_entropy_is_the_weighted_mean():
    logits, labels = torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2] * 4)
    weights = torch.tensor([0.5, 2.0, 7.0])
    criterion = heads.Criterion("ce", tasks.MULTICLASS, 3, 8, class_weights=weights)
    per_image = -torch.log_softmax(logits, 1)[torch.arange(12), labels]
    expected = (weights[labels] * per_image).sum() / weights[labels].sum()
    assert torch.allclose(criterion(logits, None, labels), expected)
    assert criterion.replaces_task_loss and not heads.Criterion("ce", tasks.MULTICLASS, 3, 8).replaces_task_loss
    assert "class_weights" not in criterion.state_dict()  # follows from the split: not saved in last.pth


def test_balanced_sampling_draws_classes_about_equally():
    batches = training.epoch_batches(len(LABELS), 64, seed=0, epoch=0, labels=LABELS)
    drawn = np.concatenate(batches)
    assert len(drawn) == len(LABELS)
    shares = np.bincount(LABELS[drawn], minlength=3) / len(drawn)
    assert np.allclose(shares, 1 / 3, atol=0.07), shares
    plain = np.bincount(LABELS[np.concatenate(training.epoch_batches(len(LABELS), 64, 0, 0))]) / len(LABELS)
    assert plain[2] < 0.02  # without it the rare class is 10 of 560
    again = np.concatenate(training.epoch_batches(len(LABELS), 64, seed=0, epoch=0, labels=LABELS))
    other = np.concatenate(training.epoch_batches(len(LABELS), 64, seed=0, epoch=1, labels=LABELS))
    assert (drawn == again).all() and not (drawn == other).all()  # resumable: fixed by (seed, epoch)


def test_cap_per_class():
    kept = training.capped_indices(LABELS, 40, seed=0)
    assert np.array_equal(np.bincount(LABELS[kept]), [40, 40, 10])
    assert np.array_equal(kept, np.sort(kept)) and len(set(kept)) == len(kept)
    assert np.array_equal(kept, training.capped_indices(LABELS, 40, seed=0))
    assert len(training.capped_indices(LABELS, None, seed=0)) == len(LABELS)


def test_selection_metric_picks_its_epoch():
    history = pd.DataFrame(dict(epoch=[1.0, 2.0, 3.0, 4.0], val_loss=[0.9, 0.5, 0.4, 0.3],
                                val_balanced_accuracy=[0.5, 0.8, 0.7, 0.6], val_macro_f1=[0.4, 0.5, 0.9, 0.6]))
    picked = {}
    for name in ("auto", "val_loss", "balanced_accuracy", "macro_f1"):
        task = training.selecting_task(tasks.MULTICLASS, name)
        state = training.TrainingState()
        for _, row in history.iterrows():
            state.improved(training.selection_figure(task, row), row.epoch)
        assert state.best_epoch == train.best_position(history, task)
        picked[name] = state.best_epoch
    assert picked == dict(auto=4.0, val_loss=4.0, balanced_accuracy=2.0, macro_f1=3.0)
    tied = history.assign(val_balanced_accuracy=[0.5, 0.8, 0.8, 0.6])  # a tie: the lower validation loss wins
    assert train.best_position(tied, training.selecting_task(tasks.MULTICLASS, "balanced_accuracy")) == 3.0
    assert train.best_words(-0.8, training.selecting_task(tasks.MULTICLASS, "balanced_accuracy")) == \
        "validation balanced accuracy 0.8000"


def test_classwise_metrics_give_the_selection_figures():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 2 * np.eye(3)[labels]
    row = tasks.MULTICLASS.classwise_metrics(logits, labels, ["a", "b", "c"])
    recalls = [(logits.argmax(1)[labels == c] == c).mean() for c in range(3)]
    assert row["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, logits.argmax(1)))
    assert 0 < row["macro_f1"] < 1


@pytest.mark.parametrize("settings, words", [
    (["--CLASS_WEIGHTS=inverse"], "CLASS_WEIGHTS='inverse': must be"),
    (["--SELECT_BY=f1"], "SELECT_BY='f1': must be"),
    (["--MAX_PER_CLASS=0"], "MAX_PER_CLASS=0: must be"),
    (["--TASK=multilabel", "--BALANCED_SAMPLING=True"], "TASK='multiclass' only"),
    (["--TASK=multilabel", "--SELECT_BY=macro_f1"], "SELECT_BY='macro_f1': a multiclass figure"),
    (["--CLASS_WEIGHTS=sqrt", "--HEAD_LOSS=supcon"], "has none; set CLASS_WEIGHTS='none'"),
])
def test_bad_rare_class_settings_are_one_error_line(tmp_path, capsys, settings, words):
    argv = [f"--OUTPUT_DIR={tmp_path / 'o'}", f"--CHECKPOINT_DIR={tmp_path / 'c'}", f"--CACHE_DIR={tmp_path / 'k'}",
            "--DEVICE=cpu", "--WEIGHTS=None", *settings]
    assert words in one_error_line(capsys, train.main, argv)
    assert not (tmp_path / "o" / "split.csv").exists()


@pytest.mark.slow
def test_training_with_every_rare_class_setting(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 40, "b": 12, "c": 6, "u": 4, "v": 4})
    cfg = tiny_config(tmp_path, folder, CLASS_WEIGHTS="balanced", BALANCED_SAMPLING=True, MAX_PER_CLASS=15,
                      SELECT_BY="balanced_accuracy", MAX_EPOCHS=2)
    train.run(cfg)
    history = pd.read_csv(tmp_path / "outputs" / "training_history.csv")
    assert history.selected.sum() == 1
    chosen = history[history.selected].iloc[0]
    assert chosen.val_balanced_accuracy == history.val_balanced_accuracy.max()
    best = checkpoints.open_checkpoint(tmp_path / "checkpoints" / "best.pth")
    assert best.epoch == chosen.epoch and best.config["SELECT_BY"] == "balanced_accuracy"
