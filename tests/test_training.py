"""Training pieces: the trunk cache, cached vs uncached training, resuming, reproducibility."""
import dataclasses
import os

import numpy as np
import pytest
import torch
from conftest import assert_same_tensors, make_image_folder, model_tensors, tiny_config, train_killed_after_first
from PIL import Image

import backbone
import dataloader
import evaluate
import train
from plankton import checkpoints, locations, splits, trunk_cache
from plankton.errors import PipelineError

PREPROCESS = dataloader.Preprocess(32, "stretch", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RUNTIME = dataloader.Runtime(torch.device("cpu"), batch_size=8, workers=0, channels_last=True, mixed_precision=False)


def _test_logits(cfg, images):
    checkpoint = checkpoints.open_checkpoint(locations.Paths.from_settings(cfg).best)
    model = checkpoint.build_model(torch.device("cpu"))
    with torch.no_grad():
        return model(images)[0]


def test_cached_training_is_the_same_function_as_uncached(tmp_path, tiny_folder):
    """Same seed, same batches, same dropout: training on cached trunk output gives the model that
    training through the trunk gives. (A conv bias before BatchNorm gets ~0 gradient, which Adam
    rescales, so the tensors agree only to rounding; the function is what must agree.)"""
    runs = {name: tiny_config(tmp_path / name, tiny_folder, **settings) for name, settings in (
        ("cached", dict(CACHE_TRUNK=True, CACHE_DTYPE="float32")), ("uncached", dict(CACHE_TRUNK=False)),
        ("half", dict(CACHE_TRUNK=True, CACHE_DTYPE="float16")))}
    for cfg in runs.values():
        train.run(cfg)
    split = splits.split_from_settings(runs["cached"], locations.Paths.from_settings(runs["cached"]), create=False)
    relpaths, labels = split.subset("test")
    dataset = dataloader.ImageDataset(tiny_folder, relpaths, labels, PREPROCESS)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    logits = {name: _test_logits(cfg, images) for name, cfg in runs.items()}
    scale = logits["uncached"].abs().max().item()
    assert (logits["cached"] - logits["uncached"]).abs().max().item() < 1e-3 * scale
    assert torch.equal(logits["cached"].argmax(1), logits["uncached"].argmax(1))
    # float16 storage rounds the trunk's output (3 significant digits): a nearby model, same predictions
    assert (logits["half"] - logits["uncached"]).abs().max().item() < 0.1 * scale
    assert (logits["half"].argmax(1) == logits["uncached"].argmax(1)).float().mean() >= 0.9


def test_cache_recomputes_an_edited_image_and_keys_on_settings(tmp_path, tiny_folder):
    model = backbone.PlanktonNet(num_classes=3, image_size=32).eval()
    relpaths = ["a/img_000.png", "b/img_000.png"]
    cache = trunk_cache.TrunkCache(tmp_path / "cache", model.trunk, "sha", PREPROCESS, RUNTIME, "float16")
    first = cache.features(tiny_folder, relpaths)
    Image.new("RGB", (24, 24), (255, 255, 255)).save(tiny_folder / "a/img_000.png")
    os.utime(tiny_folder / "a/img_000.png", ns=(1, 1))  # whatever the clock says, the key changes
    second = cache.features(tiny_folder, relpaths)
    assert not np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    expected = dataloader.compute_trunk_features(model.trunk, tiny_folder, relpaths[:1], PREPROCESS, RUNTIME, np.float16)
    assert np.array_equal(second[0], expected[0])
    key = trunk_cache.cache_key
    other = dict(image_size=64), dict(resize_mode="pad"), dict(mean=(0.5, 0.5, 0.5))
    keys = {key("sha", tiny_folder, PREPROCESS, "float16"), key("other", tiny_folder, PREPROCESS, "float16"),
            key("sha", tiny_folder, PREPROCESS, "float32"), key("sha", tiny_folder / "a", PREPROCESS, "float16")}
    keys |= {key("sha", tiny_folder, dataclasses.replace(PREPROCESS, **change), "float16") for change in other}
    assert len(keys) == 7


def test_a_start_over_run_killed_early_is_not_mistaken_for_the_old_finished_run(tmp_path, tiny_folder,
                                                                                monkeypatch, capsys):
    """--RESUME=False, killed right after its first best.pth and before its first last.pth: the next
    run must not take the OLD run's finished last.pth for its own and stop ('training already
    finished') while best.pth holds the new run's model after one validation pass."""
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=3)
    paths = locations.Paths.from_settings(cfg)
    train.run(cfg)
    fully_trained = model_tensors(paths.best)

    # stands in for a kill right after the new run's first best.pth
    train_killed_after_first(tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=3, RESUME=False), monkeypatch, "best.pth")
    capsys.readouterr()

    train.run(cfg)  # same settings, RESUME=True: must train (the new run has no last.pth of its own)
    out = capsys.readouterr().out
    assert "training already finished" not in out, ("the old run's finished last.pth was taken for the killed "
                                                   "--RESUME=False run: best.pth is left after one validation pass")
    assert_same_tensors(model_tensors(paths.best), fully_trained)
    assert checkpoints.open_checkpoint(paths.last).finished


def test_one_seed_gives_the_same_split_and_metrics_in_two_folders(tmp_path):
    outputs = []
    for name in ("first", "second"):
        data = make_image_folder(tmp_path / name / "images", {"a": 16, "b": 16, "c": 16, "u": 6, "v": 6})
        cfg = tiny_config(tmp_path / name, data, SEED=7)
        train.run(cfg)
        evaluate.run(cfg)
        outputs.append(locations.Paths.from_settings(cfg).out)
    for file in ("split.csv", "test_metrics.csv", "training_history.csv"):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes(), file
    assert_same_tensors(model_tensors(tmp_path / "first" / "checkpoints" / "best.pth"),
                         model_tensors(tmp_path / "second" / "checkpoints" / "best.pth"))



def test_a_finished_run_with_other_settings_says_what_differs(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=2)
    train.run(cfg)
    best = locations.Paths.from_settings(cfg).best.read_bytes()
    summary = locations.Paths.from_settings(cfg).model_summary.read_text()
    assert "Trainable params: " in summary and "trunk weights: random initialisation" in summary
    with pytest.raises(PipelineError, match=r"finished training run with other settings \(MAX_EPOCHS: 2 -> 3\)"
                                                   r".*--RESUME=False"):
        train.run(tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=3))
    assert locations.Paths.from_settings(cfg).best.read_bytes() == best


def test_a_diverging_run_stops_with_one_line_and_no_finished_last_checkpoint(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, LR=1e30)  # Adam with this step size overflows at once
    with pytest.raises(PipelineError, match="training diverged .* lower LR"):
        train.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    assert not paths.best.exists() and not paths.last.exists()
