"""The model bundle (export_model.py, plankton/bundles.py): it holds what predict.py derives from the
run, predict.py gives the same predictions from it alone (no data folder, split or checkpoints), a
changed, cut or foreign file is one error line, verify.py checks it, and its ONNX logits are PyTorch's."""
import json
import shutil
import sys
import types

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import Exploit, dir_args, make_image_folder, one_error_line, tiny_config

import backbone
import dataloader
import export_model
import predict
import verify
from plankton import bundles, checkpoints, fileio, hashing, locations, provenance, splits
from plankton.errors import PipelineError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run with a split and a best.pth (an untrained resnet18-trunk model: no training needed to
    compare two ways of predicting with it) and its bundle; ROUTE_PRECISION low enough that some
    predictions are routed as confident."""
    tmp = tmp_path_factory.mktemp("run")
    folder = make_image_folder(tmp / "images", {"a": 16, "b": 16, "c": 16, "u": 12, "v": 12})
    cfg = tiny_config(tmp, folder, TRUNK="resnet18", ROUTE_PRECISION=0.05,
                      PREDICT_DIR=str(make_image_folder(tmp / "new", {"a": 4, "c": 4, "u": 4}, seed=7)))
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    torch.manual_seed(0)
    arch = backbone.architecture_args(3, cfg.IMAGE_SIZE, 16, 0.1, "resnet18")
    model = backbone.build_model(arch)
    preprocess = dataloader.Preprocess.for_trunk("resnet18", cfg.IMAGE_SIZE, cfg.RESIZE_MODE)
    record = checkpoints.checkpoint_record(model, arch, preprocess, split, "random initialisation (WEIGHTS=None)",
                                           backbone.frozen_trunk_sha256(model), fileio.plain_json(vars(cfg)),
                                           epoch=1.0, val_loss=1.0, val_acc=0.5, val_map=0.5)
    fileio.save_torch(record, paths.best)
    export_model.run(cfg)
    return cfg, paths, paths.bundle_dir / bundles.FILE_NAME


def test_the_bundle_holds_the_model_and_what_predict_derives_from_the_run(exported):
    cfg, paths, path = exported
    bundle = bundles.open_bundle(path)
    best = checkpoints.open_checkpoint(paths.best)
    assert bundle.checkpoint.class_names == best.class_names == ("a", "b", "c")
    assert bundle.checkpoint.trunk == "resnet18" and bundle.checkpoint.weights_source == best.weights_source
    assert bundle.checkpoint.preprocess == best.preprocess
    assert sorted(bundle.checkpoint.model_state) == sorted(best.model_state)
    assert all(torch.equal(bundle.checkpoint.model_state[k], v) for k, v in best.model_state.items())
    assert bundle.checkpoint_sha256 == hashing.file_sha256(paths.best)
    assert bundle.split_sha256 == hashing.file_sha256(paths.split) and bundle.settings["TRUNK"] == "resnet18"
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)  # as export_model's
    fresh = bundles.fit_from_run(cfg, trained, trained.trunk_cache(cfg, paths, runtime), runtime)
    kept = bundle.fitted()
    for key in ("threshold", "val_images", "val_kept", "temperature", "temperature_note"):
        assert kept[key] == fresh[key], key
    pd.testing.assert_frame_equal(kept["class_thresholds"], fresh["class_thresholds"])
    assert np.isfinite(kept["class_thresholds"].threshold).any()
    for field in ("train_embeddings", "class_means", "precision", "labels"):
        assert np.array_equal(getattr(kept["reference"], field), getattr(fresh["reference"], field)), field
    assert sorted(kept["reference"].labels) == sorted(trained.source("train").labels.tolist())
    readme = (paths.bundle_dir / "README.txt").read_text()
    assert bundle.sha256 in readme and "--PREDICT_BUNDLE=" in readme and "resnet18" in readme
    record = provenance.read_record(paths, "export_model")
    assert set(record.outputs) == {"model_bundle/model_bundle.pt", "model_bundle/README.txt"}


@pytest.mark.slow
def test_predict_from_the_bundle_alone_equals_predict_from_the_run(exported, tmp_path):
    cfg, paths, path = exported
    predict.run(cfg)
    from_run = pd.read_csv(paths.predictions_dir / "predictions.csv")
    # another machine: the bundle and the new images, no data folder, split or checkpoints
    shutil.copy(path, tmp_path / "shipped.pt")
    shutil.copytree(cfg.PREDICT_DIR, tmp_path / "new")
    there = tiny_config(tmp_path, tmp_path / "no_such_data", PREDICT_DIR=str(tmp_path / "new"),
                        PREDICT_BUNDLE=str(tmp_path / "shipped.pt"), TRUNK="efficientnet_v2_s", IMAGE_SIZE=64)
    predict.run(there)
    out = locations.Paths.from_settings(there)
    from_bundle = pd.read_csv(out.predictions_dir / "predictions.csv")
    assert not (tmp_path / "no_such_data").exists() and not out.split.exists() and not out.best.exists()
    assert from_bundle.predicted_class.tolist() == from_run.predicted_class.tolist()
    assert (from_run.route == "confident").any() and from_bundle.route.tolist() == from_run.route.tolist()
    assert from_bundle.unknown.tolist() == from_run.unknown.tolist()
    numbers = [c for c in from_run.columns if c.endswith("_score")]
    np.testing.assert_allclose(from_bundle[numbers], from_run[numbers], atol=1e-6, rtol=0)
    inputs = provenance.read_record(out, "predict").inputs
    assert list(inputs) == [str(tmp_path / "shipped.pt")]
    summary = json.loads((out.predictions_dir / "predictions.json").read_text())
    assert summary["drift"]["verdict"].startswith("not checked: the model bundle holds no held-out test images")


def _rewritten(source, target, change, rehash: bool = False):
    raw = torch.load(source, map_location="cpu", weights_only=True)
    change(raw)
    if rehash:
        raw["sha256"] = hashing.record_sha256({k: v for k, v in raw.items() if k != "sha256"})
    torch.save(raw, target)
    return target


def _first_tensor_plus_one(raw):
    state = raw["checkpoint"]["model"]
    state[next(iter(state))] += 1


BAD = {
    "threshold changed": (lambda src, dst: _rewritten(src, dst, lambda r: r["open_set"].update(threshold=9.0)),
                          "do not match its recorded SHA-256"),
    "a weight changed": (lambda src, dst: _rewritten(src, dst, _first_tensor_plus_one),
                         "do not match its recorded SHA-256"),
    "re-hashed, one threshold short": (
        lambda src, dst: _rewritten(src, dst, lambda r: r["class_thresholds"]["threshold"].pop(), rehash=True),
        "not one per class"),
    "cut short": (lambda src, dst: dst.write_bytes(src.read_bytes()[:len(src.read_bytes()) // 2]) and dst,
                  "cannot load"),
    "a text file": (lambda src, dst: dst.write_text("model: yes\n") and dst, "cannot load"),
    "missing": (lambda src, dst: dst, "no model bundle at"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_changed_cut_or_missing_bundle_is_one_error_line(exported, tmp_path, capsys, case):
    cfg, paths, path = exported
    make, said = BAD[case]
    bad = make(path, tmp_path / "bad.pt")
    line = one_error_line(capsys, predict.main, [*dir_args(tmp_path / "run"), "--DEVICE=cpu",
                                                 f"--PREDICT_DIR={cfg.PREDICT_DIR}", f"--PREDICT_BUNDLE={bad}"])
    assert said in line and str(bad) in line and "train.py" not in line
    assert not (tmp_path / "run" / "outputs" / "predictions").exists()


def test_a_checkpoint_or_a_code_running_pickle_is_not_a_bundle(exported, tmp_path, capsys):
    cfg, paths, path = exported
    line = one_error_line(capsys, predict.main, [*dir_args(tmp_path), "--DEVICE=cpu",
                                                 f"--PREDICT_DIR={cfg.PREDICT_DIR}", f"--PREDICT_BUNDLE={paths.best}"])
    assert "is not a model bundle" in line and "checkpoint" in line
    marker = tmp_path / "ran"
    torch.save({"format": bundles.FORMAT, "x": Exploit(marker)}, tmp_path / "exploit.pt")
    with pytest.raises(PipelineError, match="cannot load"):
        bundles.open_bundle(tmp_path / "exploit.pt")
    assert not marker.exists()


def test_verify_checks_the_bundle_and_names_a_changed_one(exported, capsys):
    cfg, paths, path = exported
    verify.run(cfg)
    assert "model bundle" in capsys.readouterr().out
    original = path.read_bytes()
    try:
        _rewritten(path, path, lambda r: r["open_set"].update(threshold=9.0))
        with pytest.raises(PipelineError, match="mismatch"):
            verify.run(cfg)
        said = [line for line in capsys.readouterr().err.splitlines() if "model_bundle.pt" in line]
        assert any("changed since export_model recorded it" in line for line in said)
        assert any("recorded SHA-256" in line for line in said)
    finally:
        path.write_bytes(original)


def test_the_record_hash_sees_every_value_and_not_how_it_is_stored():
    record = dict(a=[1, 2.0, "x", None, float("inf")], b=dict(t=torch.arange(4.0)), c=True)
    same = dict(c=True, b=dict(t=torch.arange(4.0).clone()), a=[1, 2.0, "x", None, float("inf")])
    assert hashing.record_sha256(record) == hashing.record_sha256(same)
    for changed in (dict(record, c=1), dict(record, a=[1, 2, "x", None, float("inf")]),
                    dict(record, b=dict(t=torch.arange(4.0).double())),
                    dict(record, b=dict(t=torch.arange(4.0)[None]))):
        assert hashing.record_sha256(changed) != hashing.record_sha256(record)


def test_onnx_logits_and_embeddings_equal_pytorchs(exported, tmp_path):
    cfg, paths, path = exported
    model = bundles.open_bundle(path).checkpoint.build_model(torch.device("cpu"))
    bundles.export_onnx(model, cfg.IMAGE_SIZE, tmp_path / "model.onnx")
    images = torch.randn(5, 3, cfg.IMAGE_SIZE, cfg.IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, embeddings = model(images)
    onnx_logits, onnx_embeddings = bundles.onnx_outputs(tmp_path / "model.onnx", images.numpy())
    assert onnx_logits.shape == (5, 3) and onnx_embeddings.shape == (5, 16)  # 5 images: the batch size is free
    assert np.abs(onnx_logits - logits.numpy()).max() <= 1e-4
    assert np.abs(onnx_embeddings - embeddings.numpy()).max() <= 1e-4


def test_onnx_without_its_packages_is_one_line(exported, tmp_path, monkeypatch):
    cfg, paths, path = exported
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(PipelineError, match="pip install onnx onnxruntime"):
        bundles.export_onnx(torch.nn.Linear(2, 2), cfg.IMAGE_SIZE, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.slow
def test_export_model_with_onnx_writes_and_records_it(exported):
    cfg, paths, path = exported
    cfg = types.SimpleNamespace(**{**vars(cfg), "EXPORT_ONNX": True})
    try:
        export_model.run(cfg)
        assert "largest logit difference from PyTorch" in (paths.bundle_dir / "README.txt").read_text()
        assert "model_bundle/model.onnx" in provenance.read_record(paths, "export_model").outputs
    finally:
        cfg.EXPORT_ONNX = False
        export_model.run(cfg)  # the other tests' run as it was: no model.onnx
    assert not (paths.bundle_dir / "model.onnx").exists()


def test_a_bundle_whose_model_does_not_fit_says_so_without_sending_anyone_to_retrain(exported, tmp_path):
    cfg, paths, path = exported

    def drop_a_tensor(raw):
        state = raw["checkpoint"]["model"]
        del state[next(iter(state))]
    bad = _rewritten(path, tmp_path / "bad.pt", drop_a_tensor, rehash=True)
    with pytest.raises(PipelineError) as refused:
        bundles.open_bundle(bad).trained_model(torch.device("cpu"))
    message = str(refused.value)
    assert str(bad) in message and "do not fit its architecture" in message
    assert "export_model.py" in message and "train.py" not in message


def test_a_re_hashed_bundle_with_a_value_it_never_holds_is_one_line(exported, tmp_path):
    cfg, paths, path = exported
    for change, said in ((lambda r: r["open_set"].update(score=["knn"]), "open-set score"),
                         (lambda r: r["reference"].update(k=10 ** 6), "reference k"),
                         (lambda r: r["reference"].update(labels=r["reference"]["labels"] + 50),
                          "classes it does not have"),
                         (lambda r: r["open_set"].update(threshold=float("nan")), "threshold")):
        bad = _rewritten(path, tmp_path / "bad.pt", change, rehash=True)
        with pytest.raises(PipelineError) as refused:
            bundles.open_bundle(bad)
        assert said in str(refused.value) and "\n" not in str(refused.value)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw["settings"] = {1: "a number as a key"}
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(PipelineError, match="int key"):
        bundles.open_bundle(tmp_path / "odd.pt")


def test_the_bundle_carries_its_tta_and_a_re_hashed_unknown_one_is_one_line(exported, tmp_path):
    """A bundle exported with TTA set predicts with those orientations (its threshold was set with them)."""
    _, _, path = exported
    assert bundles.open_bundle(path).trained_model(torch.device("cpu")).orientations == (0,)
    flips = _rewritten(path, tmp_path / "flips.pt", lambda r: r["settings"].update(TTA="flips"), rehash=True)
    assert bundles.open_bundle(flips).trained_model(torch.device("cpu")).orientations == (0, 4, 6, 2)
    odd = _rewritten(path, tmp_path / "odd.pt", lambda r: r["settings"].update(TTA="sideways"), rehash=True)
    with pytest.raises(PipelineError, match="TTA='sideways' is none of"):
        bundles.open_bundle(odd).trained_model(torch.device("cpu"))
