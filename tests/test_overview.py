"""dataset_overview.py and feature_maps.py: counts against a direct count of split.csv, hook statistics
against direct computations on a tiny model, one-line errors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import dir_args, make_image_folder, tiny_config
from PIL import Image

import backbone
import dataset_overview
import feature_maps
import train
from plankton import hashing, locations, provenance, splits, system
from plankton.errors import PipelineError


def test_class_counts_equal_a_direct_count_of_split_csv(tiny_cfg):
    dataset_overview.run(tiny_cfg)
    paths = locations.Paths.from_settings(tiny_cfg)
    split = pd.read_csv(paths.split, dtype=str)
    counts = pd.read_csv(paths.out / "class_counts.csv", dtype={"class_name": str})
    assert counts.class_name.tolist() == ["a", "b", "c", "u", "v", dataset_overview.ALL_CLASSES]
    for row in counts.itertuples():
        mine = split if row.class_name == dataset_overview.ALL_CLASSES else split[split.class_name == row.class_name]
        for subset in ("train", "val", "test", "unseen"):
            assert getattr(row, subset) == int((mine.subset == subset).sum()), (row.class_name, subset)
        assert row.total == len(mine)
    assert counts.set_index("class_name").loc[["u", "v"], "kind"].tolist() == ["unseen", "unseen"]
    for name in ("class_counts.png", "sample_images.png"):
        assert Image.open(paths.out / name).size[0] > 300
    record = json.loads(provenance.provenance_path(paths, "dataset_overview").read_text())
    assert sorted(record["outputs"]) == ["class_counts.csv", "class_counts.png", "sample_images.png"]


def test_the_overview_draws_the_split_train_then_keeps(tiny_cfg):
    dataset_overview.run(tiny_cfg)
    paths = locations.Paths.from_settings(tiny_cfg)
    drawn = hashing.sha256_file(paths.split)
    split = splits.split_from_settings(tiny_cfg, paths, create=True)  # what train.py calls
    assert split.sha256 == drawn


def test_a_class_smaller_than_the_sample_row_leaves_blank_cells(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 3, "b": 12, "u": 2, "v": 5})
    cfg = tiny_config(tmp_path, folder, SEEN_CLASSES=["a", "b"], UNSEEN_CLASSES=["u", "v"], OVERVIEW_SAMPLES=4)
    dataset_overview.run(cfg)
    counts = pd.read_csv(locations.Paths.from_settings(cfg).out / "class_counts.csv", index_col="class_name")
    assert counts.loc["a", ["train", "val", "test"]].tolist() == [1, 1, 1]
    picked = dataset_overview.pick_samples(pd.read_csv(locations.Paths.from_settings(cfg).split, dtype=str),
                                           ["a", "b", "u"], 4, 0)
    assert [len(picked[c]) for c in ("a", "b", "u")] == [3, 4, 2]


# ---- feature maps --------------------------------------------------------------------------------

@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return backbone.PlanktonNet(3, 32, embedding_dim=8, trunk="resnet18").eval()


def test_hooks_record_the_share_of_non_positive_values_and_the_pooled_vectors(tiny_model):
    images = torch.randn(5, 3, 32, 32)
    direct = {}
    handle = tiny_model.head[0].register_forward_hook(lambda m, i, o: direct.setdefault("out", o.detach().clone()))
    with torch.inference_mode():
        tiny_model(images)
    handle.remove()
    with feature_maps.hooked(tiny_model, ["head.0", "trunk.layer1"]) as stats, torch.inference_mode():
        tiny_model(images[:2])
        tiny_model(images[2:])  # two batches: the totals add up
    out = direct["out"]
    assert stats["head.0"].nonpositive_share == pytest.approx(float((out <= 0).float().mean()))
    assert np.allclose(stats["head.0"].pooled_matrix(), out.mean(dim=(2, 3)).double().numpy(), atol=1e-6)
    assert all(not m._forward_hooks for m in tiny_model.modules())  # removed on leaving


def test_the_spectrum_is_eigvalsh_of_the_covariance_largest_first():
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6))
    centred = pooled - pooled.mean(0)
    covariance = centred.T @ centred / (len(pooled) - 1)
    assert np.allclose(feature_maps.spectrum(pooled), np.sort(np.linalg.eigvalsh(covariance))[::-1])
    assert feature_maps.effective_rank(np.array([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert feature_maps.effective_rank(np.array([5.0, 0.0])) == pytest.approx(1.0)


def test_auto_modules_are_the_trunk_blocks_and_the_head_convolutions(tiny_model):
    assert feature_maps.auto_modules(tiny_model) == ["trunk.conv1", "trunk.bn1", "trunk.layer1", "trunk.layer2",
                                                     "head.0", "head.3"]
    effnet = backbone.PlanktonNet(3, 32, embedding_dim=8)
    assert feature_maps.auto_modules(effnet) == ["trunk.0", "trunk.1", "trunk.2", "trunk.3", "head.0", "head.3"]


def test_an_unknown_module_name_is_one_line_listing_the_valid_names(tiny_model):
    with pytest.raises(PipelineError) as err:
        feature_maps.resolve_modules(tiny_model, ["trunk.layer1", "head.9"])
    message = str(err.value)
    assert "\n" not in message and "'head.9'" in message and "head.0" in message and "trunk.layer2" in message


def test_the_head_at_initialisation_is_what_train_py_built_before_its_first_step(tiny_model):
    arch = backbone.architecture_args(3, 32, 8, trunk="resnet18")
    system.set_seed(7)
    before_training = backbone.build_model(arch)  # as train.py: seed, then build
    trained = backbone.build_model(arch)  # another draw stands for the trained weights
    runtime = dataloader_runtime()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    init = feature_maps.variant_model(arch, trained, 7, "trunk", runtime)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    for key, value in init.state_dict().items():
        expected = trained.state_dict()[key] if key.startswith("trunk.") else before_training.state_dict()[key]
        assert torch.equal(value, expected), key
    random_trunk = feature_maps.variant_model(arch, trained, 8, "head", runtime)
    assert torch.equal(random_trunk.head[0].weight, trained.head[0].weight)
    assert not torch.equal(random_trunk.trunk.conv1.weight, trained.trunk.conv1.weight)


def dataloader_runtime():
    import dataloader
    return dataloader.Runtime(torch.device("cpu"), 8, 0, False, False)


def test_feature_maps_on_a_trained_tiny_model(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", {"a": 3, "b": 10, "u": 4, "v": 4})
    cfg = tiny_config(tmp_path, folder, SEEN_CLASSES=["a", "b"], UNSEEN_CLASSES=["u", "v"], MAX_EPOCHS=1,
                      TRUNK="resnet18", FEATURE_IMAGES=5)
    train.run(cfg)
    feature_maps.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    stats = pd.read_csv(paths.out / "feature_map_stats.csv")
    assert set(zip(stats.module, stats.condition)) == {
        (m, c) for m in ("trunk.conv1", "trunk.bn1", "trunk.layer1", "trunk.layer2") for c in
        ("seen_test", "unseen", "random_trunk")} | {(m, c) for m in ("head.0", "head.3")
                                                    for c in ("seen_test", "unseen", "head_init")}
    assert stats.set_index("condition").loc["unseen", "n_images"].eq(5).all()  # 8 unseen images, 5 drawn
    assert stats.set_index("condition").loc["seen_test", "n_images"].eq(3).all()  # 1 + 2 test images
    assert stats.nonpositive_share.between(0, 1).all()
    spectra = pd.read_csv(paths.out / "feature_map_spectra.csv")
    for (module, condition), values in spectra.groupby(["module", "condition"]).eigenvalue:
        assert (np.diff(values.to_numpy()) <= 1e-12).all(), (module, condition)
    for name in ("feature_map_spectra.png", "feature_map_nonpositive.png"):
        assert Image.open(paths.out / name).size[0] > 300
    assert json.loads(provenance.provenance_path(paths, "feature_maps").read_text())["stage"] == "feature_maps"


@pytest.mark.parametrize("argument", ["--FEATURE_MODULES=[]", "--FEATURE_MODULES=trunk.0", "--FEATURE_IMAGES=1",
                                      "--OVERVIEW_SAMPLES=0"])
@pytest.mark.parametrize("main", [dataset_overview.main, feature_maps.main], ids=["overview", "feature_maps"])
def test_a_bad_setting_is_one_line_before_anything_is_written(tmp_path, capsys, main, argument):
    with pytest.raises(SystemExit) as stop:
        main([*dir_args(tmp_path), argument])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: ")
    assert argument.split("=")[0].lstrip("-") in lines[0]
    assert not list(tmp_path.iterdir())
