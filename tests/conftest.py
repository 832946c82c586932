"""Tiny image folders and settings for fast CPU tests; every test works in its own temporary folder.
Shared helpers for tests that run the scripts as processes."""
import builtins
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plankton import checkpoints, fileio, system

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# one numba cache for the whole session, so UMAP compiles once, not once per test
os.environ.setdefault("NUMBA_CACHE_DIR", str(REPO / "cache" / "numba"))

from plankton import settings  # noqa: E402

# Every process a test starts ends with the test session, however that ends (Ctrl-C, a killed
# pytest): the child gets SIGTERM when pytest's process goes (plankton.system.die_with_parent).
_popen_init = subprocess.Popen.__init__


def _popen_dying_with_pytest(self, *args, **kwargs):
    kwargs.setdefault("preexec_fn", system.die_with_parent)
    _popen_init(self, *args, **kwargs)


subprocess.Popen.__init__ = _popen_dying_with_pytest


def make_image_folder(root: Path, classes: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """One sub-folder per class; class i draws a bright square at its own position and colour on
    a noisy background, so a classifier can tell the classes apart in a couple of epochs."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(exist_ok=True)
        colour = np.array([(37 * i) % 256, (91 * i + 80) % 256, (151 * i + 160) % 256])
        corner = [(i * 5) % (size - 8), (i * 11) % (size - 8)]
        for j in range(count):
            image = rng.integers(0, 60, (size, size, 3))
            y, x = corner[0] + rng.integers(0, 3), corner[1] + rng.integers(0, 3)
            image[y:y + 6, x:x + 6] = colour
            Image.fromarray(image.astype(np.uint8)).save(root / name / f"img_{j:03d}.png")
    return root


def tiny_config(tmp_path: Path, data_dir: Path | None = None, **overrides):
    """The project's settings with every folder inside tmp_path and everything made small."""
    cfg = settings.load_settings([])
    cfg.DATA_DIR = str(data_dir) if data_dir is not None else None
    cfg.BUILTIN_DATA_DIR = str(tmp_path / "digits")
    cfg.OUTPUT_DIR, cfg.CHECKPOINT_DIR = str(tmp_path / "outputs"), str(tmp_path / "checkpoints")
    cfg.CACHE_DIR = str(tmp_path / "cache")
    cfg.SEEN_CLASSES, cfg.UNSEEN_CLASSES = ["a", "b", "c"], ["u", "v"]
    cfg.IMAGE_SIZE, cfg.WEIGHTS, cfg.NUM_WORKERS, cfg.DEVICE = 32, None, 0, "cpu"
    cfg.BATCH_SIZE, cfg.MAX_EPOCHS, cfg.PATIENCE, cfg.VAL_PER_EPOCH = 8, 3, 100, 2
    cfg.UMAP_SAMPLES, cfg.UMAP_NEIGHBORS, cfg.CLOSE_FAR_COUNT, cfg.TRANSFER_REPEATS = 200, 5, 3, 2
    for key, value in overrides.items():
        assert hasattr(cfg, key), key
        setattr(cfg, key, value)
    return cfg


@pytest.fixture
def tiny_folder(tmp_path):
    return make_image_folder(tmp_path / "images", {"a": 16, "b": 16, "c": 16, "u": 12, "v": 12})


@pytest.fixture
def tiny_cfg(tmp_path, tiny_folder):
    return tiny_config(tmp_path, tiny_folder)


class SharedRun:
    """One whole run_all.py on the tiny folder, made once per test session and shared by the slow tests
    that read it (end to end, verify, the report in a browser). Across pytest-xdist's workers the first
    to ask makes it and the others wait. A test holds `lock` while it looks, and restores whatever it
    changes before letting go, so the next test finds the run as made."""

    def __init__(self, root: Path):
        import json

        from filelock import FileLock
        self.root, self.lock = root, FileLock(str(root.parent / f"{root.name}.lock"))
        folder = root / "images"
        self.cfg = tiny_config(root, folder)
        with self.lock:
            done = root / "times.json"
            if not done.is_file():
                import shutil

                import run_all
                shutil.rmtree(root, ignore_errors=True)
                make_image_folder(folder, {"a": 16, "b": 16, "c": 16, "u": 12, "v": 12})
                done.write_text(json.dumps(run_all.run(self.cfg)))
            self.times = json.loads(done.read_text())


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory, worker_id) -> SharedRun:
    base = tmp_path_factory.getbasetemp()
    return SharedRun((base if worker_id == "master" else base.parent) / "shared_run")


# ---- helpers ---------------------------------------------------------------------------------

PYTHON = sys.executable


def env() -> dict:
    variables = dict(os.environ)
    variables.setdefault("NUMBA_CACHE_DIR", str(REPO / "cache" / "numba"))
    variables["PYTHONUNBUFFERED"] = "1"
    variables["OMP_NUM_THREADS"] = "1"  # 2 cores, up to 3 processes at once: threads would only fight
    return variables


def script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, name, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def dir_args(tmp: Path) -> list[str]:
    """Every folder a script writes to, inside tmp (never the repository's own outputs/ or cache/)."""
    return [f"--OUTPUT_DIR={tmp / 'outputs'}", f"--CHECKPOINT_DIR={tmp / 'checkpoints'}",
            f"--CACHE_DIR={tmp / 'cache'}"]


def one_error_line(capsys, main, argv) -> str:
    """Run a script's main(argv): it must exit 1 with exactly one line on stderr, starting "error: "."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def settings_file(path: Path, **settings) -> Path:
    """configfile.py with the given settings appended (later assignments win)."""
    text = (REPO / "configfile.py").read_text() + "\n# ---- test overrides ----\n"
    text += "".join(f"{key} = {value!r}\n" for key, value in settings.items())
    path.write_text(text)
    return path


def made_up_checkpoint(path: Path, data_dir: Path, seen: list[str], unseen: list[str], image_size: int = 32) -> Path:
    """A well-formed best.pth (a small untrained resnet18-trunk model) for tests that need one to name
    the classes and data folder, without training."""
    import types

    import backbone
    import dataloader
    arch = backbone.architecture_args(len(seen), image_size, 8, 0.1, "resnet18")
    model = backbone.build_model(arch)
    split = types.SimpleNamespace(seen_classes=seen, unseen_classes=unseen, sha256="0" * 64, root=Path(data_dir),
                                  task="multiclass", labels_csv=None)
    preprocess = dataloader.Preprocess.for_trunk("resnet18", image_size, "stretch")
    fileio.save_torch(checkpoints.checkpoint_record(model, arch, preprocess, split, "random initialisation (WEIGHTS=None)",
                                                    backbone.frozen_trunk_sha256(model), {}), path)
    return path


def model_tensors(path: Path) -> dict:
    return checkpoints.open_checkpoint(path).model_state


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').close()",)


def train_killed_after_first(cfg, monkeypatch, name: str = "last.pth") -> None:
    """train.run(cfg), stopped by a KeyboardInterrupt right after its first save of `name`: a kill
    at that moment, in-process. Undoes the test's monkeypatches afterwards."""
    import train
    real_save = fileio.save_torch

    def killed_after(obj, path):
        real_save(obj, path)
        if Path(path).name == name:
            raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "save_torch", killed_after)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg)
    monkeypatch.undo()
