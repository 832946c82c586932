"""The promise to users: an error they can cause ends in one `error: ...` line and exit status 1,
with nothing half-written, nothing lost and no later run silently wrong. Each test names the kind
of fault it covers: runs beside each other, a full or read-only disk, a stage stopped part-way,
stale or foreign state, a crafted pickle."""
import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PYTHON, REPO, Exploit, env, make_image_folder, settings_file, tiny_config

import dimensionality_reduction
import embed
import evaluate
import train
import transfer_learning
from plankton import embedding_files, fileio, hashing, locations, plots, probes, progress, provenance, registry, runner
from plankton.errors import PipelineError

SEEN, UNSEEN = ["a", "b", "c"], ["u", "v"]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file of a folder but the lock a script holds while it runs (its logs are in logs/)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".plankton.lock"}


def one_error_line(stage_run, cfg, capsys) -> str:
    """Run a stage the way its script does (runner.run_script); return its single stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        runner.run_script(lambda _settings: stage_run(cfg), [f"--OUTPUT_DIR={cfg.OUTPUT_DIR}",
                                                             f"--CHECKPOINT_DIR={cfg.CHECKPOINT_DIR}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def fake_embeddings(cfg, root: Path, seed: int = 0) -> locations.Paths:
    """A stand-in best.pth and embeddings of the images under root (3 training images per seen
    class: every one of them appears in the close/far figures), made without training."""
    paths = locations.prepare_output_dirs(cfg)
    fileio.save_torch({"stand_in": torch.full((4,), float(seed))}, paths.best)
    rng = np.random.default_rng(seed)
    for subset, classes, rows in (("train", SEEN, slice(0, 3)), ("test", SEEN, slice(3, 6)),
                                  ("unseen", UNSEEN, slice(0, 12))):
        relpaths, labels = [], []
        for i, name in enumerate(classes):
            files = sorted(p.name for p in (root / name).iterdir())[rows]
            relpaths += [f"{name}/{f}" for f in files]
            labels += [i] * len(files)
        labels = np.array(labels)
        points = rng.normal(size=(len(labels), 8)) + 4.0 * np.eye(8)[labels]
        frame = embedding_files.embeddings_frame(points, labels, classes, relpaths, embedding_files.EmbeddingsInfo(
            checkpoint_sha256=hashing.file_sha256(paths.best), split_sha256="stand-in", subset=subset,
            class_names=tuple(classes), data_dir=str(root), weights_source="none", task="multiclass"))
        embedding_files.save_embeddings(frame, paths.embeddings(subset))
    return paths


@pytest.fixture
def faked(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder)
    return cfg, fake_embeddings(cfg, tiny_folder)


def fail_replace_of(monkeypatch, names: set[str], error: OSError) -> None:
    """os.replace raises `error` when it would move a temporary onto one of `names`."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name in names:
            raise error
        return real_replace(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if fileio.TMP_MARK in p.name]


# ---- 1. runs beside each other ---------------------------------------------------------------------

def test_cleanup_removes_only_temporaries_of_dead_processes(tmp_path):
    cfg = tiny_config(tmp_path)
    paths = locations.prepare_output_dirs(cfg)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_own = paths.checkpoints / f"last.pth{fileio.TMP_MARK}{os.getpid()}-0123abcd"
        live_other = paths.cache / "trunk_x" / f"features.npy{fileio.TMP_MARK}{sleeper.pid}-89abcdef"
        dead = paths.out / f"split.csv{fileio.TMP_MARK}{_pid_of_finished()}-deadbeef"
        users = [paths.out / "notes.tmp-final.tex", paths.out / "draft.tmp-1234", paths.checkpoints / "a.tmp-9"]
        for path in [live_own, live_other, dead] + users:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        locations.prepare_output_dirs(cfg)
        assert live_own.exists() and live_other.exists(), "a running process's temporary was deleted"
        assert all(p.exists() for p in users), "a user's own file was deleted"
        assert not dead.exists(), "a killed run's temporary was left behind"
    finally:
        sleeper.kill()
        sleeper.wait()


