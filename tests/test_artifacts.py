"""The hand-offs: checkpoints and embeddings opened safely and checked against the settings, the
split and each other; atomic writes; changed images stop every stage."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Exploit, tiny_config
from PIL import Image

import backbone
import compute_average_distances
import dimensionality_reduction
import embed
import evaluate
import train
import transfer_learning
from plankton import checkpoints, embedding_files, fileio, locations
from plankton import settings as settings_module
from plankton.errors import PipelineError


@pytest.mark.parametrize("settings, message", [
    (dict(SEEN_CLASSES=["b", "a", "c"]), r"was trained with seen classes \['a', 'b', 'c'\]"),
    (dict(UNSEEN_CLASSES=["v", "u"]), r"unseen \['u', 'v'\]"),
    (dict(IMAGE_SIZE=64), "was trained on 32px images"),
    (dict(RESIZE_MODE="pad"), r"\(stretch\)"),
])
def test_a_checkpoint_that_no_longer_matches_the_settings_is_refused(tmp_path, tiny_cfg, settings, message):
    import evaluate
    train.run(tiny_cfg)
    changed = tiny_config(tmp_path, tiny_cfg.DATA_DIR, **settings)
    with pytest.raises(PipelineError, match=message):
        evaluate.run(changed)
    assert not (tmp_path / "outputs" / "test_metrics.csv").exists()


@pytest.mark.parametrize("stage", ["evaluate", "embed", "compute_average_distances", "dimensionality_reduction",
                                   "transfer_learning"])
def test_a_stage_run_before_its_input_exists_says_what_to_run(tiny_cfg, stage):
    import importlib
    with pytest.raises(PipelineError, match="run train.py first"):
        importlib.import_module(stage).run(tiny_cfg)


def test_a_damaged_embeddings_file_or_settings_file_is_one_clear_error(tmp_path, tiny_cfg):
    import transfer_learning
    tiny_cfg.MAX_EPOCHS = 1
    train.run(tiny_cfg)
    embed.run(tiny_cfg)
    unseen = locations.Paths.from_settings(tiny_cfg).embeddings("unseen")
    unseen.write_bytes(unseen.read_bytes()[:100])
    with pytest.raises(PipelineError, match="re-run embed.py"):
        transfer_learning.run(tiny_cfg)
    settings = tmp_path / "settings.py"
    settings.write_text("SEED = 0\nLR = 0.001 +\n")
    with pytest.raises(PipelineError, match="cannot read settings file"):
        settings_module.load_settings([f"--config={settings}"])


def test_checkpoint_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoints" / "best.pth"
    evil.parent.mkdir()
    torch.save({"model": {}, "payload": Exploit(marker)}, evil)
    with pytest.raises(PipelineError, match="safely"):
        checkpoints.open_checkpoint(evil)
    assert not marker.exists()
    # the same file through a stage, and as a weights file
    cfg = tiny_config(tmp_path)
    with pytest.raises(PipelineError):
        evaluate.run(cfg)
    with pytest.raises(PipelineError):
        backbone.load_trunk_weights(backbone.PlanktonNet(3, 32), str(evil))
    assert not marker.exists()
    # the file really is an exploit: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resume_from_a_last_checkpoint_carrying_code_is_refused(tmp_path, tiny_folder):
    marker = tmp_path / "pwned"
    cfg = tiny_config(tmp_path, tiny_folder)
    paths = locations.prepare_output_dirs(cfg)
    torch.save({"finished": True, "x": Exploit(marker)}, paths.last)
    with pytest.raises(PipelineError, match="last.pth"):
        train.run(cfg)
    assert not marker.exists()


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    paths = locations.prepare_output_dirs(cfg)
    old = {"value": torch.arange(1000)}
    fileio.save_torch(old, paths.last)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(PipelineError, match="cannot write .*last.pth.*simulated"):
        fileio.save_torch({"value": torch.zeros(1000)}, paths.last)
    monkeypatch.undo()
    assert torch.equal(checkpoints.load_checkpoint_file(paths.last)["value"], old["value"])
    locations.prepare_output_dirs(cfg)
    assert not [p for p in tmp_path.rglob("*") if fileio.TMP_MARK in p.name]


def test_a_truncated_or_foreign_checkpoint_is_one_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    fileio.save_torch({"model": {"w": torch.ones(100)}}, good)
    data = good.read_bytes()
    for name, content in (("truncated.pth", data[: len(data) // 2]), ("text.pth", b"hello"), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PipelineError, match="cannot load"):
            checkpoints.open_checkpoint(tmp_path / name)


def test_embeddings_of_an_older_checkpoint_are_refused(tmp_path, tiny_cfg):
    tiny_cfg.MAX_EPOCHS = 1
    train.run(tiny_cfg)
    embed.run(tiny_cfg)
    compute_average_distances.run(tiny_cfg)  # fine while the embeddings belong to best.pth
    retrained = tiny_config(tmp_path, tiny_cfg.DATA_DIR, RESUME=False, MAX_EPOCHS=2)
    train.run(retrained)
    for stage in (compute_average_distances, dimensionality_reduction, transfer_learning):
        with pytest.raises(PipelineError, match="embed.py") as error:
            stage.run(retrained)
        assert "checkpoint" in str(error.value), stage.__name__
    embed.run(retrained)  # after re-embedding the stage runs again
    compute_average_distances.run(retrained)


@pytest.fixture
def trained(tmp_path, tiny_cfg):
    train.run(tiny_cfg)
    return tiny_cfg, Path(tiny_cfg.DATA_DIR), locations.Paths.from_settings(tiny_cfg)


def _changed_images_are_refused(cfg, paths):
    split_bytes = paths.split.read_bytes()
    for stage in (evaluate, embed, train):
        with pytest.raises(PipelineError, match="split") as error:
            stage.run(cfg)
        assert "images changed" in str(error.value), (stage.__name__, str(error.value))
        assert paths.split.read_bytes() == split_bytes, stage.__name__
    assert not (paths.out / "test_metrics.csv").exists()
    assert not paths.embeddings("train").exists()


def test_an_added_image_stops_the_stages(trained):
    cfg, data, paths = trained
    Image.new("RGB", (24, 24), (200, 0, 0)).save(data / "b" / "img_new.png")
    _changed_images_are_refused(cfg, paths)


def test_a_removed_image_stops_the_stages(trained):
    cfg, data, paths = trained
    test_image = paths.split.read_text().splitlines()[1].split(",")[0]
    (data / test_image).unlink()
    _changed_images_are_refused(cfg, paths)


def test_an_image_that_became_unreadable_stops_the_stages(trained):
    cfg, data, paths = trained
    (data / "u" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _changed_images_are_refused(cfg, paths)



def test_embeddings_export_to_parquet_and_csv_with_the_same_columns_and_attrs(tmp_path):
    rng = np.random.default_rng(0)
    frame = embedding_files.embeddings_frame(rng.normal(size=(5, 4)), np.array([0, 1, 0, 1, 1]), ["a", "b"],
                                       [f"a/{i}.png" for i in range(5)], embedding_files.EmbeddingsInfo(
                                       "0" * 64, "1" * 64, "test", ("a", "b"), "data", "random", "multiclass"))
    written = embedding_files.export_table(frame, tmp_path / "embeddings_test.pkl", csv=True)
    assert [p.name for p in written] == ["embeddings_test.parquet", "embeddings_test.csv"]
    back = pd.read_parquet(written[0])
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert back.attrs == frame.attrs
    pd.testing.assert_frame_equal(pd.read_csv(written[1]), frame, check_dtype=False)
