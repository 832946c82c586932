"""The self-describing checkpoint, one owner: the only module that knows its keys. Written
(checkpoint_record), opened safely (tensors and plain values only) and checked key by key into a
typed Checkpoint, compared with the settings, and rebuilt into a TrainedModel with its split and
preprocessing. Every other module reads a Checkpoint's attributes."""
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import backbone
from dataloader import FeatureSource, Preprocess
from plankton import orientations, tasks, training
from plankton.errors import PipelineError
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.plots import note_trunk_weights
from plankton.provenance import code_version
from plankton.splits import Split, data_root, ecotaxa_selection, prepare_split

RESIZE_MODES = ("stretch", "pad")
# what best.pth adds about the validation pass it was saved at
VALIDATION_KEYS = ("epoch", "val_loss", "val_acc", "val_map")
# what last.pth adds to resume: training.TrainingState.record's keys (that class owns their meaning)
TRAINING_KEYS = ("history", "best_val_loss", "best_epoch", "bad_passes", "finished", "stop_reason",
                 "optimizer", "rng", "scheduler", "head_loss")  # head_loss: the HEAD_LOSS module's own tensors
REDO = "delete it and re-run train.py"


def checkpoint_record(model: torch.nn.Module, arch: dict, preprocess: Preprocess, split: Split,
                      weights_source: str, trunk_sha256: str, settings: dict, **extra) -> dict:
    """A self-describing checkpoint: what a later script needs to rebuild and trust the model.
    Only tensors and plain values, so that it loads with torch.load(weights_only=True). `extra`:
    VALIDATION_KEYS for best.pth, TRAINING_KEYS (and "epoch") for last.pth."""
    unknown = set(extra) - set(VALIDATION_KEYS) - set(TRAINING_KEYS)
    if unknown:  # a programming error, not a user's: every key must be one Checkpoint reads back
        raise ValueError(f"checkpoint_record: unknown keys {sorted(unknown)}")
    return dict(model={k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                arch=arch, class_names=list(split.seen_classes), unseen_classes=list(split.unseen_classes),
                image_size=preprocess.image_size, resize_mode=preprocess.resize_mode,
                normalization=dict(mean=list(preprocess.mean), std=list(preprocess.std)),
                weights_source=weights_source, trunk_sha256=trunk_sha256, split_sha256=split.sha256,
                data_dir=str(split.root), task=split.task, labels_csv=split.labels_csv, config=settings,
                code_version=code_version(), **extra)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file's contents, each checked for type and range when it was opened."""
    path: Path
    model_state: dict  # name -> tensor
    arch: dict  # backbone.architecture_args
    class_names: tuple[str, ...]  # the seen classes, in the classifier's order
    unseen_classes: tuple[str, ...]
    preprocess: Preprocess
    weights_source: str
    trunk_sha256: str  # of the frozen blocks the trunk cache serves (backbone.frozen_trunk_sha256)
    split_sha256: str
    data_dir: str
    task: str
    labels_csv: str | None
    config: dict  # the settings it was trained with, as plain JSON values
    code_version: str
    epoch: float | None = None  # best.pth: the validation pass it was saved at; last.pth: the last epoch
    val_loss: float | None = None
    val_acc: float | None = None
    val_map: float | None = None
    training: dict = field(default_factory=dict)  # last.pth: TRAINING_KEYS

    @property
    def trunk(self) -> str:
        return self.arch["trunk"]

    @property
    def seed(self) -> int:
        return int(self.config.get("SEED") or 0)

    @property
    def finished(self) -> bool:
        return bool(self.training.get("finished"))

    def build_model(self, device: torch.device | None = None, channels_last: bool = False) -> torch.nn.Module:
        """The model as trained; on `device` in eval mode when one is given. Tensors that do not fit
        the recorded architecture are one error naming the file, not a traceback."""
        model = backbone.build_model(self.arch)
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as err:  # missing or unexpected tensors, or a wrong shape
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            raise PipelineError(f"{self.path}: its model tensors do not fit its architecture "
                                f"({'; '.join(lines[1:3]) or lines[0]}); {REDO}")
        if device is not None:
            model.to(device).eval()
            if channels_last:
                backbone.to_channels_last(model)
        return model


# ---- reading: every key checked, each failure one line naming the file ---------------------------

class _Checker:
    """Checks one checkpoint's values; `bad` raises the one error line."""

    def __init__(self, raw: dict, path: Path):
        self.raw, self.path = raw, path

    def bad(self, what: str):
        raise PipelineError(f"{self.path} is not a checkpoint this pipeline can use: {what}; {REDO}")

    def text(self, key: str, default=..., none_ok: bool = False) -> str | None:
        value = self.raw.get(key, default)
        if value is ...:
            self.bad(f"it has no {key!r}")
        if value is None and none_ok:
            return None
        if not isinstance(value, str):
            self.bad(f"{key!r} is a {type(value).__name__}, not text")
        return value

    def names(self, key: str, default=..., empty_ok: bool = True) -> tuple[str, ...]:
        value = self.raw.get(key, default)
        if value is ...:
            self.bad(f"it has no {key!r}")
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            self.bad(f"{key!r} is not a list of names")
        if len(set(value)) != len(value) or (not value and not empty_ok):
            self.bad(f"{key!r} {'repeats a name' if value else 'is empty'}")
        return tuple(value)

    def number(self, key: str, value=..., integer: bool = False, positive: bool = False, finite: bool = True,
               none_ok: bool = False):
        value = self.raw.get(key) if value is ... else value
        if value is None and none_ok:
            return None
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.bad(f"{key!r} is {value!r}, not {'a whole number' if integer else 'a number'}")
        if (finite and not math.isfinite(value)) or (positive and not value > 0):
            self.bad(f"{key!r} is {value!r}")
        return value

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        norm = self.raw.get("normalization")
        if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
            self.bad("'normalization' is not {'mean': [...], 'std': [...]}")
        out = []
        for key in ("mean", "std"):
            values = norm[key]
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                self.bad(f"normalization {key!r} is not three numbers (R, G, B)")
            out.append(tuple(float(self.number(f"normalization {key}", v, positive=key == "std")) for v in values))
        return out[0], out[1]

    def tensors(self) -> dict:
        state = self.raw.get("model")
        if not isinstance(state, dict) or not state:
            self.bad("'model' is not a dict of tensors")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                self.bad(f"'model' entry {name!r} is not a named tensor")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                self.bad(f"'model' tensor {name!r} holds NaN or infinite values")
        return state

    def arch(self, classes: int) -> dict:
        arch = self.raw.get("arch")
        if not isinstance(arch, dict):
            self.bad("'arch' is not a dict")
        unknown = set(arch) - {"num_classes", "image_size", "embedding_dim", "dropout", "trunk", "finetune_blocks"}
        if unknown:
            self.bad(f"'arch' holds keys train.py never writes ({', '.join(sorted(map(str, unknown)))})")
        arch = {"trunk": backbone.DEFAULT_TRUNK, "finetune_blocks": 0, **arch}  # older checkpoints lack these
        if arch["trunk"] not in backbone.TRUNKS:
            self.bad(f"its trunk {arch['trunk']!r} is not one of {', '.join(backbone.TRUNKS)}")
        for key in ("num_classes", "image_size", "embedding_dim"):
            self.number(f"arch {key}", arch.get(key), integer=True, positive=True)
        self.number("arch finetune_blocks", arch["finetune_blocks"], integer=True)
        dropout = self.number("arch dropout", arch.get("dropout"))
        if not 0 <= dropout < 1 or arch["finetune_blocks"] < 0:
            self.bad(f"'arch' is out of range ({arch})")
        if arch["num_classes"] != classes:
            self.bad(f"its classifier has {arch['num_classes']} outputs for {classes} class names")
        return arch


CHECKPOINT_KEYS = ("model", "arch", "class_names", "unseen_classes", "image_size", "resize_mode", "normalization",
                   "weights_source", "trunk_sha256", "split_sha256", "data_dir", "task", "labels_csv", "config",
                   "code_version") + VALIDATION_KEYS + TRAINING_KEYS


def checkpoint_from_record(raw, path: Path) -> Checkpoint:
    """A loaded checkpoint's values checked one by one. Checkpoints from before TASK, LABELS_CSV or
    unseen classes were recorded get the values they were made with."""
    check = _Checker(raw, path)
    if not isinstance(raw, dict):
        check.bad(f"it holds a {type(raw).__name__}, not a dict")
    unknown = [str(key) for key in raw if key not in CHECKPOINT_KEYS]
    if unknown:
        check.bad(f"it holds keys train.py never writes ({', '.join(sorted(unknown))})")
    class_names = check.names("class_names", empty_ok=False)
    unseen = check.names("unseen_classes", default=[])
    if set(class_names) & set(unseen):
        check.bad("a class is both seen and unseen")
    image_size = check.number("image_size", integer=True, positive=True)
    resize_mode = check.text("resize_mode")
    if resize_mode not in RESIZE_MODES:
        check.bad(f"'resize_mode' is {resize_mode!r}, not one of {', '.join(RESIZE_MODES)}")
    task = check.text("task", default="multiclass")
    if task not in tasks.ALL_TASKS:
        check.bad(f"'task' is {task!r}, not one of {', '.join(tasks.ALL_TASKS)}")
    arch = check.arch(len(class_names))
    if arch["image_size"] != image_size:
        check.bad(f"'arch' says {arch['image_size']}px images, the checkpoint {image_size}px")
    config = raw.get("config")
    if not isinstance(config, dict):
        check.bad("'config' is not a dict of settings")
    for key in ("trunk_sha256", "split_sha256"):
        digest = check.text(key)
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            check.bad(f"{key!r} is not a SHA-256")
    training = {key: raw[key] for key in TRAINING_KEYS if key in raw}
    if not isinstance(training.get("history", []), list) or not isinstance(training.get("finished", False), bool):
        check.bad("its training state ('history', 'finished') is malformed")
    head_loss = training.get("head_loss", {})
    if not isinstance(head_loss, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  and bool(torch.isfinite(v).all()) for k, v in head_loss.items()):
        check.bad("'head_loss' is not a dict of finite tensors")
    return Checkpoint(
        path=Path(path), model_state=check.tensors(), arch=arch, class_names=class_names, unseen_classes=unseen,
        preprocess=Preprocess(int(image_size), resize_mode, *check.normalization()),
        weights_source=check.text("weights_source", default="unknown (not recorded)"),
        trunk_sha256=raw["trunk_sha256"], split_sha256=raw["split_sha256"], data_dir=check.text("data_dir"),
        task=task, labels_csv=check.text("labels_csv", default=None, none_ok=True), config=config,
        code_version=check.text("code_version", default="unknown"),
        epoch=check.number("epoch", none_ok=True), val_loss=check.number("val_loss", none_ok=True),
        val_acc=check.number("val_acc", none_ok=True, finite=False),
        val_map=check.number("val_map", none_ok=True, finite=False), training=training)


def load_checkpoint_file(path: Path, step_hint: str = "run train.py first"):
    """What a checkpoint file holds, loaded safely (tensors and plain values only) onto the CPU,
    unchecked: for code that inspects the file itself. Everything else uses open_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path} — {step_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle, a truncated file, not a checkpoint at all
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load {path} safely ({first_line}); {REDO}")


def open_checkpoint(path: Path, step_hint: str = "run train.py first") -> Checkpoint:
    """A checkpoint file loaded safely and checked key by key."""
    return checkpoint_from_record(load_checkpoint_file(path, step_hint), Path(path))


def check_checkpoint(checkpoint: Checkpoint, cfg) -> None:
    """The checkpoint must belong to the current settings: same classes, images and data folder."""
    path, redo = checkpoint.path, "restore them or re-run train.py --RESUME=False"
    if checkpoint.task != cfg.TASK:
        raise PipelineError(f"{path} was trained for TASK={checkpoint.task!r}, but the settings say TASK={cfg.TASK!r}; "
                            f"run with --TASK={checkpoint.task}, or re-run train.py --RESUME=False")
    trained = (list(checkpoint.class_names), list(checkpoint.unseen_classes))
    if trained != (list(cfg.SEEN_CLASSES), list(cfg.UNSEEN_CLASSES)):
        raise PipelineError(f"{path} was trained with seen classes {trained[0]} / unseen {trained[1]}, but the "
                            f"settings say {list(cfg.SEEN_CLASSES)} / {list(cfg.UNSEEN_CLASSES)}; {redo}")
    preprocess = checkpoint.preprocess
    if preprocess.image_size != cfg.IMAGE_SIZE or preprocess.resize_mode != cfg.RESIZE_MODE:
        raise PipelineError(f"{path} was trained on {preprocess.image_size}px images ({preprocess.resize_mode}),"
                            f" but the settings say {cfg.IMAGE_SIZE}px ({cfg.RESIZE_MODE}); {redo}")
    if checkpoint.trunk != getattr(cfg, "TRUNK", backbone.DEFAULT_TRUNK):
        raise PipelineError(f"{path} was trained with TRUNK={checkpoint.trunk!r}, but the settings say "
                            f"{cfg.TRUNK!r}; {redo}")
    trained_on, now = checkpoint.config.get("ECOTAXA_EXPORT"), getattr(cfg, "ECOTAXA_EXPORT", None)
    if (trained_on is None) != (now is None):  # the same folder read as class folders or as an export's objects
        raise PipelineError(f"{path} was trained with ECOTAXA_EXPORT={trained_on!r}, but the settings say "
                            f"ECOTAXA_EXPORT={now!r}; {redo}")
    root, labels_csv = data_root(cfg)
    if str(root) != checkpoint.data_dir:
        raise PipelineError(f"{path} was trained on images in {checkpoint.data_dir}, but DATA_DIR is now "
                            f"{root}; {redo}")
    if labels_csv is not None and str(labels_csv) != checkpoint.labels_csv:
        raise PipelineError(f"{path} was trained with the labels in {checkpoint.labels_csv}, but LABELS_CSV "
                            f"now gives {labels_csv}; {redo}")


@dataclass
class TrainedModel:
    """The trained model with the checkpoint it came from and the split it was trained on."""
    checkpoint: Checkpoint
    sha256: str  # of the checkpoint file
    split: Split | None  # None: rebuilt from a model bundle (bundles.py), which brings no split
    model: torch.nn.Module
    preprocess: Preprocess
    orientations: tuple[int, ...] = (0,)  # averaged over by outputs() (TTA, plankton/orientations.py)

    @property
    def class_names(self) -> list[str]:
        return list(self.checkpoint.class_names)

    def source(self, subset: str, cache=None, orientation: int = 0) -> FeatureSource:
        """A subset's trunk features (through `cache`, a trunk_cache.TrunkCache, if given), each image
        in `orientation`."""
        return self.split.source(subset, self.preprocess, cache, orientation=orientation)

    def outputs(self, subset: str, cache, runtime) -> tuple:
        """(logits, embeddings, labels) of a subset of the split, in its order: the head's outputs
        averaged over the orientations TTA asks for (one pass when TTA="none")."""
        logits, embeddings = orientations.averaged(
            lambda o: training.head_outputs(self.model, self.source(subset, cache, o), runtime), self.orientations)
        return logits, embeddings, np.asarray(self.split.subset(subset)[1], dtype=np.int64)

    def trunk_cache(self, cfg, paths: "Paths", runtime):
        """The trunk cache of this model's frozen trunk as CACHE_TRUNK and CACHE_DTYPE ask, or None."""
        from plankton import trunk_cache  # here, not at the top: trunk_cache's users import artifacts too
        return trunk_cache.from_settings(cfg, paths.cache, self.model.trunk, self.checkpoint.trunk_sha256,
                                         self.preprocess, runtime)


def open_trained_model(cfg, paths: Paths, device: torch.device, channels_last: bool = True) -> TrainedModel:
    """best.pth rebuilt on `device`, after every check: it exists, loads safely and holds what
    train.py writes; it belongs to the current settings; its trunk's weights are those its recorded
    hash (and so the trunk cache) stands for; and the split on disk is the one it was trained on and
    still matches the images. Image size, normalisation, classes and data folder come from it."""
    checkpoint = open_checkpoint(paths.best)
    check_checkpoint(checkpoint, cfg)
    split = prepare_split(paths, Path(checkpoint.data_dir), list(checkpoint.class_names),
                          list(checkpoint.unseen_classes), create=False, labels_csv=checkpoint.labels_csv,
                          export=ecotaxa_selection(cfg))
    if checkpoint.split_sha256 != split.sha256:
        raise PipelineError(f"{paths.best} was trained on another split.csv than the one in {paths.out}; "
                            f"re-run train.py --RESUME=False")
    model = checkpoint.build_model(device, channels_last)
    if backbone.frozen_trunk_sha256(model) != checkpoint.trunk_sha256:
        raise PipelineError(f"{paths.best}: its trunk weights are not the ones its recorded trunk_sha256 stands for "
                            f"(changed after training?); {REDO}")
    note_trunk_weights(checkpoint.weights_source)
    return TrainedModel(checkpoint, file_sha256(paths.best), split, model, checkpoint.preprocess,
                        orientations.TTA[cfg.TTA])
