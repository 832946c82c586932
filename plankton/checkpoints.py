"""The self-describing checkpoint, one owner: written (checkpoint_record), opened safely
(tensors and plain values only), checked against the settings, and rebuilt into a TrainedModel
with its split and preprocessing."""
from dataclasses import dataclass
from pathlib import Path

import torch

import backbone
from dataloader import FeatureSource, Preprocess
from plankton.errors import PipelineError
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.plots import note_trunk_weights
from plankton.provenance import code_version
from plankton.splits import Split, data_root, prepare_split


def checkpoint_record(model: torch.nn.Module, arch: dict, preprocess: Preprocess, split: Split,
                      weights_source: str, trunk_sha256: str, settings: dict, **extra) -> dict:
    """A self-describing checkpoint: what a later script needs to rebuild and trust the model.
    Only tensors and plain values, so that it loads with torch.load(weights_only=True)."""
    return dict(model={k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                arch=arch, class_names=list(split.seen_classes), unseen_classes=list(split.unseen_classes),
                image_size=preprocess.image_size, resize_mode=preprocess.resize_mode,
                normalization=dict(mean=list(preprocess.mean), std=list(preprocess.std)),
                weights_source=weights_source, trunk_sha256=trunk_sha256, split_sha256=split.sha256,
                data_dir=str(split.root), task=split.task, labels_csv=split.labels_csv, config=settings,
                code_version=code_version(), **extra)


def open_checkpoint(path: Path, step_hint: str = "run train.py first") -> dict:
    """Load a checkpoint safely (tensors and plain values only) onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path} — {step_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a refused pickle, a truncated file, not a checkpoint at all
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PipelineError(f"cannot load {path} safely ({first_line}); delete it and re-run train.py")


def check_checkpoint(checkpoint: dict, cfg, path: Path) -> None:
    """The checkpoint must belong to the current settings: same classes, images and data folder."""
    redo = "restore them or re-run train.py --RESUME=False"
    task = checkpoint.get("task", "multiclass")  # checkpoints from before TASK are single-label
    if task != cfg.TASK:
        raise PipelineError(f"{path} was trained for TASK={task!r}, but the settings say TASK={cfg.TASK!r}; "
                            f"run with --TASK={task}, or re-run train.py --RESUME=False")
    trained = (list(checkpoint["class_names"]), list(checkpoint.get("unseen_classes", cfg.UNSEEN_CLASSES)))
    if trained != (list(cfg.SEEN_CLASSES), list(cfg.UNSEEN_CLASSES)):
        raise PipelineError(f"{path} was trained with seen classes {trained[0]} / unseen {trained[1]}, but the "
                            f"settings say {list(cfg.SEEN_CLASSES)} / {list(cfg.UNSEEN_CLASSES)}; {redo}")
    if checkpoint["image_size"] != cfg.IMAGE_SIZE or checkpoint["resize_mode"] != cfg.RESIZE_MODE:
        raise PipelineError(f"{path} was trained on {checkpoint['image_size']}px images ({checkpoint['resize_mode']}),"
                            f" but the settings say {cfg.IMAGE_SIZE}px ({cfg.RESIZE_MODE}); {redo}")
    trunk = checkpoint["arch"].get("trunk", backbone.DEFAULT_TRUNK)
    if trunk != getattr(cfg, "TRUNK", backbone.DEFAULT_TRUNK):
        raise PipelineError(f"{path} was trained with TRUNK={trunk!r}, but the settings say {cfg.TRUNK!r}; {redo}")
    root, labels_csv = data_root(cfg)
    if str(root) != checkpoint["data_dir"]:
        raise PipelineError(f"{path} was trained on images in {checkpoint['data_dir']}, but DATA_DIR is now "
                            f"{root}; {redo}")
    if labels_csv is not None and str(labels_csv) != checkpoint.get("labels_csv"):
        raise PipelineError(f"{path} was trained with the labels in {checkpoint.get('labels_csv')}, but LABELS_CSV "
                            f"now gives {labels_csv}; {redo}")


@dataclass
class TrainedModel:
    """The trained model with the checkpoint it came from and the split it was trained on."""
    checkpoint: dict
    sha256: str  # of the checkpoint file
    split: Split
    model: torch.nn.Module
    preprocess: Preprocess

    def source(self, subset: str, cache=None) -> FeatureSource:
        """A subset's trunk features (through `cache`, a trunk_cache.TrunkCache, if given)."""
        return self.split.source(subset, self.preprocess, cache)

    def trunk_cache(self, cfg, paths: "Paths", runtime):
        """The trunk cache of this model's frozen trunk as CACHE_TRUNK and CACHE_DTYPE ask, or None."""
        from plankton import trunk_cache  # here, not at the top: trunk_cache's users import artifacts too
        return trunk_cache.from_settings(cfg, paths.cache, self.model.trunk, self.checkpoint["trunk_sha256"],
                                         self.preprocess, runtime)


def open_trained_model(cfg, paths: Paths, device: torch.device, channels_last: bool = True) -> TrainedModel:
    """best.pth rebuilt on `device`, after every check: it exists and loads safely, it belongs to the
    current settings, and the split on disk is the one it was trained on and still matches the
    images. Image size, normalisation, classes and data folder come from the checkpoint."""
    checkpoint = open_checkpoint(paths.best)
    check_checkpoint(checkpoint, cfg, paths.best)
    split = prepare_split(paths, Path(checkpoint["data_dir"]), checkpoint["class_names"],
                          checkpoint["unseen_classes"], create=False, labels_csv=checkpoint.get("labels_csv"))
    if checkpoint["split_sha256"] != split.sha256:
        raise PipelineError(f"{paths.best} was trained on another split.csv than the one in {paths.out}; "
                            f"re-run train.py --RESUME=False")
    model = backbone.model_from_checkpoint(checkpoint, device, channels_last)
    note_trunk_weights(checkpoint["weights_source"])
    return TrainedModel(checkpoint, file_sha256(paths.best), split, model, Preprocess.from_checkpoint(checkpoint))
