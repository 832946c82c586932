"""The pipeline's pieces against references, and the six stages end to end on tiny data (CPU)."""
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import backbone
import common
import compute_average_distances as cad
import dataloader
import run_all
import train
import transfer_learning
from conftest import make_image_folder, tiny_config


# ---- model ---------------------------------------------------------------------------------------

def test_parameter_counts_match_the_study():
    from torchinfo import summary
    model = backbone.PlanktonNet(num_classes=6, image_size=128)
    stats = summary(model, input_size=(1, 3, 128, 128), verbose=0)
    assert stats.total_params == 1_503_198
    assert stats.trainable_params == 599_302
    assert backbone.parameter_counts(model) == (1_503_198, 599_302)


@pytest.mark.parametrize("size", [64, 100, 128])
def test_other_image_sizes_give_logits_and_128d_embeddings(size):
    model = backbone.PlanktonNet(num_classes=4, image_size=size).eval()
    logits, embedding = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 4) and embedding.shape == (2, 128)
    assert backbone.trunk_output_size(size) == model.trunk(torch.zeros(1, 3, size, size)).shape[-1]


def test_trunk_has_torchvisions_layout_and_initialisation():
    from torchvision.models import efficientnet_v2_s
    reference = efficientnet_v2_s(weights=None).features[:4].state_dict()
    trunk = backbone.build_trunk().state_dict()
    assert {k: v.shape for k, v in trunk.items()} == {k: v.shape for k, v in reference.items()}
    for key in trunk:
        if key.endswith(("running_var", "running_mean", "num_batches_tracked")) or trunk[key].dim() == 1:
            assert torch.equal(trunk[key], reference[key]), key  # BatchNorm: ones, zeros, fresh statistics
        else:  # convolutions: kaiming normal (fan out), so the same spread, other draws
            assert abs(trunk[key].std().item() / reference[key].std().item() - 1) < 0.25, key


def test_frozen_trunk_is_unchanged_by_a_training_step():
    torch.manual_seed(0)
    model = backbone.PlanktonNet(num_classes=3, image_size=32)
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    head_before = model.head[0].weight.clone()
    model.train()
    assert not model.trunk.training, "the trunk must stay in eval mode (BatchNorm statistics frozen)"
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    logits, _ = model(torch.randn(8, 3, 32, 32) * 3 + 1)  # inputs far from BN's running stats
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    optimizer.step()
    after = model.trunk.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running stats
    assert not torch.equal(head_before, model.head[0].weight)  # while the head did learn


def test_local_weights_file_fills_the_trunk(tmp_path):
    from torchvision.models import efficientnet_v2_s
    torch.manual_seed(1)
    full = efficientnet_v2_s(weights=None)
    torch.save(full.state_dict(), tmp_path / "weights.pth")
    model = backbone.PlanktonNet(num_classes=3, image_size=32)
    source = backbone.load_trunk_weights(model, str(tmp_path / "weights.pth"))
    assert "weights.pth" in source
    assert torch.equal(model.trunk[3][0].block[0][0].weight, full.features[3][0].block[0][0].weight)


# ---- data ----------------------------------------------------------------------------------------

def test_builtin_digits_export_real_images(tmp_path):
    cfg = tiny_config(tmp_path)
    root = dataloader.data_dir(cfg)
    classes = dataloader.list_class_images(root)
    assert sorted(classes) == [str(d) for d in range(10)]
    assert sum(len(v) for v in classes.values()) == 1797  # scikit-learn's bundled digits
    assert Image.open(root / classes["3"][0]).size == (8, 8)


def test_split_is_stratified_disjoint_persisted_and_reread(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 40, "b": 60, "c": 20, "u": 5, "v": 5})
    cfg = tiny_config(tmp_path, folder)
    paths = common.make_output_dirs(cfg)
    split = dataloader.prepare_split(cfg, paths, create=True)
    table = split.table
    assert not table.relpath.duplicated().any()  # every image in exactly one subset
    for name, n in (("a", 40), ("b", 60), ("c", 20)):
        part = table[table.class_name == name].subset.value_counts()
        assert part["test"] == round(0.2 * n) and part["val"] == max(1, round(0.05 * n))
        assert part["train"] == n - part["test"] - part["val"]
    assert (table[table.class_name.isin(["u", "v"])].subset == "unseen").all()
    first_bytes = paths.split.read_bytes()
    again = dataloader.prepare_split(tiny_config(tmp_path, folder, SEED=123), paths, create=True)
    assert paths.split.read_bytes() == first_bytes  # re-read, never re-drawn (even with another seed)
    assert again.sha256 == split.sha256


