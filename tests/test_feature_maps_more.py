"""feature_maps.py with fine-tuned blocks: they are hooked, the trunk before fine-tuning is rebuilt
and measured on the same images, and FEATURE_MAP_DIR takes the images from another folder."""
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_image_folder, one_error_line, tiny_config

import backbone
import dataloader
import feature_maps
from plankton import locations, provenance
from plankton.errors import PipelineError

RUNTIME = dataloader.Runtime(torch.device("cpu"), 8, 0, False, False)
ARCH = backbone.architecture_args(3, 32, 8, 0.1, "resnet18", finetune_blocks=2)


def seeded_model(seed: int) -> backbone.PlanktonNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return backbone.build_model(ARCH)


def test_auto_modules_hook_the_tuned_blocks_and_the_trunk_forward_runs_through_them():
    model = seeded_model(0).eval()
    names = feature_maps.auto_modules(model)
    assert [n for n in names if n.startswith("tuned_trunk.")] == ["tuned_trunk.layer1", "tuned_trunk.layer2"]
    assert "trunk.conv1" in names and all(feature_maps.is_trunk_module(n) for n in names if "trunk" in n)
    trunk_names = [n for n in names if feature_maps.is_trunk_module(n)]
    with feature_maps.hooked(model, trunk_names) as stats, torch.inference_mode():
        model.whole_trunk()(torch.rand(4, 3, 32, 32))
    assert all(stats[n].values > 0 for n in trunk_names)  # every hook fired, the tuned blocks' too
    assert stats["tuned_trunk.layer2"].pooled_matrix().shape == (4, 128)


def test_a_random_trunk_replaces_the_tuned_blocks_too_and_head_init_keeps_them():
    trained = seeded_model(0)
    with torch.no_grad():
        for p in trained.tuned_trunk.parameters():
            p.add_(1.0)  # "fine-tuned"
    random_trunk = feature_maps.variant_model(ARCH, trained, 7, "head", RUNTIME).state_dict()
    head_init = feature_maps.variant_model(ARCH, trained, 7, "trunk", RUNTIME).state_dict()
    state = trained.state_dict()
    tuned = [k for k in state if k.startswith("tuned_trunk.") and state[k].is_floating_point()]
    assert tuned and not any(torch.equal(random_trunk[k], state[k]) for k in tuned if "weight" in k)
    assert all(torch.equal(head_init[k], state[k]) for k in tuned)


def test_the_pretrained_trunk_is_rebuilt_from_the_seed_and_refused_when_its_frozen_blocks_differ(capsys):
    initial = seeded_model(5)
    checkpoint = types.SimpleNamespace(arch=ARCH, seed=5, trunk_sha256=backbone.frozen_trunk_sha256(initial),
                                       weights_source="random initialisation (WEIGHTS=None)")
    rebuilt = feature_maps.pretrained_model(checkpoint, None, RUNTIME)
    assert rebuilt is not None
    for key, value in initial.state_dict().items():
        if key.startswith(("trunk.", "tuned_trunk.")):
            assert torch.equal(rebuilt.state_dict()[key], value), key
    other = types.SimpleNamespace(**{**vars(checkpoint), "seed": 6})  # another seed: other frozen weights
    assert feature_maps.pretrained_model(other, None, RUNTIME) is None
    assert "pretrained_trunk skipped" in capsys.readouterr().out


def test_the_side_by_side_table_pairs_each_trunk_module_and_its_change():
    rows = []
    for condition, shift in (("seen_test", 0.1), ("pretrained_trunk", 0.0), ("unseen", 0.3)):
        for module, base in (("trunk.conv1", 0.4), ("tuned_trunk.layer2", 0.5)):
            moved = shift if module.startswith("tuned") else 0.0
            rows.append(dict(module=module, condition=condition, n_images=9, n_channels=64,
                             nonpositive_share=base + moved, effective_rank=10 + 10 * moved, eig_1=1.0 + moved))
    table = feature_maps.finetune_comparison(pd.DataFrame(rows))
    assert list(table.module) == ["trunk.conv1", "tuned_trunk.layer2"]
    assert list(table.part) == ["frozen block", "fine-tuned block"]
    assert table.nonpositive_share_change.tolist() == pytest.approx([0.0, 0.1])
    assert table.effective_rank_finetuned.tolist() == pytest.approx([10.0, 11.0])


