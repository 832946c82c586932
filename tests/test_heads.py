"""Head losses (HEAD_LOSS, plankton/heads.py) and compare_heads.py: each loss trains on tiny data and
its checkpoint classifies; a head trained without cross-entropy classifies by the nearest class
direction of its training embeddings; a loss added to the table is accepted; bad values are one line."""
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_same_tensors, model_tensors, script, tiny_config, train_killed_after_first

import compare_heads
import dataloader
import train
from plankton import checkpoints, heads, locations, settings, training
from plankton.errors import PipelineError


def trained_outputs(cfg, subset: str):
    """(logits, embeddings, labels) of a subset under best.pth, and the opened TrainedModel."""
    paths = locations.Paths.from_settings(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, channels_last=False)
    source = trained.source(subset)
    logits, embeddings = training.head_outputs(trained.model, source, runtime)
    return logits, embeddings, source.labels.numpy(), trained


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("loss", ["supcon", "triplet", "arcface", "ce+triplet", "ce+arcface"])
def test_each_head_loss_trains_a_model_that_classifies_its_test_images(tmp_path, tiny_folder, loss):
    cfg = tiny_config(tmp_path, tiny_folder, HEAD_LOSS=loss, MAX_EPOCHS=2, VAL_PER_EPOCH=1)
    train.run(cfg)
    logits, _, labels, trained = trained_outputs(cfg, "test")
    assert trained.checkpoint.config["HEAD_LOSS"] == loss  # recorded with the settings it was trained with
    assert np.mean(logits.argmax(1) == labels) > 1 / 3 + 0.3  # three classes: chance is 1/3
    last = checkpoints.open_checkpoint(locations.Paths.from_settings(cfg).last)
    assert ("metric.W" in last.training["head_loss"]) == loss.endswith("arcface")  # ArcFace's weights, to resume
    if loss.startswith("ce+"):
        return
    # no cross-entropy: the classifier is the cosine nearest class direction of the training embeddings
    _, train_embeddings, train_labels, _ = trained_outputs(cfg, "train")
    _, test_embeddings, _, _ = trained_outputs(cfg, "test")
    if loss == "arcface":
        directions = last.training["head_loss"]["metric.W"].double().numpy().T
    else:
        directions = np.stack([unit(train_embeddings[train_labels == c].astype(np.float64)).mean(0) for c in range(3)])
    nearest = (unit(test_embeddings.astype(np.float64)) @ unit(directions).T).argmax(1)
    assert np.array_equal(logits.argmax(1), nearest)
    weight = trained.model.classifier.weight.detach().double().numpy()
    assert np.allclose(unit(weight), unit(directions), atol=1e-4)  # the training pass read float16 cached features
    assert np.all(trained.model.classifier.bias.detach().numpy() == 0)


def test_fit_classifier_is_the_nearest_class_mean_by_cosine():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    x = rng.normal(size=(120, 16)) + 2.5 * np.eye(16)[labels * 3]
    model = torch.nn.Module()
    model.classifier = torch.nn.Linear(16, 4)
    criterion = heads.Criterion("supcon", training.tasks.MULTICLASS, 4, 16)
    heads.fit_classifier(model, criterion, x.astype(np.float32), labels)
    queries = rng.normal(size=(200, 16)) + 2.5 * np.eye(16)[rng.integers(0, 4, 200) * 3]
    means = np.stack([unit(x[labels == c]).mean(0) for c in range(4)])
    brute = np.array([max(range(4), key=lambda c: q @ means[c] / np.linalg.norm(means[c])) for q in queries])
    with torch.no_grad():
        logits = model.classifier(torch.as_tensor(queries, dtype=torch.float32)).numpy()
    assert np.array_equal(logits.argmax(1), brute)
    median_norm = np.sort(np.linalg.norm(x, axis=1))[(len(x) - 1) // 2]  # torch's median: the lower middle value
    assert np.linalg.norm(model.classifier.weight.detach().numpy(), axis=1) == pytest.approx(
        heads.COSINE_SCALE / median_norm, rel=1e-5)  # a median-norm image's logits are COSINE_SCALE x cos


def test_a_loss_added_to_the_table_is_accepted_by_the_settings_and_trains(monkeypatch):
    from pytorch_metric_learning import losses
    monkeypatch.setitem(heads.LOSSES, "contrastive", heads.HeadLoss(
        "contrastive", lambda classes, dim: losses.ContrastiveLoss(pos_margin=0, neg_margin=1)))
    assert settings.load_settings(["--HEAD_LOSS=contrastive"]).HEAD_LOSS == "contrastive"
    assert settings.load_settings(["--HEAD_LOSS=ce+contrastive"]).HEAD_LOSS == "ce+contrastive"
    assert "'ce+contrastive'" in settings.accepts(settings.SCHEMA["HEAD_LOSS"])
    criterion = heads.Criterion("ce+contrastive", training.tasks.MULTICLASS, 3, 8, weight=0.5)
    embeddings = torch.randn(12, 8, requires_grad=True)
    logits, labels = torch.randn(12, 3), torch.arange(12) % 3
    loss = criterion(logits, embeddings, labels)
    expected = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * losses.ContrastiveLoss(
        pos_margin=0, neg_margin=1)(embeddings, labels)
    assert torch.allclose(loss, expected)


def test_ce_is_the_tasks_own_loss_and_needs_no_metric_library():
    criterion = heads.Criterion("ce", training.tasks.MULTICLASS, 3, 8)
    assert criterion.metric is None and not criterion.fits_classifier and not list(criterion.parameters())
    logits, labels = torch.randn(6, 3), torch.arange(6) % 3
    assert torch.equal(criterion(logits, None, labels, label_smoothing=0.1),
                       torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))


