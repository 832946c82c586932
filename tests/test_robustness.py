"""Robustness: bad image files, unsafe pickles, interrupted writes, killed and resumed training,
stale artifacts, reproducibility, offline weights and the command line's error messages (CPU, tiny)."""
import builtins
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFile

import backbone
import common
import compute_average_distances
import dataloader
import dimensionality_reduction
import embed
import evaluate
import train
import transfer_learning
from conftest import REPO, make_image_folder, tiny_config

PYTHON = sys.executable


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / "cache" / "numba"))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # 2 cores, up to 3 processes at once: threads would only fight
    return env


def _script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, name, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _dir_args(tmp: Path) -> list[str]:
    """Every folder a script writes to, inside tmp (never the repository's own outputs/ or cache/)."""
    return [f"--OUTPUT_DIR={tmp / 'outputs'}", f"--CHECKPOINT_DIR={tmp / 'checkpoints'}",
            f"--CACHE_DIR={tmp / 'cache'}"]


def _settings_file(path: Path, **settings) -> Path:
    """configfile.py with the given settings appended (later assignments win)."""
    text = (REPO / "configfile.py").read_text() + "\n# ---- test overrides ----\n"
    text += "".join(f"{key} = {value!r}\n" for key, value in settings.items())
    path.write_text(text)
    return path


def _model_tensors(path: Path) -> dict:
    return common.load_checkpoint(path)["model"]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# =================================================================================================
# 1. scan before use
# =================================================================================================

def _jpeg_bytes(size=64, seed=0) -> bytes:
    import io
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _odd_files(class_dir: Path) -> dict[str, str]:
    """Write odd files into a class folder; return {file name: 'bad' or 'good'}."""
    full = _jpeg_bytes()
    (class_dir / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / "notes.png").write_text("this is a text file, not a PNG\n")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(class_dir / "cmyk.jpg")  # red in CMYK
    gradient = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(gradient).save(class_dir / "deep16.png")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 2], rgba[:10, :, 3] = 255, 255  # blue, top half opaque, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(class_dir / "rgba.png")
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8), mode="L").save(class_dir / "gray.tif")
    hidden = class_dir / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(hidden / "copy.png")
    (class_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    return {"truncated.jpg": "bad", "empty.jpg": "bad", "notes.png": "bad", "cmyk.jpg": "good",
            "deep16.png": "good", "rgba.png": "good", "gray.tif": "good"}


@pytest.fixture
def odd_folder(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 8, "b": 8, "c": 8, "u": 4, "v": 4})
    kinds = _odd_files(folder / "a")
    (folder / ".ipynb_checkpoints").mkdir()  # a hidden folder at the top is never a class
    Image.new("RGB", (20, 20)).save(folder / ".ipynb_checkpoints" / "img.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return folder, kinds


def test_hidden_files_and_folders_are_never_classes_or_images(odd_folder):
    folder, kinds = odd_folder
    found = dataloader.list_class_images(folder)
    assert sorted(found) == ["a", "b", "c", "u", "v"]
    names = {Path(p).name for p in found["a"]}
    assert names == {f"img_{j:03d}.png" for j in range(8)} | set(kinds)
    assert not any(".ipynb_checkpoints" in p or ".DS_Store" in p for files in found.values() for p in files)


def test_load_rgb_converts_odd_modes_to_8_bit_rgb(odd_folder):
    folder, _ = odd_folder
    deep = dataloader.load_rgb(folder / "a" / "deep16.png")
    array = np.asarray(deep)
    assert deep.mode == "RGB" and array.dtype == np.uint8
    assert array.max() == 255 and array.min() == 0
    assert (array == 255).mean() < 0.05, "16-bit values were clipped to white instead of scaled"
    gray16 = np.linspace(0, 65535, 24 * 24).reshape(24, 24)
    np.testing.assert_allclose(array[..., 0], np.round(gray16 * 255 / 65535), atol=1)
    cmyk = np.asarray(dataloader.load_rgb(folder / "a" / "cmyk.jpg"))
    assert cmyk.shape == (20, 20, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60
    rgba = np.asarray(dataloader.load_rgb(folder / "a" / "rgba.png"))
    assert tuple(rgba[0, 0]) == (0, 0, 255) and tuple(rgba[-1, -1]) == (255, 255, 255)  # onto white
    gray = dataloader.load_rgb(folder / "a" / "gray.tif")
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[5, 5]) == (90, 90, 90)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_unreadable_images_are_left_out_and_reported(tmp_path, odd_folder):
    folder, kinds = odd_folder
    cfg = tiny_config(tmp_path, folder)
    paths = common.make_output_dirs(cfg)
    split = dataloader.prepare_split(cfg, paths, create=True)
    bad = {f"a/{name}" for name, kind in kinds.items() if kind == "bad"}
    good = {f"a/{name}" for name, kind in kinds.items() if kind == "good"}
    in_split = set(split.table.relpath)
    assert not bad & in_split
    assert good <= in_split
    assert not any("ipynb" in p or "DS_Store" in p for p in in_split)
    report = pd.read_csv(paths.bad_images, keep_default_na=False)
    assert list(report.columns) == ["relpath", "reason"]
    assert set(report.relpath) == bad
    reasons = dict(zip(report.relpath, report.reason))
    assert all(reasons.values())
    assert "empty" in reasons["a/empty.jpg"] and "truncated" in reasons["a/truncated.jpg"].lower()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_images_error_setting_stops_the_split(tmp_path, odd_folder):
    folder, _ = odd_folder
    cfg = tiny_config(tmp_path, folder, BAD_IMAGES="error")
    paths = common.make_output_dirs(cfg)
    with pytest.raises(common.PipelineError, match="unreadable image"):
        dataloader.prepare_split(cfg, paths, create=True)
    assert not paths.split.exists()
    assert len(pd.read_csv(paths.bad_images)) == 3


def test_scan_is_cached_and_rescans_only_changed_files(tmp_path, odd_folder, monkeypatch):
    folder, _ = odd_folder
    cfg = tiny_config(tmp_path, folder)
    paths = common.make_output_dirs(cfg)
    calls = []
    real = dataloader.load_rgb
    monkeypatch.setattr(dataloader, "load_rgb", lambda path: (calls.append(Path(path).name), real(path))[1])
    first = dataloader.prepare_split(cfg, paths, create=True)
    n_files = sum(len(v) for v in dataloader.list_class_images(folder).values())
    assert len(calls) == n_files - 1  # every file decoded once, except the 0-byte one (no decode needed)
    assert list((tmp_path / "cache").glob("scan_*.csv"))
    calls.clear()
    second = dataloader.prepare_split(cfg, paths, create=False)
    assert calls == [], f"the second scan decoded {calls}"
    assert second.sha256 == first.sha256
    assert len(pd.read_csv(paths.bad_images)) == 3  # the cached verdicts still leave the bad files out
    # an edited image is decoded again, and only that one
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "a" / "img_000.png")
    os.utime(folder / "a" / "img_000.png", ns=(1, 1))
    dataloader.prepare_split(cfg, paths, create=False)
    assert calls == ["img_000.png"]


