"""Training variants of one run side by side (seeds.py: other seeds; compare_heads.py: other head
losses): each trains with train.py in a process of its own, in a folder of its own, on a copy of the
run's split and from one saved initial trunk, so the variants differ only in what they vary."""
import shutil
import time
from pathlib import Path

import torch

from plankton import fileio, hashing, locations, runner, system, training
from plankton.errors import PipelineError


def save_initial_trunk(cfg, folder: Path, split) -> tuple[str, str, str]:
    """(path, weights source, trunk tensors' SHA-256): the trunk train.py starts from with these
    settings, saved once in `folder` (never a link) for every variant to load as WEIGHTS."""
    system.set_seed(cfg.SEED)  # as train.py: the same trunk when WEIGHTS gives none (random initialisation)
    model, _, weights_source = training.new_model(cfg, len(split.seen_classes))
    trunk = {f"trunk.{k}": v.detach().cpu().contiguous() for k, v in model.trunk.state_dict().items()}
    path = fileio.own_folder(folder) / "initial_trunk.pth"
    if not path.is_file() or hashing.tensors_sha256(torch.load(path, weights_only=True)) != hashing.tensors_sha256(trunk):
        fileio.save_torch(trunk, path)
    return str(path), weights_source, hashing.tensors_sha256(model.trunk.state_dict())


def train_variant(variant_cfg, split_path: Path, label: str) -> float:
    """train.py in its own process in the variant's folder, on a copy of the split; its printout goes
    to train_log.txt there. `label` names the variant in an error. Returns the seconds it took."""
    folder = fileio.own_folder(locations.Paths.from_settings(variant_cfg).out)
    copy = folder / "split.csv"
    if not copy.is_file() or hashing.sha256_file(copy) != hashing.sha256_file(split_path):
        with fileio.atomic_path(copy) as tmp:
            shutil.copyfile(split_path, tmp)
    started = time.time()
    try:
        runner.run_stage_process("train", variant_cfg, folder / "train_log.txt")
    except PipelineError as err:
        raise PipelineError(f"{label} ({folder}): {err}") from err
    return time.time() - started