@pytest.mark.parametrize("args, words", [
    (["--HEAD_LOSS=tripplet"], "HEAD_LOSS='tripplet': must be 'ce', "),
    (["--HEAD_LOSS=ce+ce"], "HEAD_LOSS='ce+ce': must be"),
    (["--HEAD_LOSS=ce+triplet", "--HEAD_LOSS_WEIGHT=0"], "HEAD_LOSS_WEIGHT=0: must be a number > 0 and <= 100"),
    (["--HEAD_LOSS_WEIGHT=-1"], "HEAD_LOSS_WEIGHT=-1: must be"),
    (["--HEAD_COMPARE_EPOCHS=0"], "HEAD_COMPARE_EPOCHS=0: must be"),
])
def test_a_bad_head_setting_is_one_line(args, words):
    with pytest.raises(PipelineError) as caught:
        settings.load_settings(args)
    assert str(caught.value).startswith(words) and "\n" not in str(caught.value)


def test_a_metric_loss_with_a_multilabel_task_or_label_smoothing_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"^HEAD_LOSS='triplet': a metric loss needs one class per image"):
        heads.check_loss("triplet", "multilabel")
    with pytest.raises(PipelineError, match=r"^LABEL_SMOOTHING=0.1: smooths the cross-entropy"):
        heads.check_loss("arcface", "multiclass", 0.1)
    heads.check_loss("ce+arcface", "multiclass", 0.1)  # cross-entropy is there to smooth
    heads.check_loss("ce", "multilabel")
    done = script("train.py", "--TASK=multilabel", "--HEAD_LOSS=ce+supcon", f"--OUTPUT_DIR={tmp_path / 'o'}",
                  f"--CHECKPOINT_DIR={tmp_path / 'c'}", f"--CACHE_DIR={tmp_path / 'k'}", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: HEAD_LOSS='ce+supcon': a metric loss needs")
    assert not (tmp_path / "o" / "split.csv").exists()  # refused before anything was written


def test_an_arcface_run_killed_after_its_first_epoch_resumes_to_the_same_model(tmp_path, tiny_folder, monkeypatch):
    """ArcFace's class weights are trained with the head: last.pth keeps them, and a resumed run ends
    with the same best.pth as one that ran through."""
    through = tiny_config(tmp_path / "through", tiny_folder, HEAD_LOSS="arcface", MAX_EPOCHS=2, VAL_PER_EPOCH=1)
    train.run(through)
    killed = tiny_config(tmp_path / "killed", tiny_folder, HEAD_LOSS="arcface", MAX_EPOCHS=2, VAL_PER_EPOCH=1)
    train_killed_after_first(killed, monkeypatch)
    train.run(killed)
    a, b = locations.Paths.from_settings(through), locations.Paths.from_settings(killed)
    assert_same_tensors(model_tensors(a.best), model_tensors(b.best))
    assert_same_tensors(checkpoints.open_checkpoint(a.last).training["head_loss"],
                        checkpoints.open_checkpoint(b.last).training["head_loss"])


# ---- compare_heads.py -----------------------------------------------------------------------------

@pytest.mark.slow  # two train.py processes
def test_compare_heads_writes_a_row_per_loss_and_its_figure(tmp_path, tiny_folder):
    losses = ["ce", "ce+supcon"]  # two runs of train.py, one epoch each: the table and figure, not the losses, are tested
    cfg = tiny_config(tmp_path, tiny_folder, HEAD_COMPARE_LOSSES=losses, HEAD_COMPARE_EPOCHS=1, VAL_PER_EPOCH=1,
                      FEWSHOT_DRAWS=3)
    compare_heads.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    table = pd.read_csv(paths.out / "compare_heads.csv")
    assert list(table.loss) == losses
    for loss in losses:  # each trained in its own folder, with its loss recorded, from the shared trunk
        best = checkpoints.open_checkpoint(paths.out / "compare_heads" / loss / "best.pth")
        assert best.config["HEAD_LOSS"] == loss and best.config["MAX_EPOCHS"] == 1
    assert len({checkpoints.open_checkpoint(paths.out / "compare_heads" / loss / "best.pth").trunk_sha256
                for loss in losses}) == 1
    assert not paths.best.exists()  # the main run's checkpoint is not made or touched
    assert table.test_accuracy.between(0, 1).all() and table.auroc_knn.between(0, 1).all()
    assert table.silhouette_unseen.between(-1, 1).all() and (table.train_seconds > 0).all()
    # 8 training images per unseen class: k = 1 and 5 with their intervals, k = 10 left empty
    assert (table.fewshot_1_low <= table.fewshot_1).all() and (table.fewshot_5 <= table.fewshot_5_high).all()
    assert table.fewshot_10.isna().all()
    assert (paths.out / "compare_heads.png").stat().st_size > 20_000


def test_compare_heads_refuses_an_unknown_loss_before_training(tmp_path):
    done = script("compare_heads.py", "--HEAD_COMPARE_LOSSES=['ce', 'tripplet']", f"--OUTPUT_DIR={tmp_path / 'o'}",
                  f"--CHECKPOINT_DIR={tmp_path / 'c'}", f"--CACHE_DIR={tmp_path / 'k'}", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: HEAD_COMPARE_LOSSES=['ce', 'tripplet']: 'tripplet' is not a head loss")