def test_split_of_small_classes_keeps_one_image_in_each_subset(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 3, "b": 10, "c": 4, "u": 1, "v": 2})
    cfg = tiny_config(tmp_path, folder)
    split = dataloader.prepare_split(cfg, common.make_output_dirs(cfg), create=True)
    counts = split.table.groupby(["class_name", "subset"]).size()
    for name in "abc":
        assert all(counts[(name, s)] >= 1 for s in ("train", "val", "test"))


def test_pad_mode_keeps_the_shape_and_fills_with_the_border_colour():
    image = Image.new("RGB", (40, 10), (200, 10, 10))
    image.paste((0, 0, 255), (18, 3, 22, 7))
    padded = np.asarray(dataloader.resize(image, 40, "pad"))
    stretched = np.asarray(dataloader.resize(image, 40, "stretch"))
    assert tuple(padded[0, 0]) == (200, 10, 10) and tuple(padded[20, 20]) == (0, 0, 255)
    assert (stretched[:, :, 2] > 128).sum() > 3 * (padded[:, :, 2] > 128).sum()  # stretch smears the spot


# ---- the trunk cache -----------------------------------------------------------------------------

def _test_logits(cfg, images):
    checkpoint = common.load_checkpoint(common.output_paths(cfg).best)
    model = backbone.model_from_checkpoint(checkpoint, torch.device("cpu"))
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
    split = dataloader.prepare_split(runs["cached"], common.output_paths(runs["cached"]), create=False)
    relpaths, labels = split.subset("test")
    dataset = dataloader.ImageDataset(tiny_folder, relpaths, labels, 32, "stretch")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    logits = {name: _test_logits(cfg, images) for name, cfg in runs.items()}
    scale = logits["uncached"].abs().max().item()
    assert (logits["cached"] - logits["uncached"]).abs().max().item() < 1e-3 * scale
    assert torch.equal(logits["cached"].argmax(1), logits["uncached"].argmax(1))
    # float16 storage rounds the trunk's output (3 significant digits): a nearby model, same predictions
    assert (logits["half"] - logits["uncached"]).abs().max().item() < 0.1 * scale
    assert (logits["half"].argmax(1) == logits["uncached"].argmax(1)).float().mean() >= 0.9


def test_cache_recomputes_an_edited_image_and_keys_on_settings(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder)
    model = backbone.PlanktonNet(num_classes=3, image_size=32).eval()
    relpaths = ["a/img_000.png", "b/img_000.png"]
    cache = tmp_path / "cache"
    first = dataloader.trunk_features(model.trunk, "sha", tiny_folder, relpaths, cfg, cache, torch.device("cpu"))
    Image.new("RGB", (24, 24), (255, 255, 255)).save(tiny_folder / "a/img_000.png")
    os.utime(tiny_folder / "a/img_000.png", ns=(1, 1))  # whatever the clock says, the key changes
    second = dataloader.trunk_features(model.trunk, "sha", tiny_folder, relpaths, cfg, cache, torch.device("cpu"))
    assert not np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    expected = dataloader.compute_trunk_features(model.trunk, tiny_folder, relpaths[:1], cfg, torch.device("cpu"))
    assert np.array_equal(second[0], expected[0])
    key = dataloader.trunk_cache_key
    base = key("sha", tiny_folder, 32, "stretch", "float16")
    assert len({base, key("other", tiny_folder, 32, "stretch", "float16"), key("sha", tiny_folder, 64, "stretch",
               "float16"), key("sha", tiny_folder, 32, "pad", "float16"), key("sha", tiny_folder, 32, "stretch",
               "float32")}) == 5


# ---- distances -----------------------------------------------------------------------------------

@pytest.mark.parametrize("block", [3, 512])
def test_average_distances_equal_brute_force(block):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 17, 40, 9]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    x = rng.normal(size=(len(labels), 16)) * 0.2 + rng.normal(size=(len(sizes), 16))[labels] + 30.0
    euclid = cad.average_euclidean_distances(x, labels, len(sizes), block=block)
    cosine = cad.average_cosine_distances(x, labels, len(sizes))
    for fast, metric in ((euclid, "euclidean"), (cosine, "cosine")):
        slow = cad.brute_force_average_distances(x, labels, len(sizes), metric)
        assert np.isnan(fast[0, 0]) and np.isnan(slow[0, 0])  # one sample: no distinct pairs
        mask = ~np.isnan(slow)
        np.testing.assert_allclose(fast[mask], slow[mask], rtol=1e-6)
        np.testing.assert_allclose(fast, fast.T, rtol=1e-12)