def _pid_of_finished() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def test_temporaries_are_named_unmistakably(tmp_path):
    with fileio.atomic_path(tmp_path / "best.pth") as first, fileio.atomic_path(tmp_path / "best.pth") as second:
        assert fileio.TMP_NAME.fullmatch(first.name) and first.name.startswith(f"best.pth.tmp-plankton-{os.getpid()}-")
        assert first != second  # two writers in one process never share a temporary
        first.write_text("one")
        second.write_text("two")
    assert (tmp_path / "best.pth").read_text() == "one" and not temporaries(tmp_path)  # the last to finish wins


# ---- 2. a full, read-only or foreign folder -------------------------------------------------------

_TORCH_DISK_FULL = RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                                "file data/0: file write failed")


def test_every_atomic_writer_turns_a_full_disk_into_one_line_naming_the_file(tmp_path, monkeypatch):
    plt = plots.pyplot()
    frame = pd.DataFrame({"label": [0], "class_name": ["a"], "path": ["a/x.png"], "e0": [1.0]})
    writers = {"table.csv": lambda p: fileio.save_csv(frame, p), "record.json": lambda p: fileio.save_json({}, p),
               "figure.png": lambda p: plots.save_figure(plt.figure(), p),
               "model.pth": lambda p: fileio.save_torch({"w": torch.ones(3)}, p),
               "embeddings_train.pkl": lambda p: embedding_files.save_embeddings(frame, p)}
    for name, write in writers.items():
        (tmp_path / name).write_text("old")
    fail_replace_of(monkeypatch, set(writers), OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    for name, write in writers.items():
        with pytest.raises(PipelineError) as error:
            write(tmp_path / name)
        assert str(error.value) == f"cannot write {tmp_path / name}: No space left on device"
        assert (tmp_path / name).read_text() == "old", name
    monkeypatch.undo()

    real_save = torch.save

    def disk_full_save(obj, f, *args, **kwargs):  # what torch.save does when the disk fills up
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise _TORCH_DISK_FULL
    monkeypatch.setattr(torch, "save", disk_full_save)
    with pytest.raises(PipelineError, match=r"cannot write .*model.pth: the write failed, is the disk full"):
        fileio.save_torch({"w": torch.ones(3)}, tmp_path / "model.pth")
    assert (tmp_path / "model.pth").read_text() == "old"
    assert not temporaries(tmp_path)


def test_a_full_disk_in_a_stage_is_one_line_and_leaves_the_stage_unconfirmed(faked, capsys, monkeypatch):
    cfg, paths = faked
    transfer_learning.run(cfg)
    old_table = (paths.out / "transfer_learning.csv").read_bytes()
    fake_embeddings(cfg, Path(cfg.DATA_DIR), seed=1)  # a new checkpoint and embeddings, then a full disk
    fail_replace_of(monkeypatch, {"accuracy_Linear.png"}, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    line = one_error_line(transfer_learning.run, cfg, capsys)
    assert line == f"error: cannot write {paths.out / 'accuracy_Linear.png'}: No space left on device"
    assert not temporaries(paths.out)
    # half new (the table, one figure), half old: no provenance vouches for any of them
    assert (paths.out / "transfer_learning.csv").read_bytes() != old_table
    assert not provenance.provenance_path(paths, "transfer_learning").exists()
    assert str(paths.out / "transfer_learning.csv") in provenance.stale_outputs(paths, "transfer_learning")


def _read_only_folder_denies_writes(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    probe.unlink()
    return False  # root: permission bits do not stop it


def test_a_read_only_output_folder_is_one_line_and_keeps_the_old_outputs(faked, capsys, monkeypatch):
    cfg, paths = faked
    transfer_learning.run(cfg)
    before = contents(paths.out)
    paths.out.chmod(0o500)
    try:
        if not _read_only_folder_denies_writes(paths.out):  # running as root: the kernel's answer, injected
            fail_replace_of(monkeypatch, set(before) | {"transfer_learning.csv"},
                            PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
            real_unlink = Path.unlink
            monkeypatch.setattr(Path, "unlink", lambda self, *a, **k: _denied() if self.parent == paths.out
                                else real_unlink(self, *a, **k))
        line = one_error_line(transfer_learning.run, cfg, capsys)
    finally:
        paths.out.chmod(0o755)
    assert line.startswith("error: cannot ") and line.endswith(": Permission denied"), line
    assert str(paths.out / "provenance_transfer_learning.json") in line or "transfer_learning.csv" in line, line
    assert contents(paths.out) == before
    assert provenance.stale_outputs(paths, "transfer_learning") == []


def _denied():
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def test_an_unwritable_folder_outside_the_atomic_writers_is_one_line(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path)

    def mkdir_denied(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
    monkeypatch.setattr(Path, "mkdir", mkdir_denied)
    line = one_error_line(transfer_learning.run, cfg, capsys)
    assert line == f"error: cannot write {(tmp_path / 'outputs').resolve()}: Permission denied"


# ---- 3. a stage's outputs half new, half old ------------------------------------------------------------

def test_provenance_vouches_for_each_output_file_and_flags_any_other(faked):
    cfg, paths = faked
    assert provenance.stale_outputs(paths, "transfer_learning") == []  # nothing yet
    transfer_learning.run(cfg)
    record = json.loads(provenance.provenance_path(paths, "transfer_learning").read_text())
    written = sorted(p.name for pattern in registry.stage("transfer_learning").outputs for p in paths.out.glob(pattern))
    assert sorted(record["outputs"]) == written and len(written) == 2 + len(probes.PROBES) + 4  # + few-shot
    assert all(record["outputs"][n] == hashing.sha256_file(paths.out / n) for n in written)
    assert record["inputs"] == {str(paths.best): hashing.sha256_file(paths.best),
                                str(paths.embeddings("unseen")): hashing.sha256_file(paths.embeddings("unseen"))}
    assert provenance.stale_outputs(paths, "transfer_learning") == []

    plt = plots.pyplot()
    plots.save_figure(plt.figure(), paths.out / "accuracy_SVC.png")  # one output replaced by another run
    (paths.out / "accuracy_old.png").write_bytes(b"left by an older run")
    assert provenance.stale_outputs(paths, "transfer_learning") == [str(paths.out / "accuracy_SVC.png"),
                                                                   str(paths.out / "accuracy_old.png")]
    fake_embeddings(cfg, Path(cfg.DATA_DIR), seed=1)  # a new checkpoint: every output is now stale
    assert len(provenance.stale_outputs(paths, "transfer_learning")) == len(written) + 1  # every output and the older file


def test_a_stage_stopped_part_way_is_flagged_and_the_next_run_says_it_replaces_it(faked, capsys, monkeypatch):
    cfg, paths = faked
    transfer_learning.run(cfg)
    fake_embeddings(cfg, Path(cfg.DATA_DIR), seed=1)  # new embeddings, then a stop after the first figure
    real_save_figure, saved = plots.save_figure, []

    def killed_after_one(fig, path):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        real_save_figure(fig, path)
    monkeypatch.setattr(plots, "save_figure", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        transfer_learning.run(cfg)
    monkeypatch.undo()
    outputs = [str(paths.out / name) for name in provenance.existing_outputs(paths, "transfer_learning")]
    assert "transfer_learning.csv" in str(outputs) and len(outputs) == 2 + len(probes.PROBES) + 4
    assert provenance.stale_outputs(paths, "transfer_learning") == sorted(outputs)
    capsys.readouterr()
    transfer_learning.run(cfg)
    assert "no provenance_transfer_learning.json (an earlier run stopped part-way): replacing them" in capsys.readouterr().out
    assert provenance.stale_outputs(paths, "transfer_learning") == []


def test_an_input_replaced_while_a_stage_runs_leaves_no_provenance(faked, monkeypatch):
    cfg, paths = faked
    real_save_csv = fileio.save_csv

    def save_then_another_embed(frame, path, **kwargs):
        real_save_csv(frame, path, **kwargs)
        fake_embeddings(cfg, Path(cfg.DATA_DIR), seed=2)
    monkeypatch.setattr(fileio, "save_csv", save_then_another_embed)
    with pytest.raises(PipelineError, match=r"best.pth changed while transfer_learning ran"):
        transfer_learning.run(cfg)
    assert not provenance.provenance_path(paths, "transfer_learning").exists()


@pytest.fixture
def trained(tmp_path, tiny_folder):
    cfg = tiny_config(tmp_path, tiny_folder, MAX_EPOCHS=1)
    train.run(cfg)
    return cfg, locations.Paths.from_settings(cfg)


def test_evaluate_and_embed_record_provenance_and_refuse_a_copied_data_folder(trained, tmp_path, capsys):
    cfg, paths = trained
    evaluate.run(cfg)
    embed.run(cfg)
    for stage, outputs in (("evaluate", ["test_metrics.csv", "test_metrics.json", "confusion_matrix.png",
                                         "test_predictions.csv", "test_predictions.parquet", "test_scores.npz",
                                         "misclassified_test_images.png", "tail_accuracy.csv", "tail_accuracy.png"]),
                           ("embed", [f"embeddings_{s}.{e}" for s in ("train", "test", "unseen") for e in ("pkl", "parquet")])):
        record = json.loads(provenance.provenance_path(paths, stage).read_text())
        assert sorted(record["outputs"]) == sorted(outputs)
        assert sorted(record["inputs"]) == sorted([str(paths.best), str(paths.split)])
        assert provenance.stale_outputs(paths, stage) == []
    as_csv = pd.read_csv(paths.predictions, dtype={"true_class": str, "predicted_class": str})
    pd.testing.assert_frame_equal(pd.read_parquet(paths.predictions.with_suffix(".parquet")), as_csv,
                                  check_dtype=False)  # the Parquet copy: the same columns and values

    # 4. the same file names in another folder are not the images the model was trained on
    copy = shutil.copytree(cfg.DATA_DIR, tmp_path / "same_names")
    cfg.DATA_DIR = str(copy)
    before = contents(paths.out)
    for stage in (evaluate, embed):
        line = one_error_line(stage.run, cfg, capsys)
        assert "was trained on images in" in line and f"DATA_DIR is now {copy}" in line, line
    assert contents(paths.out) == before


# ---- 4. state that changed since: an image of the close/far figures is gone ------------------------------

def test_a_missing_close_far_image_is_one_line_before_anything_is_written(faked, capsys):
    cfg, paths = faked
    gone = Path(cfg.DATA_DIR) / "b" / sorted(p.name for p in (Path(cfg.DATA_DIR) / "b").iterdir())[1]
    gone.unlink()
    line = one_error_line(dimensionality_reduction.run, cfg, capsys)
    assert line == (f"error: {gone} no longer exists (1 of the 9 images the close/far figures show are gone) — "
                    f"restore them, or re-run embed.py")
    assert provenance.stale_outputs(paths, "dimensionality_reduction") == []
    assert not list(paths.out.glob("*.png")) and not list(paths.out.glob("umap_*"))


def test_an_unreadable_close_far_image_is_one_line_before_anything_is_written(faked, capsys):
    cfg, paths = faked
    broken = Path(cfg.DATA_DIR) / "a" / "img_000.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    line = one_error_line(dimensionality_reduction.run, cfg, capsys)
    assert line.startswith(f"error: cannot read {broken}, shown in a close/far figure (") and line.endswith(
        "restore it, or re-run embed.py"), line
    assert not list(paths.out.glob("*.png")) and not list(paths.out.glob("umap_*"))


# ---- 5. a crafted embeddings pickle ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["column", "attrs"])
def test_a_crafted_embeddings_pickle_is_refused_and_never_run(faked, tmp_path, capsys, where):
    cfg, paths = faked
    marker = tmp_path / "exploited"
    frame = pd.read_pickle(paths.embeddings("unseen"))  # our own file: safe to read this way
    if where == "column":
        frame["note"] = [Exploit(marker)] * len(frame)
    else:
        frame.attrs["note"] = Exploit(marker)
    frame.to_pickle(paths.embeddings("unseen"))
    assert not marker.exists()
    line = one_error_line(transfer_learning.run, cfg, capsys)
    assert line.startswith(f"error: refused to read {paths.embeddings('unseen')}: ") and line.endswith(
        "; re-run embed.py"), line
    assert not marker.exists(), "unpickling ran code from the file"


# ---- the scripts themselves, as processes ------------------------------------------------------------------

@pytest.mark.slow
def test_a_truly_read_only_output_folder_through_the_script(tmp_path, tiny_folder):
    """The kernel's own refusal: as root (where permission bits do not stop writes) the script runs
    as user nobody, in a folder nobody may read but not write."""
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"contract-{os.getpid()}-{tmp_path.name}"
    work.mkdir(mode=0o755)
    try:
        data = shutil.copytree(tiny_folder, work / "images")
        cfg = tiny_config(work, data)
        paths = fake_embeddings(cfg, data)
        config = settings_file(work / "settings.py", DATA_DIR=str(data), SEEN_CLASSES=SEEN, UNSEEN_CLASSES=UNSEEN,
                               OUTPUT_DIR=str(paths.out), CHECKPOINT_DIR=str(paths.checkpoints),
                               CACHE_DIR=str(paths.cache), TRANSFER_REPEATS=2)
        command = [PYTHON, "transfer_learning.py", f"--config={config}"]
        variables = env()
        if os.geteuid() == 0:
            if not shutil.which("setpriv"):
                pytest.fail("running as root without setpriv: cannot make a folder truly read-only")
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] + command
            variables.update(HOME=str(work / "mpl"), MPLCONFIGDIR=str(work / "mpl"), NUMBA_CACHE_DIR=str(work / "numba"))
        for folder in work.rglob("*"):
            folder.chmod(folder.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if folder.is_dir() else 0))
        (work / "mpl").mkdir(mode=0o777)
        (work / "numba").mkdir(mode=0o777)
        paths.out.chmod(0o555)
        done = subprocess.run(command, cwd=REPO, env=variables, capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stderr
        # the first write is the folder's lock file (opened without following links): named with the reason
        assert done.stderr.strip().splitlines() == [f"error: cannot write {paths.out / '.plankton.lock'}: "
                                                    f"Permission denied"], done.stderr
        assert not (paths.out / "transfer_learning.csv").exists() and not temporaries(paths.out)
    finally:
        for folder in [work] + [p for p in work.rglob("*") if p.is_dir()]:
            folder.chmod(0o755)
        shutil.rmtree(work)


@pytest.mark.slow
def test_a_script_leaves_a_running_process_temporary_and_the_users_files_alone(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 4, "b": 4})
    out = tmp_path / "outputs"
    out.mkdir()
    mine = out / f"split.csv{fileio.TMP_MARK}{os.getpid()}-0badf00d"
    notes = out / "notes.tmp-final.tex"
    mine.write_text("being written")
    notes.write_text("\\section{}")
    done = subprocess.run([PYTHON, "evaluate.py", f"--DATA_DIR={data}", f"--OUTPUT_DIR={out}",
                           f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}", f"--CACHE_DIR={tmp_path / 'cache'}"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stderr.startswith("error: no checkpoint"), done.stderr
    assert mine.read_text() == "being written" and notes.read_text() == "\\section{}"


def test_long_steps_print_progress_lines_when_the_output_is_a_log_file(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY", 0.0)  # a line after every item
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress.Progress(range(4), "trunk features of 4 images", unit="batches")
    bar.set_postfix(loss="0.5")
    assert list(bar) == [0, 1, 2, 3]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("trunk features of 4 images: 4/4 (100%) batches in ")
    assert lines[0].endswith(", loss 0.5") and "s left" in lines[0]
    assert not list(progress.Progress([], "nothing", min_total=200)) and capsys.readouterr().out == ""


def test_a_scripts_output_and_its_error_line_are_kept_in_a_log(tmp_path, capsys):
    import evaluate
    with pytest.raises(SystemExit):
        evaluate.main([f"--OUTPUT_DIR={tmp_path / 'outputs'}", f"--CHECKPOINT_DIR={tmp_path / 'checkpoints'}",
                       f"--CACHE_DIR={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    log = (tmp_path / "outputs" / "logs" / "evaluate.log").read_text()
    assert log.startswith("# ") and err.strip() in log and "run train.py first" in log


def test_figures_say_which_trunk_weights_made_them_unless_imagenet(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(fileio, "atomic_path", lambda path: contextlib.nullcontext(path))
    plt = plots.pyplot()
    for source, expected in (("random initialisation (WEIGHTS=None)", True), ("ImageNet (efficientnet.pth)", False)):
        plots.note_trunk_weights(source)
        fig, _ = plt.subplots()
        monkeypatch.setattr(fig, "savefig", lambda *a, **k: saved.append([t.get_text() for t in fig.texts]))
        plots.save_figure(fig, tmp_path / "figure.png")
        assert any("random initialisation" in text and "not ImageNet" in text for text in saved[-1]) == expected
    plots.note_trunk_weights("ImageNet")  # later tests start without a note