def test_a_container_is_named_by_what_it_holds_not_sequential():
    model = seeded_model(0)
    assert feature_maps.module_kind(model.tuned_trunk.layer1) == "2 x BasicBlock"
    nested = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)),
                                 torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.ReLU()))
    assert feature_maps.module_kind(nested) == "2 stages: 2 Conv2d, 1 ReLU"
    assert feature_maps.module_kind(torch.nn.Conv2d(1, 1, 1)) == "Conv2d"


def test_feature_map_dir_takes_readable_images_at_any_depth(tmp_path):
    folder = make_image_folder(tmp_path / "other" / "deep", {"x": 3, "y": 2}, size=16)
    (folder / "x" / "broken.png").write_bytes(b"not a png")
    sets = feature_maps.folder_images(tmp_path / "other", 100, 0, tmp_path / "scan.csv")
    assert len(sets.test) == 5 and not sets.unseen and all(p.startswith("deep/") for p in sets.test)
    assert sets.words == "images of other/"
    assert len(feature_maps.folder_images(tmp_path / "other", 2, 0, tmp_path / "scan.csv").test) <= 2
    with pytest.raises(PipelineError, match="FEATURE_MAP_DIR=.*not a folder"):
        feature_maps.folder_images(tmp_path / "missing", 10, 0, tmp_path / "scan.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no readable image"):
        feature_maps.folder_images(tmp_path / "empty", 10, 0, tmp_path / "scan.csv")


def test_a_wrong_feature_map_dir_is_one_error_line_before_anything_is_read(tmp_path, capsys):
    line = one_error_line(capsys, feature_maps.main, [f"--FEATURE_MAP_DIR={tmp_path / 'nowhere'}",
                                                     f"--OUTPUT_DIR={tmp_path / 'out'}",
                                                     f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}",
                                                     f"--CACHE_DIR={tmp_path / 'cache'}", "--DEVICE=cpu"])
    assert "FEATURE_MAP_DIR=" in line and "nowhere" in line and "not a folder" in line
    assert not list((tmp_path / "out").glob("feature_map*"))


@pytest.mark.slow
def test_a_fine_tuned_run_compares_its_trunk_with_the_pretrained_one_on_the_same_images(tmp_path, tiny_folder):
    import train
    cfg = tiny_config(tmp_path, tiny_folder, TRUNK="resnet18", FINETUNE_BLOCKS=1, MAX_EPOCHS=1, VAL_PER_EPOCH=1,
                      FEATURE_IMAGES=8)
    train.run(cfg)
    feature_maps.run(cfg)
    out = locations.Paths.from_settings(cfg).out
    table = pd.read_csv(out / "feature_map_finetune_vs_pretrained.csv")
    assert (out / "feature_map_finetune_vs_pretrained.png").is_file()
    frozen, tuned = table[table.part == "frozen block"], table[table.part == "fine-tuned block"]
    assert list(tuned.module) == ["tuned_trunk.layer2"] and len(frozen) >= 3
    # the frozen blocks are the same weights both ways, on the same images: equal statistics
    np.testing.assert_allclose(frozen.effective_rank_finetuned, frozen.effective_rank_pretrained, rtol=1e-6)
    assert (tuned.effective_rank_change.abs() > 0).all()  # trained: the tuned block moved
    assert (table.n_images == 8).all()
    stats = pd.read_csv(out / "feature_map_stats.csv")
    assert {"pretrained_trunk", "seen_test", "unseen"} <= set(stats.condition)
    # the same model on another folder's images: every condition on them, and the record knows them
    cfg.FEATURE_MAP_DIR = str(tiny_folder / "u")
    feature_maps.run(cfg)
    stats = pd.read_csv(out / "feature_map_stats.csv")
    assert "unseen" not in set(stats.condition) and stats.description.str.endswith("images of u/").all()
    assert (pd.read_csv(out / "feature_map_finetune_vs_pretrained.csv").n_images == 8).all()
    paths = locations.Paths.from_settings(cfg)
    assert provenance.why_rerun(paths, "feature_maps", cfg) is None
    measured = [p for p in provenance.read_record(paths, "feature_maps").inputs if "/u/" in p]
    assert len(measured) == 8
    Path(measured[0]).write_bytes(Path(measured[1]).read_bytes())  # an image replaced: run again
    assert provenance.why_rerun(paths, "feature_maps", cfg) == "its inputs or outputs changed"