def test_cosine_distance_treats_a_zero_vector_as_orthogonal():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    matrix = cad.average_cosine_distances(x, np.array([0, 0, 1]), 2)
    assert matrix[0, 0] == pytest.approx(1.0)  # cos(u, 0) counts as 0
    assert matrix[0, 1] == pytest.approx(1 - (np.sqrt(0.5) + 0) / 2)


# ---- transfer learning ---------------------------------------------------------------------------

def test_transfer_learning_learns_well_separated_embeddings(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    x = rng.normal(size=(180, 128)) + 6.0 * np.eye(3, 128)[labels] * 3
    cfg = tiny_config(tmp_path, TRANSFER_REPEATS=2)
    results = transfer_learning.transfer_curves(x, labels, cfg, n_jobs=1)
    full = results[results.n_train == results.n_train.max()].groupby("method").balanced_accuracy.mean()
    assert set(full.index) == {"SVC", "Linear", "kNN"} and (full > 0.95).all()
    assert results.n_train.min() == 3  # one per class
    shuffled = transfer_learning.transfer_curves(x, rng.permutation(labels), cfg, n_jobs=1)
    assert shuffled[shuffled.n_train == shuffled.n_train.max()].balanced_accuracy.mean() < 0.6


def test_stratified_subset_has_every_class_and_the_size_asked():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 45)
    for size in (3, 10, 37, 100):
        picked = transfer_learning.stratified_subset(labels, size, seed=0)
        assert len(picked) == size and len(set(picked)) == size
        assert set(labels[picked]) == {0, 1, 2}


# ---- end to end ----------------------------------------------------------------------------------

def test_all_six_stages_end_to_end(tiny_cfg):
    times = run_all.run(tiny_cfg)
    assert set(times) == {name for name, _ in run_all.STAGES} | {"total"}
    out = common.output_paths(tiny_cfg).out
    expected = ["split.csv", "training_history.csv", "training_plot.png", "test_metrics.csv", "confusion_matrix.png",
                "umap_embeddings.png", "umap_coordinates.csv", "transfer_learning.csv", "accuracy_all.png"]
    expected += [f"embeddings_{s}.pkl" for s in ("train", "test", "unseen")]
    expected += [f"average_{k}_distances_{s}.{e}" for k in ("euclidean", "angular") for s in ("test", "unseen")
                 for e in ("csv", "png")]
    expected += [f"accuracy_{m}.png" for m in ("SVC", "Linear", "kNN")]
    expected += [f"close_faraway_closeotherclass_class_{i}.png" for i in range(3)]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in expected:
        if name.endswith(".png"):
            assert Image.open(out / name).size[0] > 300, name
    metrics = pd.read_csv(out / "test_metrics.csv")
    assert metrics.class_name.tolist() == ["a", "b", "c", "overall"]
    assert metrics.accuracy.iloc[-1] > 0.6  # three easy synthetic classes; chance is 1/3
    best_sha = common.sha256_file(common.output_paths(tiny_cfg).best)
    unseen = common.read_embeddings(out / "embeddings_unseen.pkl", best_sha)
    assert list(unseen.columns[:3]) == ["label", "class_name", "path"] and len(unseen.columns) == 3 + 128
    assert set(unseen.class_name) == {"u", "v"} and len(unseen) == 24
    assert unseen.attrs["subset"] == "unseen" and unseen.attrs["checkpoint_sha256"] == best_sha
    distances = pd.read_csv(out / "average_euclidean_distances_test.csv", index_col=0)
    assert list(distances.columns) == ["a", "b", "c"] and np.allclose(distances.values, distances.values.T)
    assert not list(out.glob(f"*{common.TMP_MARK}*"))


