"""Files that load safely but are malformed: a checkpoint with a key too many or too few, a wrong
type, shape or value, or trunk weights changed behind its recorded hash; embeddings with values or
attrs that do not hold together; score files cut short or holding NaN, text or complex numbers. Each ends in one error naming the file, from the file's owner
(plankton.checkpoints, plankton.embedding_files), and in one `error:` line from a stage."""
import math

import numpy as np
import pytest
import torch
from conftest import make_image_folder, settings_file, tiny_config

import calibration
import embed
import evaluate
import reproduce
import train
import transfer_learning
from plankton import checkpoints, embedding_files, locations, safepickle, saved_predictions
from plankton.errors import PipelineError


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run with its embeddings, and a settings file that points the scripts at it."""
    tmp = tmp_path_factory.mktemp("malformed")
    folder = make_image_folder(tmp / "images", {"a": 12, "b": 12, "c": 12, "u": 8, "v": 8})
    cfg = tiny_config(tmp, folder, MAX_EPOCHS=1, VAL_PER_EPOCH=1)
    train.run(cfg)
    evaluate.run(cfg)
    embed.run(cfg)
    names = ("DATA_DIR", "OUTPUT_DIR", "CHECKPOINT_DIR", "CACHE_DIR", "SEEN_CLASSES", "UNSEEN_CLASSES", "IMAGE_SIZE",
             "WEIGHTS", "NUM_WORKERS", "DEVICE", "BATCH_SIZE", "TRANSFER_REPEATS")
    config = settings_file(tmp / "settings.py", **{name: getattr(cfg, name) for name in names})
    return cfg, locations.Paths.from_settings(cfg), config


def _raw(paths) -> dict:
    return torch.load(paths.best, map_location="cpu", weights_only=True)


def _first(state: dict, part: str) -> str:
    return next(name for name, value in state.items() if name.startswith(part) and value.is_floating_point())


TAMPERINGS = {
    "a list, not a dict": (lambda raw: [raw], "holds a list, not a dict"),
    "a key train.py never writes": (lambda raw: {**raw, "surprise": 1}, "never writes (surprise)"),
    "no class names": (lambda raw: {k: v for k, v in raw.items() if k != "class_names"}, "no 'class_names'"),
    "image size as text": (lambda raw: {**raw, "image_size": "32"}, "'image_size' is '32'"),
    "a zero std": (lambda raw: {**raw, "normalization": {"mean": [0.5] * 3, "std": [0.2, 0.0, 0.2]}},
                   "'normalization std' is 0.0"),
    "std as text": (lambda raw: {**raw, "normalization": {"mean": [0.5] * 3, "std": "0.2"}}, "three numbers"),
    "a NaN tensor": (lambda raw: {**raw, "model": {**raw["model"], (n := _first(raw["model"], "head")):
                                                   torch.full_like(raw["model"][n], math.nan)}}, "NaN or infinite"),
    "an unknown trunk": (lambda raw: {**raw, "arch": {**raw["arch"], "trunk": "vgg"}}, "trunk 'vgg'"),
    "classifier outputs and class names disagree": (
        lambda raw: {**raw, "class_names": raw["class_names"][:2], "arch": {**raw["arch"], "num_classes": 3}},
        "3 outputs for 2 class names"),
    "the trunk hash not a hash": (lambda raw: {**raw, "trunk_sha256": "abc"}, "not a SHA-256"),
    "an unknown task": (lambda raw: {**raw, "task": "regression"}, "'task' is 'regression'"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_a_malformed_checkpoint_is_refused_when_opened(tmp_path, trained, case):
    _, paths, _ = trained
    tamper, said = TAMPERINGS[case]
    path = tmp_path / "best.pth"
    torch.save(tamper(_raw(paths)), path)
    with pytest.raises(PipelineError) as refused:
        checkpoints.open_checkpoint(path)
    assert str(path) in str(refused.value) and said in str(refused.value)
    assert "re-run train.py" in str(refused.value)


@pytest.mark.parametrize("case", ["a tensor of the wrong shape", "a tensor missing", "a tensor too many"])
def test_tensors_that_do_not_fit_the_architecture_are_refused_when_the_model_is_built(tmp_path, trained, case):
    _, paths, _ = trained
    raw = _raw(paths)
    state = dict(raw["model"])
    name = _first(state, "classifier")
    if case == "a tensor of the wrong shape":
        state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
    elif case == "a tensor missing":
        del state[name]
    else:
        state["classifier.extra"] = torch.zeros(2)
    path = tmp_path / "best.pth"
    torch.save({**raw, "model": state}, path)
    checkpoint = checkpoints.open_checkpoint(path)  # the values alone are well formed
    with pytest.raises(PipelineError, match="do not fit its architecture"):
        checkpoint.build_model(torch.device("cpu"))


def test_trunk_weights_changed_behind_the_recorded_hash_are_refused(tmp_path, trained, capsys):
    """The trunk cache is keyed by the recorded hash: serving it for other weights would evaluate the
    old trunk. The hash is recomputed from the loaded weights first."""
    cfg, paths, config = trained
    original = paths.best.read_bytes()
    raw = _raw(paths)
    name = _first(raw["model"], "trunk.")
    raw["model"][name] = raw["model"][name] + 0.5
    torch.save(raw, paths.best)
    try:
        with pytest.raises(PipelineError, match="trunk weights are not the ones its recorded trunk_sha256"):
            checkpoints.open_trained_model(cfg, paths, torch.device("cpu"))
        with pytest.raises(SystemExit) as stop:
            evaluate.main([f"--config={config}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and "trunk" in err[0]
    finally:
        paths.best.write_bytes(original)
    assert checkpoints.open_trained_model(cfg, paths, torch.device("cpu")).model is not None


EMBEDDING_TAMPERINGS = {
    "a NaN embedding": (lambda f: f.assign(e0=np.where(np.arange(len(f)) == 0, np.nan, f.e0)), "NaN or infinite"),
    "a label past the class names": (lambda f: f.assign(label=f.label + 5), "not indices into"),
    "class names that disagree with the labels": (lambda f: f.assign(class_name=f.class_name[::-1].to_numpy()),
                                                  "disagrees with its labels"),
    "embeddings as text": (lambda f: f.assign(e1=f.e1.astype(str)), "not numbers"),
    "no record of its source": (lambda f: _without_attrs(f), "does not record where it came from"),
    "class names not a list": (lambda f: _with_attrs(f, class_names="u;v"), "malformed attrs"),
}


def _without_attrs(frame):
    frame = frame.copy()
    frame.attrs = {}
    return frame


def _with_attrs(frame, **attrs):
    frame = frame.copy()
    frame.attrs = {**frame.attrs, **attrs}
    return frame


@pytest.mark.parametrize("case", list(EMBEDDING_TAMPERINGS))
def test_malformed_embeddings_are_one_error_line(trained, capsys, case):
    _, paths, config = trained
    path = paths.embeddings("unseen")
    original = path.read_bytes()
    tamper, said = EMBEDDING_TAMPERINGS[case]
    frame = safepickle.load_dataframe(path)
    try:
        safepickle.save_dataframe(tamper(frame), path)
        with pytest.raises(PipelineError, match=said):
            embedding_files.open_embeddings(paths, "unseen")
        with pytest.raises(SystemExit) as stop:
            transfer_learning.main([f"--config={config}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0]
    finally:
        path.write_bytes(original)
    assert len(embedding_files.open_embeddings(paths, "unseen")) == len(frame)


def _scores_arrays(paths) -> dict:
    with np.load(paths.scores, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


SCORE_TAMPERINGS = {
    "cut short": (lambda a: {**a, "scores": a["scores"][:-1]}, "not"),
    "a NaN score": (lambda a: {**a, "scores": np.where(np.eye(*a["scores"].shape, dtype=bool), np.nan, a["scores"])},
                    "NaN or infinite"),
    "an infinite logit": (lambda a: {**a, "logits": a["logits"] * np.inf}, "NaN or infinite"),
    "scores as text": (lambda a: {**a, "scores": a["scores"].astype(str)}, "real numbers"),
    "complex scores": (lambda a: {**a, "scores": a["scores"].astype(np.complex64)}, "real numbers"),
    "a label past the classes": (lambda a: {**a, "labels": a["labels"] + 10}, "labels out of range"),
    "class names as numbers": (lambda a: {**a, "class_names": np.arange(len(a["class_names"]))}, "not text"),
    "an array missing": (lambda a: {k: v for k, v in a.items() if k != "labels"}, "cannot read"),
}


@pytest.mark.parametrize("case", list(SCORE_TAMPERINGS))
def test_malformed_score_files_are_one_error_line(trained, capsys, case):
    _, paths, config = trained
    original = paths.scores.read_bytes()
    tamper, said = SCORE_TAMPERINGS[case]
    tampered = tamper(_scores_arrays(paths))
    try:
        with open(paths.scores, "wb") as handle:
            np.savez(handle, **tampered)
        with pytest.raises(PipelineError, match=said):
            saved_predictions.open_predictions(paths)
        with pytest.raises(SystemExit) as stop:
            calibration.main([f"--config={config}"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert stop.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and str(paths.scores) in err[0]
    finally:
        paths.scores.write_bytes(original)
    assert saved_predictions.open_predictions(paths).scores.shape[1] == 3


def test_the_reproduction_check_compares_the_class_names_stored_with_the_scores(trained, capsys):
    """Scores whose columns are other classes (in another order) are not the model's, even when every
    number matches."""
    _, paths, config = trained
    original = paths.scores.read_bytes()
    arrays = _scores_arrays(paths)
    try:
        with open(paths.scores, "wb") as handle:
            np.savez(handle, **{**arrays, "class_names": arrays["class_names"][::-1].copy()})
        with pytest.raises(SystemExit) as stop:
            reproduce.main([f"--config={config}"])
        err = capsys.readouterr().err
        assert stop.value.code == 1 and "score the classes" in err
    finally:
        paths.scores.write_bytes(original)


def test_a_seen_class_named_unknown_keeps_its_row_in_the_prediction_figure():
    import pandas as pd

    import predict
    table = pd.DataFrame(dict(path=[f"x{i}.png" for i in range(6)], predicted_class=["unknown", "a"] * 3,
                              top1_score=0.9, open_set_score=[0.1, 0.2, 0.9, 0.1, 0.2, 0.95],
                              unknown=[False, False, True, False, False, True]))
    picked = predict.sample_rows(table, ["unknown", "a"], per_row=4, seed=0)
    assert list(picked) == ["predicted\nunknown\n(2 images)", "predicted\na\n(2 images)", "flagged\nunknown\n(2 images)"]
    assert list(picked["flagged\nunknown\n(2 images)"].open_set_score) == [0.95, 0.9]
