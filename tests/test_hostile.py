"""The hostile-use examples of the settings, run through each script's main() as a user would run
it: one `error:` line on stderr, exit status 1, and nothing written (not even the output folders)."""
import pytest
from conftest import dir_args

import compute_average_distances
import dimensionality_reduction
import embed
import evaluate
import ranked_images
import reproduce
import train
import transfer_learning
from plankton import system

BAD_SETTINGS = ["--BATCH_SIZE=0", "--LR=abc", "--SEED=x", "--DEVICE=tpu", "--NUM_WORKERS=-1", "--DROPOUT=1.5",
                "--UMAP_SAMPLES=0", "--CLOSE_FAR_COUNT=0", "--EMBEDDING_DIM=0", "--UNSEEN_CLASSES=[]",
                "--AUGMENT=false", "--RESUME=false", "--CACHE_TRUNK=false", "--TRAIN_FRACTION=0.5",
                "--CACHE_DTYPE=int8", "--BAD_IMAGES=foo", "--SEEN_CLASSES=['a','a','b']", "--MAX_EPOCHS=0",
                "--OUTPUT_DIR=", "--TRUNK=vgg16", "--REPRO_TOLERANCE=-1", "--RANKED_AMONG=best",
                "--RANKED_CLASSES=['zz']", "--MAX_EPOCH=3", "--config=/no/such/settings.py", "stray"]


def _one_error_line(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argument", BAD_SETTINGS)
@pytest.mark.parametrize("main", [train.main, evaluate.main, embed.main, compute_average_distances.main,
                                  dimensionality_reduction.main, transfer_learning.main, reproduce.main,
                                  ranked_images.main],
                         ids=["train", "evaluate", "embed", "distances", "umap", "transfer", "reproduce", "ranked"])
def test_a_bad_setting_stops_every_script_before_anything_is_written(tmp_path, capsys, main, argument):
    line = _one_error_line(capsys, main, [*dir_args(tmp_path), argument])  # the bad one last: it wins
    name = argument.lstrip("-").split("=")[0]
    assert name in line or "stray" in line or "settings" in line, line
    assert not list(tmp_path.iterdir()), "an output folder was made before the settings were checked"


def test_help_lists_every_setting_and_exits_0(capsys):
    from plankton import settings
    with pytest.raises(SystemExit) as stop:
        train.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in settings.SCHEMA)


def test_a_tilde_in_a_folder_setting_is_the_home_folder(tmp_path, monkeypatch):
    from plankton import settings
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = settings.load_settings(["--OUTPUT_DIR=~/runs/out"])
    assert cfg.OUTPUT_DIR == str(tmp_path / "runs" / "out")


def test_a_second_run_on_the_same_folders_stops_at_once(tmp_path, capsys):
    import subprocess
    import sys
    import time
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from plankton import runner\n"
        "from pathlib import Path\n"
        "with runner.folder_lock(Path(sys.argv[2])):\n"
        "    print('held', flush=True); time.sleep(60)"), str(system.REPO_DIR), str(tmp_path / "outputs")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = _one_error_line(capsys, evaluate.main, dir_args(tmp_path))
        assert f"pid {holder.pid}" in line and "in use by another run" in line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    line = _one_error_line(capsys, evaluate.main, dir_args(tmp_path))  # the lock died with its holder
    assert "run train.py first" in line
