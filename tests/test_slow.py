"""Slow tests (`pytest -m slow`): the whole pipeline, kill and resume in real processes, the
command line's error messages."""
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    PYTHON,
    REPO,
    assert_same_tensors,
    dir_args,
    env,
    make_image_folder,
    model_tensors,
    script,
    settings_file,
    tiny_config,
)
from PIL import Image

import run_all
from plankton import checkpoints, embedding_files, fileio, hashing, locations, registry

pytestmark = pytest.mark.slow


def test_all_six_stages_end_to_end(shared_run):
    tiny_cfg, times = shared_run.cfg, shared_run.times
    assert set(times) == {s.name for s in registry.run_all_stages(tiny_cfg)} | {"total"}
    with shared_run.lock:
        _check_whole_run(tiny_cfg)


def _check_whole_run(tiny_cfg):
    out = locations.Paths.from_settings(tiny_cfg).out
    expected = ["split.csv", "training_history.csv", "training_plot.png", "test_metrics.csv", "confusion_matrix.png",
                "umap_embeddings.png", "umap_coordinates.csv", "transfer_learning.csv", "accuracy_all.png"]
    expected += [f"embeddings_{s}.pkl" for s in ("train", "test", "unseen")]
    expected += [f"average_{k}_distances_{s}.{e}" for k in ("euclidean", "angular") for s in ("test", "unseen")
                 for e in ("csv", "png")]
    expected += [f"accuracy_{m}.png" for m in ("SVC", "Linear", "kNN", "kNN_cosine", "NCM")]
    expected += ["leaks.csv", "leaks.png", "leaks_summary.json", "embedding_quality.csv", "fewshot.csv",
                 "fewshot_summary.csv", "fewshot_all.png", "fewshot_per_class.png"]
    expected += [f"close_faraway_closeotherclass_class_{i}.png" for i in range(3)]
    for name in expected:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in expected:
        if name.endswith(".png"):
            assert Image.open(out / name).size[0] > 300, name
    metrics = pd.read_csv(out / "test_metrics.csv")
    assert metrics.class_name.tolist() == ["a", "b", "c", "overall"]
    assert metrics.accuracy.iloc[-1] > 0.6  # three easy synthetic classes; chance is 1/3
    best_sha = hashing.sha256_file(locations.Paths.from_settings(tiny_cfg).best)
    unseen = embedding_files.open_embeddings(locations.Paths.from_settings(tiny_cfg), "unseen")
    assert list(unseen.columns[:3]) == ["label", "class_name", "path"] and len(unseen.columns) == 3 + 128
    assert set(unseen.class_name) == {"u", "v"} and len(unseen) == 24
    assert unseen.attrs["subset"] == "unseen" and unseen.attrs["checkpoint_sha256"] == best_sha
    distances = pd.read_csv(out / "average_euclidean_distances_test.csv", index_col=0)
    assert list(distances.columns) == ["a", "b", "c"] and np.allclose(distances.values, distances.values.T)
    assert not list(out.glob(f"*{fileio.TMP_MARK}*"))


def test_small_data_runs_to_the_end(tmp_path):
    """Classes of 10 images, a validation set smaller than a batch, fewer batches per epoch than
    validation passes asked for, and an unseen class of 2 images (smaller than the test part needs)."""
    folder = make_image_folder(tmp_path / "images", {"a": 10, "b": 10, "c": 10, "u": 2, "v": 6})
    cfg = tiny_config(tmp_path, folder, BATCH_SIZE=64, VAL_PER_EPOCH=10, TRANSFER_REPEATS=1, CLOSE_FAR_COUNT=5)
    times = run_all.run(cfg)
    assert times["total"] >= sum(seconds for stage, seconds in times.items() if stage != "total")
    history = pd.read_csv(locations.Paths.from_settings(cfg).history)
    assert len(history) == cfg.MAX_EPOCHS  # one batch per epoch: one validation pass each
    results = pd.read_csv(locations.Paths.from_settings(cfg).out / "transfer_learning.csv")
    assert results.n_test.iloc[0] == 3 and results.balanced_accuracy.notna().all()


_KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
from plankton import fileio
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    data = Path(f).read_bytes()
    Path(f).write_bytes(data[: len(data) // 3])
    os.kill(os.getpid(), signal.SIGKILL)  # no finally, no atexit: a real kill mid-write
torch.save = save_then_die
fileio.save_torch({{"value": torch.zeros(1000)}}, Path({target!r}))
"""


def test_save_killed_mid_write_leaves_the_old_file_and_a_cleaned_up_temporary(tmp_path):
    cfg = tiny_config(tmp_path)
    paths = locations.prepare_output_dirs(cfg)
    old = {"value": torch.arange(1000)}
    fileio.save_torch(old, paths.best)
    done = subprocess.run([PYTHON, "-c", _KILLED_WRITER.format(repo=str(REPO), target=str(paths.best))],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    leftovers = [p for p in paths.checkpoints.iterdir() if fileio.TMP_MARK in p.name]
    assert leftovers, "the simulated kill should have left a temporary file"
    assert torch.equal(checkpoints.load_checkpoint_file(paths.best)["value"], old["value"])
    locations.prepare_output_dirs(cfg)
    assert not [p for p in tmp_path.rglob("*") if fileio.TMP_MARK in p.name]
    assert paths.best.is_file()


def _resume_settings(tmp: Path, data: Path, **extra) -> Path:
    return settings_file(tmp / "settings.py", DATA_DIR=str(data), SEEN_CLASSES=["a", "b", "c"],
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
    reference = subprocess.Popen([PYTHON, "train.py", f"--config={ref_settings}"], cwd=REPO, env=env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen([PYTHON, "train.py", f"--config={run_settings}"], cwd=REPO, env=env(),
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
    killed_state = checkpoints.open_checkpoint(last)
    if killed_state.finished:
        pytest.fail("training had already finished when it was killed; make the run slower")
    assert killed_state.epoch < 7

    resumed = script("train.py", f"--config={run_settings}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    ref_out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, ref_out[-3000:]

    assert_same_tensors(model_tensors(run_dir / "checkpoints" / "best.pth"),
                         model_tensors(ref_dir / "checkpoints" / "best.pth"))
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "outputs" / "training_history.csv"),
                                  pd.read_csv(ref_dir / "outputs" / "training_history.csv"))
    assert not [p for p in run_dir.rglob("*") if fileio.TMP_MARK in p.name]

    # a finished run is not trained again
    best_bytes = (run_dir / "checkpoints" / "best.pth").read_bytes()
    again = script("train.py", f"--config={run_settings}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training already finished" in again.stdout
    assert "epoch 1:" not in again.stdout
    assert (run_dir / "checkpoints" / "best.pth").read_bytes() == best_bytes

    # --RESUME=False starts over (two epochs, to be quick)
    over = script("train.py", f"--config={run_settings}", "--RESUME=False", "--MAX_EPOCHS=2")
    assert over.returncode == 0, over.stderr[-3000:]
    assert "already finished" not in over.stdout and "resuming" not in over.stdout
    assert "epoch 1:" in over.stdout
    history = pd.read_csv(run_dir / "outputs" / "training_history.csv")
    assert len(history) == 4 and history.epoch.iloc[0] < 1.0 and history.epoch.iloc[-1] == 2.0
    best = checkpoints.open_checkpoint(run_dir / "checkpoints" / "best.pth")
    assert best.config["MAX_EPOCHS"] == 2 and best.epoch <= 2.0
    last_state = checkpoints.open_checkpoint(last)
    assert last_state.finished and last_state.epoch == 1


def _assert_one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{done.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


def test_cli_errors_are_one_line(tmp_path, tiny_folder):
    jobs = {
        "no_checkpoint": [PYTHON, "evaluate.py", *dir_args(tmp_path / "e")],
        "no_data": [PYTHON, "train.py", "--DATA_DIR=/nonexistent", *dir_args(tmp_path / "t")],
        "misspelt": [PYTHON, "train.py", f"--DATA_DIR={tiny_folder}", "--SEEN_CLASSES=['a','bb']",
                     "--UNSEEN_CLASSES=['u','v']", *dir_args(tmp_path / "m")],
        "unknown_setting": [PYTHON, "train.py", "--MAX_EPOCH=3", *dir_args(tmp_path / "k")],
        "no_settings_file": [PYTHON, "embed.py", f"--config={tmp_path / 'missing.py'}"],
        "bad_boolean": [PYTHON, "train.py", "--AUGMENT=false", *dir_args(tmp_path / "b")],
        "help": [PYTHON, "evaluate.py", "--help"],
    }
    running = {name: subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, args in jobs.items()}
    done = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(jobs[name], process.returncode, out, err)

    line = _assert_one_error_line(done["no_checkpoint"])
    assert "run train.py first" in line and str(tmp_path / "e" / "checkpoints" / "best.pth") in line
    assert line in (tmp_path / "e" / "outputs" / "logs" / "evaluate.log").read_text()  # named after the script
    line = _assert_one_error_line(done["no_data"])
    assert "/nonexistent" in line and "not a folder" in line
    line = _assert_one_error_line(done["misspelt"])
    assert "'bb'" in line and "a (16), b (16), c (16), u (12), v (12)" in line
    line = _assert_one_error_line(done["unknown_setting"])
    assert "--MAX_EPOCH=3" in line and "did you mean MAX_EPOCHS?" in line
    line = _assert_one_error_line(done["no_settings_file"])
    assert str(tmp_path / "missing.py") in line
    line = _assert_one_error_line(done["bad_boolean"])
    assert "AUGMENT='false'" in line and "True or False" in line
    assert not (tmp_path / "b").exists()  # refused before any folder is made
    assert done["help"].returncode == 0 and "MAX_EPOCHS" in done["help"].stdout and "TRUNK" in done["help"].stdout
    assert not (tmp_path / "t" / "outputs" / "split.csv").exists()
    assert not (tmp_path / "m" / "outputs" / "split.csv").exists()