def test_small_data_runs_to_the_end(tmp_path):
    """Classes of 10 images, a validation set smaller than a batch, fewer batches per epoch than
    validation passes asked for, and an unseen class of 2 images (smaller than the test part needs)."""
    folder = make_image_folder(tmp_path / "images", {"a": 10, "b": 10, "c": 10, "u": 2, "v": 6})
    cfg = tiny_config(tmp_path, folder, BATCH_SIZE=64, VAL_PER_EPOCH=10, TRANSFER_REPEATS=1, CLOSE_FAR_COUNT=5)
    times = run_all.run(cfg)
    assert times["total"] > 0
    history = pd.read_csv(common.output_paths(cfg).history)
    assert len(history) == cfg.MAX_EPOCHS  # one batch per epoch: one validation pass each
    results = pd.read_csv(common.output_paths(cfg).out / "transfer_learning.csv")
    assert results.n_test.iloc[0] == 3 and results.balanced_accuracy.notna().all()


# ---- bad input: one clear PipelineError, nothing written -----------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(DATA_DIR="/no/such/folder"), "is not a folder"),
    (dict(SEEN_CLASSES=["a", "bb", "c"]), "'bb' is not a sub-folder"),
    (dict(UNSEEN_CLASSES=["a", "u"]), "in both SEEN_CLASSES and UNSEEN_CLASSES"),
    (dict(SEEN_CLASSES=["a"]), "at least two classes"),
])
def test_bad_settings_stop_training_before_anything_is_written(tmp_path, tiny_folder, settings, message):
    cfg = tiny_config(tmp_path, tiny_folder, **settings)
    with pytest.raises(common.PipelineError, match=message):
        train.run(cfg)
    assert not (tmp_path / "outputs" / "split.csv").exists() and not (tmp_path / "checkpoints" / "best.pth").exists()


def test_misspelt_class_lists_the_folders_that_exist(tmp_path, tiny_folder):
    with pytest.raises(common.PipelineError) as error:
        train.run(tiny_config(tmp_path, tiny_folder, SEEN_CLASSES=["a", "B", "c"]))
    assert "a (16), b (16), c (16), u (12), v (12)" in str(error.value)


def test_empty_class_folder_is_named(tmp_path, tiny_folder):
    (tiny_folder / "empty").mkdir()
    with pytest.raises(common.PipelineError, match="empty holds no images"):
        train.run(tiny_config(tmp_path, tiny_folder, UNSEEN_CLASSES=["u", "empty"]))


@pytest.mark.parametrize("settings, message", [
    (dict(SEEN_CLASSES=["b", "a", "c"]), "was trained on classes"),
    (dict(IMAGE_SIZE=64), "was trained on 32px images"),
    (dict(RESIZE_MODE="pad"), r"\(stretch\)"),
])
def test_a_checkpoint_that_no_longer_matches_the_settings_is_refused(tmp_path, tiny_cfg, settings, message):
    import evaluate
    train.run(tiny_cfg)
    changed = tiny_config(tmp_path, tiny_cfg.DATA_DIR, **settings)
    with pytest.raises(common.PipelineError, match=message if "class" not in message else "drawn for seen"):
        evaluate.run(changed)
    assert not (tmp_path / "outputs" / "test_metrics.csv").exists()


@pytest.mark.parametrize("stage", ["evaluate", "embed", "compute_average_distances", "dimensionality_reduction",
                                   "transfer_learning"])
def test_a_stage_run_before_its_input_exists_says_what_to_run(tiny_cfg, stage):
    import importlib
    with pytest.raises(common.PipelineError, match="run train.py first"):
        importlib.import_module(stage).run(tiny_cfg)


def test_an_image_over_the_decompression_bomb_limit_is_rejected_by_path(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 24 - 1)  # our 24 x 24 images count as "too large"
    relpaths = ["a/img_000.png"]
    bad = dataloader.scan_images(tiny_folder, relpaths, tmp_path / "scan.csv")
    assert list(bad) == relpaths and "decompression-bomb" in bad["a/img_000.png"]


def test_a_damaged_embeddings_file_or_settings_file_is_one_clear_error(tmp_path, tiny_cfg):
    import transfer_learning
    run_all.run(tiny_cfg)
    unseen = common.output_paths(tiny_cfg).embeddings["unseen"]
    unseen.write_bytes(unseen.read_bytes()[:100])
    with pytest.raises(common.PipelineError, match="re-run embed.py"):
        transfer_learning.run(tiny_cfg)
    settings = tmp_path / "settings.py"
    settings.write_text("SEED = 0\nLR = 0.001 +\n")
    with pytest.raises(common.PipelineError, match="cannot read settings file"):
        common.load_config([f"--config={settings}"])