def test_empty_class_folder_is_named(tmp_path, odd_folder):
    folder, _ = odd_folder
    (folder / "w").mkdir()
    cfg = tiny_config(tmp_path, folder, UNSEEN_CLASSES=["u", "w"])
    with pytest.raises(common.PipelineError) as error:
        dataloader.prepare_split(cfg, common.make_output_dirs(cfg), create=True)
    assert str(folder / "w") in str(error.value)


def test_class_folder_holding_only_unreadable_files_is_named(tmp_path, odd_folder):
    folder, _ = odd_folder
    (folder / "w").mkdir()
    (folder / "w" / "broken.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "w" / ".hidden.png")  # hidden: does not count
    cfg = tiny_config(tmp_path, folder, UNSEEN_CLASSES=["u", "w"])
    with pytest.raises(common.PipelineError, match="'w'"):
        dataloader.prepare_split(cfg, common.make_output_dirs(cfg), create=True)


def test_truncated_images_stay_refused_after_every_module_is_imported():
    import run_all  # noqa: F401  (imports every stage)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# =================================================================================================
# 2. safe loading
# =================================================================================================

class _Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def test_checkpoint_carrying_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "checkpoints" / "best.pth"
    evil.parent.mkdir()
    torch.save({"model": {}, "payload": _Exploit(marker)}, evil)
    with pytest.raises(common.PipelineError, match="safely"):
        common.load_checkpoint(evil)
    assert not marker.exists()
    # the same file through a stage, and as a weights file
    cfg = tiny_config(tmp_path)
    with pytest.raises(common.PipelineError):
        evaluate.run(cfg)
    with pytest.raises(common.PipelineError):
        backbone.load_trunk_weights(backbone.PlanktonNet(3, 32), str(evil))
    assert not marker.exists()
    # the file really is an exploit: an unsafe load would have run it
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_resume_from_a_last_checkpoint_carrying_code_is_refused(tmp_path, tiny_folder):
    marker = tmp_path / "pwned"
    cfg = tiny_config(tmp_path, tiny_folder)
    paths = common.make_output_dirs(cfg)
    torch.save({"finished": True, "x": _Exploit(marker)}, paths.last)
    with pytest.raises(common.PipelineError, match="last.pth"):
        train.run(cfg)
    assert not marker.exists()


# =================================================================================================
# 3. atomic writes
# =================================================================================================

def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    paths = common.make_output_dirs(cfg)
    old = {"value": torch.arange(1000)}
    common.save_torch(old, paths.last)
    real_save = torch.save

    def half_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[: len(data) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError, match="simulated"):
        common.save_torch({"value": torch.zeros(1000)}, paths.last)
    monkeypatch.undo()
    assert torch.equal(common.load_checkpoint(paths.last)["value"], old["value"])
    common.make_output_dirs(cfg)
    assert not [p for p in tmp_path.rglob("*") if common.TMP_MARK in p.name]


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch, common
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    data = Path(f).read_bytes()
    Path(f).write_bytes(data[: len(data) // 3])
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: a real kill mid-write
torch.save = save_then_die
common.save_torch({{"value": torch.zeros(1000)}}, Path({target!r}))
"""


def test_save_killed_mid_write_leaves_the_old_file_and_a_cleaned_up_temporary(tmp_path):
    cfg = tiny_config(tmp_path)
    paths = common.make_output_dirs(cfg)
    old = {"value": torch.arange(1000)}
    common.save_torch(old, paths.best)
    done = subprocess.run([PYTHON, "-c", _KILLED_WRITER.format(repo=str(REPO), target=str(paths.best))],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = [p for p in paths.checkpoints.iterdir() if common.TMP_MARK in p.name]
    assert leftovers, "the simulated kill should have left a temporary file"
    assert torch.equal(common.load_checkpoint(paths.best)["value"], old["value"])
    common.make_output_dirs(cfg)
    assert not [p for p in tmp_path.rglob("*") if common.TMP_MARK in p.name]
    assert paths.best.is_file()


# =================================================================================================
# 4. resume after a kill
# =================================================================================================

def _resume_settings(tmp: Path, data: Path, **extra) -> Path:
    return _settings_file(tmp / "settings.py", DATA_DIR=str(data), SEEN_CLASSES=["a", "b", "c"],
                          UNSEEN_CLASSES=["u", "v"], IMAGE_SIZE=32, WEIGHTS=None, NUM_WORKERS=0, DEVICE="cpu",
                          BATCH_SIZE=8, MAX_EPOCHS=8, PATIENCE=1000, VAL_PER_EPOCH=2, CACHE_TRUNK=False,
                          OUTPUT_DIR=str(tmp / "outputs"), CHECKPOINT_DIR=str(tmp / "checkpoints"),
                          CACHE_DIR=str(tmp / "cache"), **extra)


def test_killed_training_resumes_to_the_same_model(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 30, "b": 30, "c": 30, "u": 4, "v": 4}, size=32)
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    ref_dir.mkdir(), run_dir.mkdir()
    ref_settings, run_settings = _resume_settings(ref_dir, data), _resume_settings(run_dir, data)

    # the uninterrupted reference runs alongside (2 cores: it also slows the run that gets killed)
    reference = subprocess.Popen([PYTHON, "train.py", f"--config={ref_settings}"], cwd=REPO, env=_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen([PYTHON, "train.py", f"--config={run_settings}"], cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.pth"
    deadline = time.time() + 240
    try:
        while not last.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if victim.poll() is not None:
            pytest.fail(f"train.py ended (status {victim.returncode}) before last.pth appeared: could not kill "
                        f"it mid-way; make the run slower")
        assert last.exists(), "last.pth never appeared within 240 s"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    if victim.returncode != -signal.SIGKILL:
        pytest.fail(f"train.py finished (status {victim.returncode}) before it could be killed; make it slower")
    killed_state = common.load_checkpoint(last)
    if killed_state["finished"]:
        pytest.fail("training had already finished when it was killed; make the run slower")
    assert killed_state["epoch"] < 7

    resumed = _script("train.py", f"--config={run_settings}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]

    _assert_same_tensors(_model_tensors(run_dir / "checkpoints" / "best.pth"),
                         _model_tensors(ref_dir / "checkpoints" / "best.pth"))
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "outputs" / "training_history.csv"),
                                  pd.read_csv(ref_dir / "outputs" / "training_history.csv"))
    assert not [p for p in run_dir.rglob("*") if common.TMP_MARK in p.name]

    # a finished run is not trained again
    best_bytes = (run_dir / "checkpoints" / "best.pth").read_bytes()
    again = _script("train.py", f"--config={run_settings}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training already finished" in again.stdout
    assert "epoch 1:" not in again.stdout
    assert (run_dir / "checkpoints" / "best.pth").read_bytes() == best_bytes

    # --RESUME=False starts over (two epochs, to be quick)
    over = _script("train.py", f"--config={run_settings}", "--RESUME=False", "--MAX_EPOCHS=2")
    assert over.returncode == 0, over.stderr[-3000:]
    assert "already finished" not in over.stdout and "resuming" not in over.stdout
    assert "epoch 1:" in over.stdout
    history = pd.read_csv(run_dir / "outputs" / "training_history.csv")
    assert len(history) == 4 and history.epoch.iloc[0] < 1.0 and history.epoch.iloc[-1] == 2.0
    best = common.load_checkpoint(run_dir / "checkpoints" / "best.pth")
    assert best["config"]["MAX_EPOCHS"] == 2 and best["epoch"] <= 2.0
    last_state = common.load_checkpoint(last)
    assert last_state["finished"] and last_state["epoch"] == 1


def test_a_start_over_run_killed_early_is_not_mistaken_for_the_old_finished_run(tmp_path, tiny_folder,
                                                                                monkeypatch, capsys):
    """--RESUME=False, killed right after its first best.pth and before its first last.pth: the next
    run must not take the OLD run's finished last.pth for its own and stop ('training already
    finished') while best.pth holds the new run's model after one validation pass."""
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=3)
    paths = common.output_paths(cfg)
    train.run(cfg)
    fully_trained = _model_tensors(paths.best)

    real_save = common.save_torch

    def killed_after_first_best(obj, path):
        real_save(obj, path)
        if Path(path).name == "best.pth":
            raise KeyboardInterrupt  # stands in for a kill right after the new run's first best.pth

    monkeypatch.setattr(common, "save_torch", killed_after_first_best)
    with pytest.raises(KeyboardInterrupt):
        train.run(tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=3, RESUME=False))
    monkeypatch.undo()
    capsys.readouterr()

    train.run(cfg)  # same settings, RESUME=True: must train (the new run has no last.pth of its own)
    out = capsys.readouterr().out
    assert "training already finished" not in out, ("the old run's finished last.pth was taken for the killed "
                                                   "--RESUME=False run: best.pth is left after one validation pass")
    _assert_same_tensors(_model_tensors(paths.best), fully_trained)
    assert common.load_checkpoint(paths.last)["finished"]


def test_a_truncated_or_foreign_checkpoint_is_one_clear_error(tmp_path):
    good = tmp_path / "good.pth"
    common.save_torch({"model": {"w": torch.ones(100)}}, good)
    data = good.read_bytes()
    for name, content in (("truncated.pth", data[: len(data) // 2]), ("text.pth", b"hello"), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(common.PipelineError, match="cannot load"):
            common.load_checkpoint(tmp_path / name)


# =================================================================================================
# 5. provenance
# =================================================================================================

def test_embeddings_of_an_older_checkpoint_are_refused(tmp_path, tiny_cfg):
    train.run(tiny_cfg)
    embed.run(tiny_cfg)
    compute_average_distances.run(tiny_cfg)  # fine while the embeddings belong to best.pth
    retrained = tiny_config(tmp_path, tiny_cfg.DATA_DIR, RESUME=False, MAX_EPOCHS=2)
    train.run(retrained)
    for stage in (compute_average_distances, dimensionality_reduction, transfer_learning):
        with pytest.raises(common.PipelineError, match="embed.py") as error:
            stage.run(retrained)
        assert "checkpoint" in str(error.value), stage.__name__
    embed.run(retrained)  # after re-embedding the stage runs again
    compute_average_distances.run(retrained)


@pytest.fixture
def trained(tmp_path, tiny_cfg):
    train.run(tiny_cfg)
    return tiny_cfg, Path(tiny_cfg.DATA_DIR), common.output_paths(tiny_cfg)


def _changed_images_are_refused(cfg, paths):
    split_bytes = paths.split.read_bytes()
    for stage in (evaluate, embed, train):
        with pytest.raises(common.PipelineError, match="split") as error:
            stage.run(cfg)
        assert "images changed" in str(error.value), (stage.__name__, str(error.value))
        assert paths.split.read_bytes() == split_bytes, stage.__name__
    assert not (paths.out / "test_metrics.csv").exists()
    assert not paths.embeddings["train"].exists()


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


# =================================================================================================
# 6. reproducible
# =================================================================================================

def test_one_seed_gives_the_same_split_and_metrics_in_two_folders(tmp_path):
    outputs = []
    for name in ("first", "second"):
        data = make_image_folder(tmp_path / name / "images", {"a": 16, "b": 16, "c": 16, "u": 6, "v": 6})
        cfg = tiny_config(tmp_path / name, data, SEED=7)
        train.run(cfg)
        evaluate.run(cfg)
        outputs.append(common.output_paths(cfg).out)
    for file in ("split.csv", "test_metrics.csv", "training_history.csv"):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes(), file
    _assert_same_tensors(_model_tensors(tmp_path / "first" / "checkpoints" / "best.pth"),
                         _model_tensors(tmp_path / "second" / "checkpoints" / "best.pth"))


# =================================================================================================
# 7. offline weights
# =================================================================================================

@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored afterwards
    torch.hub.set_dir(str(home / "hub"))
    return home


def test_imagenet_weights_missing_names_the_expected_path(torch_home):
    expected = torch_home / "hub" / "checkpoints" / "efficientnet_v2_s-dd5fe13b.pth"
    assert backbone.imagenet_weights_path() == expected
    with pytest.raises(common.PipelineError) as error:
        backbone.load_trunk_weights(backbone.PlanktonNet(3, 32), "imagenet")
    assert str(expected) in str(error.value)
    assert not expected.exists()


def test_corrupt_imagenet_weights_are_refused_by_hash(torch_home):
    path = backbone.imagenet_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the published weights" * 1000)
    model = backbone.PlanktonNet(3, 32)
    before = {k: v.clone() for k, v in model.trunk.state_dict().items()}
    for setting in ("imagenet", "auto"):
        with pytest.raises(common.PipelineError, match="SHA-256"):
            backbone.load_trunk_weights(model, setting)
    _assert_same_tensors(model.trunk.state_dict(), before)


def test_a_local_weights_file_fills_the_trunk(tmp_path, torch_home):
    from torchvision.models import efficientnet_v2_s
    torch.manual_seed(3)
    full = efficientnet_v2_s(weights=None).state_dict()
    path = tmp_path / "my_weights.pth"
    torch.save(full, path)
    model = backbone.PlanktonNet(3, 32)
    source = backbone.load_trunk_weights(model, str(path))
    assert str(path) in source
    trunk = model.trunk.state_dict()
    assert trunk
    for name, tensor in trunk.items():
        assert torch.equal(tensor, full[f"features.{name}"]), name
    # a wrong file is refused with a message, not a traceback
    bad = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(common.PipelineError, match="not an efficientnet_v2_s"):
        backbone.load_trunk_weights(backbone.PlanktonNet(3, 32), str(bad))
    with pytest.raises(common.PipelineError, match="no such file"):
        backbone.load_trunk_weights(backbone.PlanktonNet(3, 32), str(tmp_path / "missing.pth"))


# =================================================================================================
# 8. command line
# =================================================================================================

def _assert_one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{done.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, tiny_folder):
    jobs = {
        "no_checkpoint": [PYTHON, "evaluate.py", *_dir_args(tmp_path / "e")],
        "no_data": [PYTHON, "train.py", "--DATA_DIR=/nonexistent", *_dir_args(tmp_path / "t")],
        "misspelt": [PYTHON, "train.py", f"--DATA_DIR={tiny_folder}", "--SEEN_CLASSES=['a','bb']",
                     "--UNSEEN_CLASSES=['u','v']", *_dir_args(tmp_path / "m")],
        "unknown_setting": [PYTHON, "train.py", "--MAX_EPOCH=3", *_dir_args(tmp_path / "k")],
        "no_settings_file": [PYTHON, "embed.py", f"--config={tmp_path / 'missing.py'}"],
    }
    running = {name: subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, args in jobs.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(jobs[name], process.returncode, out, err)

    line = _assert_one_error_line(done["no_checkpoint"])
    assert "run train.py first" in line and str(tmp_path / "e" / "checkpoints" / "best.pth") in line
    line = _assert_one_error_line(done["no_data"])
    assert "/nonexistent" in line and "not a folder" in line
    line = _assert_one_error_line(done["misspelt"])
    assert "'bb'" in line and "a (16), b (16), c (16), u (12), v (12)" in line
    line = _assert_one_error_line(done["unknown_setting"])
    assert "--MAX_EPOCH" in line and "no such setting" in line
    line = _assert_one_error_line(done["no_settings_file"])
    assert str(tmp_path / "missing.py") in line
    assert not (tmp_path / "t" / "outputs" / "split.csv").exists()
    assert not (tmp_path / "m" / "outputs" / "split.csv").exists()
