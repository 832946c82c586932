"""Shared plumbing for the pipeline's scripts: settings, errors, seeds, devices, safe file writes,
checkpoints and provenance. Model code lives in backbone.py, image code in dataloader.py."""
import ast
import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO_DIR = Path(__file__).resolve().parent
TMP_MARK = ".tmp-"  # temporary files are named "<name>.tmp-<pid>" beside their target


class PipelineError(Exception):
    """An error the user can fix (wrong path, missing step, stale artifact): printed as one line."""


# ---- settings -----------------------------------------------------------------------------------

def load_config(argv: list[str] | None = None) -> types.SimpleNamespace:
    """Read configfile.py (or --config=FILE), then apply --KEY=VALUE overrides from argv."""
    argv = sys.argv[1:] if argv is None else argv
    config_path = REPO_DIR / "configfile.py"
    overrides = []
    for arg in argv:
        if arg.startswith("--config="):
            config_path = Path(arg.split("=", 1)[1])
        elif arg.startswith("--") and "=" in arg:
            overrides.append(arg[2:].split("=", 1))
        else:
            raise PipelineError(f"unknown argument {arg!r}: use --config=FILE or --KEY=VALUE")
    if not config_path.is_file():
        raise PipelineError(f"no settings file at {config_path}")
    namespace: dict = {}
    try:
        exec(compile(config_path.read_text(), str(config_path), "exec"), namespace)
    except Exception as err:  # a typo in the settings file
        raise PipelineError(f"cannot read settings file {config_path}: {type(err).__name__}: {err}")
    cfg = {k: v for k, v in namespace.items() if k.isupper()}
    for key, text in overrides:
        if key not in cfg:
            raise PipelineError(f"--{key}: no such setting in {config_path.name} (names are upper case)")
        try:
            cfg[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            cfg[key] = text  # a bare word is a string: --DEVICE=cpu
    return types.SimpleNamespace(**cfg)


def config_dict(cfg: types.SimpleNamespace) -> dict:
    """The settings as plain Python values, fit for a weights_only checkpoint and JSON."""
    return json.loads(json.dumps(vars(cfg), default=str))


def run_script(run, argv: list[str] | None = None) -> None:
    """Run a script's run(cfg); a PipelineError ends in one line on stderr and exit status 1."""
    try:
        run(load_config(argv))
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ---- reproducibility and devices -----------------------------------------------------------------

def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(setting: str) -> torch.device:
    """"auto" means CUDA when present, else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(setting).startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError(f"DEVICE={setting!r} but no CUDA device is visible; use DEVICE='auto' or 'cpu'")
    return torch.device(setting)


def num_workers(setting) -> int:
    """DataLoader workers. "auto": none on 2 cores or fewer, where the trunk's threads already keep
    every core busy and a worker process only competes with them (bench.py on the built-in data:
    embed at 0.95x the trunk limit with 0 workers, 0.82x with 1); else one per core but one, up to 8."""
    if setting == "auto":
        cores = os.cpu_count() or 1
        return 0 if cores <= 2 else min(8, cores - 1)
    return int(setting)


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---- output folders and atomic writes ------------------------------------------------------------

def output_paths(cfg) -> types.SimpleNamespace:
    """Every artifact's fixed location, derived from the settings (nothing is created here)."""
    out, ckpt, cache = Path(cfg.OUTPUT_DIR), Path(cfg.CHECKPOINT_DIR), Path(cfg.CACHE_DIR)
    return types.SimpleNamespace(
        out=out, checkpoints=ckpt, cache=cache,
        split=out / "split.csv", bad_images=out / "bad_images.csv",
        best=ckpt / "best.pth", last=ckpt / "last.pth",
        history=out / "training_history.csv", training_plot=out / "training_plot.png",
        embeddings={s: out / f"embeddings_{s}.pkl" for s in ("train", "test", "unseen")},
    )


def use_numba_cache(cache_dir: Path) -> None:
    """Keep numba's compiled code in <cache_dir>/numba; must run before numba is first imported."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str((Path(cache_dir) / "numba").resolve()))


def make_output_dirs(cfg) -> types.SimpleNamespace:
    """Create the output tree and remove temporary files that a killed run left behind."""
    paths = output_paths(cfg)
    for folder in (paths.out, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True, exist_ok=True)
        for leftover in folder.rglob(f"*{TMP_MARK}*"):
            if leftover.is_file():
                leftover.unlink(missing_ok=True)
    return paths


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path`; on success move it into place with os.replace.

    A kill at any moment leaves either the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_csv(frame, path: Path, **kwargs) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def save_json(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_ticks(ax, class_names: list[str]) -> None:
    """Class names on both axes of a class x class matrix; long names slanted so they never overlap."""
    slant = max(map(len, class_names)) > 3
    ax.set_xticks(range(len(class_names)), class_names, rotation=45 if slant else 0, ha="right" if slant else "center")
    ax.set_yticks(range(len(class_names)), class_names)


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def save_pickle(frame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_pickle(tmp, compression=None)


# ---- provenance ----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(state_dict: dict) -> str:
    """A hash of a state dict's names and values, independent of how it was stored."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: Path, step_hint: str = "run train.py first") -> dict:
    """Load a checkpoint safely (tensors and plain values only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path} — {step_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle, a truncated file, not a checkpoint at all
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load {path} safely ({first_line}); delete it and re-run train.py")


def read_embeddings(path: Path, checkpoint_sha256: str | None = None):
    """Read a pickled embeddings frame written by embed.py, checking its columns and provenance.

    Pickles run code when read, so only files inside the pipeline's own output folder are read."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no embeddings at {path} — run embed.py first")
    try:
        frame = pd.read_pickle(path)
    except Exception as err:  # truncated or not a pickle
        raise PipelineError(f"cannot read {path} ({type(err).__name__}); re-run embed.py")
    if not isinstance(frame, pd.DataFrame) or list(frame.columns[:3]) != ["label", "class_name", "path"]:
        raise PipelineError(f"{path} is not an embeddings table from embed.py; re-run embed.py")
    made_by = frame.attrs.get("checkpoint_sha256")
    if checkpoint_sha256 is not None and made_by != checkpoint_sha256:
        raise PipelineError(f"{path} was made from another checkpoint than the current "
                            f"checkpoints/best.pth — re-run embed.py")
    return frame


def save_provenance(paths, stage: str, inputs: list[Path], outputs: list[str]) -> None:
    """outputs/provenance_<stage>.json: the SHA-256 of each input a stage's tables and figures came from."""
    save_json(dict(stage=stage, code_version=code_version(), outputs=outputs,
                   inputs={str(p): sha256_file(p) for p in inputs}), paths.out / f"provenance_{stage}.json")


def embedding_columns(frame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith("e") and str(c)[1:].isdigit()]


def check_checkpoint_matches(checkpoint: dict, cfg, split_sha256: str, path) -> None:
    """The checkpoint must belong to this configuration and to the split on disk."""
    if list(checkpoint["class_names"]) != list(cfg.SEEN_CLASSES):
        raise PipelineError(f"{path} was trained on classes {checkpoint['class_names']}, but SEEN_CLASSES is "
                            f"{list(cfg.SEEN_CLASSES)}; restore SEEN_CLASSES or re-run train.py --RESUME=False")
    if checkpoint["image_size"] != cfg.IMAGE_SIZE or checkpoint["resize_mode"] != cfg.RESIZE_MODE:
        raise PipelineError(f"{path} was trained on {checkpoint['image_size']}px images ({checkpoint['resize_mode']}),"
                            f" but the settings say {cfg.IMAGE_SIZE}px ({cfg.RESIZE_MODE}); restore them or "
                            f"re-run train.py --RESUME=False")
    if checkpoint["split_sha256"] != split_sha256:
        raise PipelineError(f"{path} was trained on another split.csv than the one in {cfg.OUTPUT_DIR}; "
                            f"re-run train.py --RESUME=False")
