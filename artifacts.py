"""The hand-offs between scripts, each with one owner: where every artifact lives (Paths), the
persisted split, the self-describing checkpoint, the embeddings tables and the provenance records.
Each is written, opened and checked here and nowhere else.

    split.csv                 relpath, class_name, subset (train/val/test/unseen), sha256; drawn once
                              (multilabel: relpath, labels, subset, sha256; see labelsets.py)
    checkpoints/best.pth      model + everything needed to rebuild and trust it (see checkpoint_record)
    embeddings_<subset>.pkl   pickled DataFrame: label, class_name, path, [labels,] e0..e<d-1>; attrs = provenance
    test_scores.npz           logits and softmax scores (float32) of every test image, labels, paths, classes,
                              the checkpoint's SHA-256 (see save_predictions); test_predictions.csv (and
                              .parquet, same columns) beside it
    provenance_<stage>.json   SHA-256 of every file a stage wrote and of its inputs; written last, so a
                              stage's outputs without it are incomplete (see start_stage, stale_outputs)
"""
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import backbone
import distributed
import images
import labelsets
import safepickle
from common import (PipelineError, atomic_path, code_version, note_trunk_weights, package_versions,
                    remove_abandoned_temporaries, save_csv, save_json, sha256_file)
from dataloader import FeatureSource, Preprocess, feature_source

SUBSETS = ("train", "val", "test")
EMBEDDED_SUBSETS = ("train", "test", "unseen")
META_COLUMNS = ["label", "class_name", "path"]
EMBEDDING_PREFIX = "e"


@dataclass(frozen=True)
class Paths:
    """Every artifact's fixed location (nothing is created by building this)."""
    out: Path
    checkpoints: Path
    cache: Path

    @classmethod
    def from_settings(cls, cfg) -> "Paths":
        return cls(Path(cfg.OUTPUT_DIR), Path(cfg.CHECKPOINT_DIR), Path(cfg.CACHE_DIR))

    split = property(lambda self: self.out / "split.csv")
    bad_images = property(lambda self: self.out / "bad_images.csv")
    best = property(lambda self: self.checkpoints / "best.pth")
    last = property(lambda self: self.checkpoints / "last.pth")
    history = property(lambda self: self.out / "training_history.csv")
    training_plot = property(lambda self: self.out / "training_plot.png")
    model_summary = property(lambda self: self.out / "model_summary.txt")
    predictions = property(lambda self: self.out / "test_predictions.csv")
    scores = property(lambda self: self.out / "test_scores.npz")
    classwise_accuracy_plot = property(lambda self: self.out / "training_classwise_accuracy.png")
    classwise_ap_plot = property(lambda self: self.out / "training_classwise_ap.png")
    seeds = property(lambda self: self.out / "seeds")  # seeds.py: seed_<n>/ folders
    predictions_dir = property(lambda self: self.out / "predictions")  # predict.py: new images' predictions
    umap_coordinates = property(lambda self: self.out / "umap_coordinates.csv")  # dimensionality_reduction.py
    leaks_summary = property(lambda self: self.out / "leaks_summary.json")  # leaks.py: counts beside evaluate's

    def embeddings(self, subset: str) -> Path:
        return self.out / f"embeddings_{subset}.pkl"

    def scan_cache(self, root: Path) -> Path:
        import hashlib
        return self.cache / f"scan_{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.csv"


def prepare_output_dirs(cfg) -> Paths:
    """Create the output tree and remove the temporary files of killed runs (never a running one's;
    under torchrun only rank 0 looks, as another node cannot tell whether a process is alive)."""
    paths = Paths.from_settings(cfg)
    for folder in (paths.out, paths.checkpoints, paths.cache):
        folder.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            remove_abandoned_temporaries(folder)
    return paths


# ---- the split -----------------------------------------------------------------------------------

@dataclass
class Split:
    root: Path
    table: pd.DataFrame  # relpath, class_name, subset, sha256 (of the image file); multilabel: labels for class_name
    seen_classes: list[str]
    unseen_classes: list[str]
    sha256: str
    labels_csv: str | None = None  # the labels CSV of a multi-label split; None: single-label

    @property
    def task(self) -> str:
        return "multiclass" if self.labels_csv is None else "multilabel"

    def subset(self, name: str) -> tuple[list[str], np.ndarray]:
        """Relative paths and targets of train/val/test (seen) or unseen: label indices, or for a
        multi-label split a multi-hot matrix over the subset's classes (seen, or unseen)."""
        part = self.table[self.table.subset == name]
        classes = self.unseen_classes if name == "unseen" else self.seen_classes
        if self.labels_csv is not None:
            return list(part.relpath), labelsets.multi_hot(list(part.labels), classes)
        index = {c: i for i, c in enumerate(classes)}
        return list(part.relpath), np.array([index[c] for c in part.class_name], dtype=np.int64)

    def label_counts(self, classes: list[str]) -> np.ndarray:
        """Images of the whole split carrying each of `classes` (multi-label splits)."""
        return labelsets.multi_hot(list(self.table.labels), classes).sum(0)

    def label_texts(self, name: str) -> list[str] | None:
        """Each image's whole label set ("1;3;5") of a multi-label split, in subset order; None if single-label."""
        return None if self.labels_csv is None else list(self.table[self.table.subset == name].labels)

    def hashes(self, name: str) -> list[str]:
        """SHA-256 of each image file of a subset, in the order of subset(name)."""
        return list(self.table[self.table.subset == name].sha256)

    def classes(self, name: str) -> list[str]:
        return self.unseen_classes if name == "unseen" else self.seen_classes

    def source(self, name: str, preprocess: Preprocess, cache=None, augment: bool = False,
               color_jitter: float = 0.0) -> FeatureSource:
        """A subset's trunk features: from `cache` (a trunk_cache.TrunkCache), which names each image
        by its content's SHA-256, or from the images themselves (augmented if asked)."""
        relpaths, labels = self.subset(name)
        return feature_source(self.root, relpaths, labels, preprocess, cache, augment, keys=self.hashes(name),
                              color_jitter=color_jitter)


def prepare_split(paths: Paths, root: Path, seen: list[str], unseen: list[str], create: bool,
                  bad_images: str = "skip", val_fraction: float = 0.05, test_fraction: float = 0.2,
                  seed: int = 0, labels_csv: Path | None = None) -> Split:
    """Find and check the images, then draw the split (create=True) or verify the persisted one.
    With a labels_csv, the images and label sets are those of the labels CSV (labelsets.py).

    A split that no longer matches the usable images on disk (added, removed or modified, by
    content) stops the run: re-drawing it silently could move test images into training."""
    seen, unseen = list(seen), list(unseen)
    if labels_csv is not None:
        found, hashes = labelsets.usable_label_sets(root, Path(labels_csv), seen, unseen, paths.scan_cache(root),
                                                    paths.bad_images, bad_images)
        if create:
            labelsets.print_label_counts(found, seen, unseen)
        check = lambda table: labelsets.check_split(table, found, hashes, seen, unseen, paths.split)  # noqa: E731
        draw = lambda: labelsets.draw_split(found, unseen, hashes, val_fraction, test_fraction, seed)  # noqa: E731
    else:
        usable, hashes = images.usable_images(root, seen, unseen, paths.scan_cache(root), paths.bad_images,
                                              bad_images)
        if create:  # train.py reports the data; later scripts only check it
            images.print_class_counts("Seen classes", seen, {c: len(usable[c]) for c in seen})
            images.print_class_counts("Unseen classes", unseen, {c: len(usable[c]) for c in unseen})
        check = lambda table: _check_split_matches(table, usable, hashes, seen, unseen, paths.split)  # noqa: E731
        draw = lambda: images.draw_split({c: usable[c] for c in seen}, {c: usable[c] for c in unseen},  # noqa: E731
                                         hashes, val_fraction, test_fraction, seed)
    if paths.split.is_file():
        try:
            table = pd.read_csv(paths.split, dtype=str, keep_default_na=False).fillna("")
        except ValueError as err:  # not CSV, not UTF-8, empty, ragged rows
            raise PipelineError(f"cannot read {paths.split} ({str(err).strip().splitlines()[0]}); restore it, "
                                f"or delete it and the checkpoints to re-split and retrain")
        check(table)
    elif not create:
        raise PipelineError(f"no split file at {paths.split} — run train.py first")
    else:
        table = draw()
        save_csv(table, paths.split, index=False)
        print(f"split drawn and saved to {paths.split}")
    counts = table.subset.value_counts()
    print("split: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SUBSETS + ("unseen",)) + " images")
    return Split(root, table, seen, unseen, sha256_file(paths.split), None if labels_csv is None else str(labels_csv))


def data_root(cfg) -> tuple[Path, Path | None]:
    """(image folder, labels CSV) for the settings: DATA_DIR or the built-in digits (multiclass) or
    digit mosaics (multilabel); the labels CSV is None for a single-label run."""
    if cfg.TASK == "multilabel":
        root = labelsets.data_dir(cfg.DATA_DIR, cfg.BUILTIN_MULTILABEL_DIR)
        return root, labelsets.labels_csv_path(cfg.LABELS_CSV, root)
    return images.data_dir(cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR), None


def split_from_settings(cfg, paths: Paths, create: bool) -> Split:
    """The split for the settings' data folder and classes (train.py), drawn with SPLIT_SEED (None: SEED)."""
    root, labels_csv = data_root(cfg)
    split_seed = cfg.SEED if cfg.SPLIT_SEED is None else cfg.SPLIT_SEED
    return prepare_split(paths, root, cfg.SEEN_CLASSES, cfg.UNSEEN_CLASSES, create, cfg.BAD_IMAGES,
                         cfg.VAL_FRACTION, cfg.TEST_FRACTION, split_seed, labels_csv)


def _check_split_matches(table, usable, hashes, seen_names, unseen_names, split_path) -> None:
    """split.csv is checked before it is trusted (columns, subsets, one row per image, classes),
    then against the usable images on disk: none added, removed or modified (by SHA-256)."""
    fix = (f"set OUTPUT_DIR and CHECKPOINT_DIR to new folders for a new run, or delete {split_path} "
           f"and checkpoints to re-split and retrain")
    restore = f"restore {split_path}, or delete it and the checkpoints to re-split and retrain"
    if list(table.columns) == images.SPLIT_COLUMNS[:-1]:
        raise PipelineError(f"{split_path} predates content fingerprints (no sha256 column), so a replaced image "
                            f"would go unnoticed; {fix}")
    if list(table.columns) != images.SPLIT_COLUMNS:
        raise PipelineError(f"{split_path} has columns {list(table.columns)}, not {images.SPLIT_COLUMNS}; {restore}")
    folder = table.relpath.map(lambda p: (Path(p).parts or ("",))[0])
    row_checks = [
        (~table.subset.isin(SUBSETS + ("unseen",)), lambda r: f"subset {r.subset!r} is not train, val, test or unseen"),
        (table.relpath.duplicated(), lambda r: "the image is listed a second time"),
        (table.class_name != folder, lambda r: f"class_name {r.class_name!r} is not the image's folder"),
        (~table.sha256.str.fullmatch("[0-9a-f]{64}"), lambda r: f"sha256 {r.sha256!r} is not a SHA-256"),
        (table.class_name.isin(table.class_name[table.subset == "unseen"]) & (table.subset != "unseen"),
         lambda r: f"class {r.class_name!r} is also in 'unseen'; an unseen class has only 'unseen' images")]
    for failed, problem in row_checks:
        if failed.any():
            i = int(np.flatnonzero(failed.to_numpy())[0])
            row = table.iloc[i]
            raise PipelineError(f"{split_path} line {i + 2} ({row.relpath!r}): {problem(row)}; {restore}")
    split_seen = list(dict.fromkeys(table.class_name[table.subset != "unseen"]))
    split_unseen = list(dict.fromkeys(table.class_name[table.subset == "unseen"]))
    subsets_of = table.groupby("class_name", sort=False).subset.agg(set)
    for name in split_seen:
        missing = [s for s in SUBSETS if s not in subsets_of[name]]
        if missing:
            raise PipelineError(f"{split_path}: seen class {name!r} has no {'/'.join(missing)} image; {restore}")
    if split_seen != seen_names or split_unseen != unseen_names:
        raise PipelineError(f"{split_path} was drawn for seen {split_seen} / unseen {split_unseen}, "
                            f"but the settings now say {seen_names} / {unseen_names}; {fix}")
    on_disk = {f for files in usable.values() for f in files}
    in_split = dict(zip(table.relpath, table.sha256))
    added, removed = sorted(on_disk - in_split.keys()), sorted(in_split.keys() - on_disk)
    modified = sorted(f for f in on_disk & in_split.keys() if hashes[f] != in_split[f])
    if added or removed or modified:
        example = next(f"{files[0]!r} ({kind})" for files, kind in
                       ((modified, "modified"), (added, "added"), (removed, "removed")) if files)
        raise PipelineError(f"the images changed since {split_path} was drawn ({len(added)} added, "
                            f"{len(removed)} removed or unreadable, {len(modified)} modified, e.g. {example}); {fix}")


# ---- the checkpoint ------------------------------------------------------------------------------

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
        import trunk_cache  # here, not at the top: trunk_cache's users import artifacts too
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


# ---- embeddings ----------------------------------------------------------------------------------

def embeddings_frame(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                     relpaths: list[str], attrs: dict, label_texts: list[str] | None = None,
                     label_counts: np.ndarray | None = None) -> pd.DataFrame:
    """label, class_name, path, e0..e<d-1> (float32); attrs record where the numbers came from.
    Multi-label (`labels` a multi-hot matrix, `label_texts` each image's whole label set): label and
    class_name are the image's rarest label among `class_names` (fewest images of the split carry it:
    `label_counts`), and a `labels` column after path
    holds its whole set ("1;3;5", seen labels of a held-out image included)."""
    columns = [f"{EMBEDDING_PREFIX}{i}" for i in range(embeddings.shape[1])]
    frame = pd.DataFrame(embeddings.astype(np.float32), columns=columns)
    if label_texts is not None:
        frame.insert(0, "labels", list(label_texts))
        labels = labelsets.rarest_labels(labels, label_counts)
    frame.insert(0, "path", relpaths)
    frame.insert(0, "class_name", [class_names[i] for i in labels])
    frame.insert(0, "label", labels.astype(np.int64))
    frame.attrs.update(attrs)
    return frame


def save_embeddings(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        safepickle.save_dataframe(frame, tmp)  # in the form safepickle.load_dataframe reads back


def export_table(frame: pd.DataFrame, path: Path, csv: bool = False) -> list[Path]:
    """A table also for tools outside Python: <path>.parquet always (with pyarrow; frame.attrs go into
    its metadata), <path>.csv too when asked. Returns the files written."""
    written = [path.with_suffix(".parquet")]
    with atomic_path(written[0]) as tmp:
        frame.to_parquet(tmp, index=False)
    if csv:
        written.append(path.with_suffix(".csv"))
        save_csv(frame, written[1], index=False)
    return written


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(EMBEDDING_PREFIX) and str(c)[1:].isdigit()]


def embedding_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame[embedding_columns(frame)].to_numpy()


def open_embeddings(paths: Paths, subset: str) -> pd.DataFrame:
    """One subset's embeddings, refused unless they were made from the current best.pth."""
    if not paths.best.is_file():
        raise PipelineError(f"no checkpoint at {paths.best} — run train.py first")
    path = paths.embeddings(subset)
    if not path.is_file():
        raise PipelineError(f"no embeddings at {path} — run embed.py first")
    try:
        frame = safepickle.load_dataframe(path)  # never runs code from the file
    except safepickle.UnsafePickle as err:  # crafted, truncated or not a pickle; the message names the file
        raise PipelineError(f"refused to read {err}; re-run embed.py")
    if not isinstance(frame, pd.DataFrame) or list(frame.columns[:3]) != META_COLUMNS:
        raise PipelineError(f"{path} is not an embeddings table from embed.py; re-run embed.py")
    if frame.attrs.get("checkpoint_sha256") != file_sha256(paths.best):
        raise PipelineError(f"{path} was made from another checkpoint than the current {paths.best} — "
                            f"re-run embed.py")
    note_trunk_weights(frame.attrs.get("weights_source", "unknown (not recorded)"))
    return frame


# ---- test predictions ----------------------------------------------------------------------------

@dataclass
class Predictions:
    """Every test image's logits and softmax scores, in the split's test order, and where they came from."""
    logits: np.ndarray  # float32, images x classes
    scores: np.ndarray  # float32 softmax of the logits
    labels: np.ndarray  # int64 true class index
    relpaths: list[str]
    class_names: list[str]
    data_dir: str
    checkpoint_sha256: str
    task: str = "multiclass"  # "multilabel": labels is a multi-hot matrix, scores are sigmoids

    @property
    def predicted(self) -> np.ndarray:
        """The arg-max class index of each image, or (multilabel) a 0/1 matrix: score >= 0.5."""
        return self.logits.argmax(1) if self.task == "multiclass" else (self.logits >= 0).astype(np.int64)


PREDICTION_ARRAYS = ("logits", "scores", "labels", "relpaths", "class_names", "data_dir", "checkpoint_sha256")


def save_predictions(paths: Paths, predictions: Predictions) -> list[Path]:
    """test_scores.npz (exact, for reuse) and test_predictions.csv (path, true_class, predicted_class,
    score_<class> for each class; multilabel: path, true_labels, predicted_labels (score >= 0.5,
    joined by ";"), score_<label>) with its .parquet copy, each written atomically. Returns the paths."""
    p = predictions
    arrays = dict(logits=p.logits.astype(np.float32), scores=p.scores.astype(np.float32),
                  labels=p.labels.astype(np.int64), relpaths=np.array(p.relpaths, dtype=str),
                  class_names=np.array(p.class_names, dtype=str), data_dir=np.array(p.data_dir),
                  checkpoint_sha256=np.array(p.checkpoint_sha256))
    if p.task != "multiclass":  # a single-label file stays as it was before TASK
        arrays["task"] = np.array(p.task)
    with atomic_path(paths.scores) as tmp, open(tmp, "wb") as handle:  # a handle: savez adds no ".npz"
        np.savez(handle, **arrays)
    if p.task == "multiclass":
        table = pd.DataFrame(dict(path=p.relpaths, true_class=[p.class_names[i] for i in p.labels],
                                  predicted_class=[p.class_names[i] for i in p.predicted]))
    else:
        def joined(matrix):
            return [labelsets.LABEL_SEPARATOR.join(np.asarray(p.class_names)[row > 0]) for row in matrix]
        table = pd.DataFrame(dict(path=p.relpaths, true_labels=joined(p.labels), predicted_labels=joined(p.predicted)))
    for i, name in enumerate(p.class_names):
        table[f"score_{name}"] = p.scores[:, i]
    save_csv(table, paths.predictions, index=False)
    return [paths.predictions, paths.scores] + export_table(table, paths.predictions)  # + .parquet


def open_predictions(paths: Paths) -> Predictions:
    """The saved test predictions, refused unless made from the current best.pth."""
    if not paths.best.is_file():
        raise PipelineError(f"no checkpoint at {paths.best} — run train.py first")
    if not paths.scores.is_file():
        raise PipelineError(f"no test predictions at {paths.scores} — run evaluate.py first")
    try:
        with np.load(paths.scores, allow_pickle=False) as stored:  # arrays only, never code
            arrays = {name: stored[name] for name in PREDICTION_ARRAYS}
            task = str(stored["task"]) if "task" in stored.files else "multiclass"
    except (OSError, ValueError, KeyError, EOFError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"cannot read {paths.scores} ({first_line}); re-run evaluate.py")
    predictions = Predictions(arrays["logits"], arrays["scores"], arrays["labels"], arrays["relpaths"].tolist(),
                              arrays["class_names"].tolist(), str(arrays["data_dir"]),
                              str(arrays["checkpoint_sha256"]), task)
    n, k = len(predictions.relpaths), len(predictions.class_names)
    label_shape = (n,) if task == "multiclass" else (n, k)
    if predictions.logits.shape != (n, k) or predictions.scores.shape != (n, k) or predictions.labels.shape != label_shape:
        raise PipelineError(f"{paths.scores} holds arrays of mismatched shapes; re-run evaluate.py")
    if predictions.checkpoint_sha256 != file_sha256(paths.best):
        raise PipelineError(f"{paths.scores} was made from another checkpoint than the current {paths.best} — "
                            f"re-run evaluate.py")
    note_trunk_weights(open_checkpoint(paths.best).get("weights_source", "unknown (not recorded)"))
    return predictions


# ---- UMAP coordinates ----------------------------------------------------------------------------

UMAP_COLUMNS = ["label", "class_name", "path", "subset", "x", "y"]


def open_umap_coordinates(paths: Paths) -> pd.DataFrame:
    """umap_coordinates.csv, refused unless dimensionality_reduction.py's provenance vouches for it
    (written by the recorded run, from the current best.pth and embeddings)."""
    path = paths.umap_coordinates
    if not path.is_file():
        raise PipelineError(f"no UMAP coordinates at {path} — run dimensionality_reduction.py first")
    if str(path) in stale_outputs(paths, "dimensionality_reduction"):
        raise PipelineError(f"{path} was not made from the current checkpoint and embeddings (or its provenance "
                            f"record is missing) — re-run dimensionality_reduction.py")
    try:
        coords = pd.read_csv(path, dtype={"path": str, "class_name": str, "subset": str}, keep_default_na=False)
    except ValueError as err:
        raise PipelineError(f"cannot read {path} ({str(err).strip().splitlines()[0]}); re-run dimensionality_reduction.py")
    if list(coords.columns) != UMAP_COLUMNS:
        raise PipelineError(f"{path} has columns {list(coords.columns)}, not {UMAP_COLUMNS}; re-run dimensionality_reduction.py")
    return coords


# ---- provenance ----------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per process for each (path, inode, size, modification times)."""
    st = os.stat(path)
    return _sha256_of(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@lru_cache(maxsize=64)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    return sha256_file(Path(path))


# Each stage's output files in paths.out, as patterns: what start_stage and stale_outputs look for
# when a stage left no provenance record.
STAGE_OUTPUTS = {
    "dataset_overview": ["class_counts.csv", "class_counts.png", "sample_images.png"],
    "evaluate": ["test_metrics.csv", "test_metrics.json", "confusion_matrix.png", "test_predictions.csv",
                 "test_predictions.parquet", "test_scores.npz", "misclassified_test_images.png", "tail_accuracy.csv",
                 "tail_accuracy.png", "test_label_metrics.png"],
    "reproduce": ["reproduction_check.csv", "reproduction_check.json"],
    "ranked_images": ["ranked_*_*.png"],
    "embed": [f"embeddings_{s}.{ext}" for s in EMBEDDED_SUBSETS for ext in ("pkl", "parquet", "csv")],
    "compute_average_distances": ["average_*_distances_*.csv", "average_*_distances_*.png"],
    "dimensionality_reduction": ["umap_embeddings.png", "umap_coordinates.csv", "umap_coordinates.parquet",
                                 "close_faraway_closeotherclass_class_*.png", "close_far_images.csv"],
    "transfer_learning": ["transfer_learning.csv", "accuracy_*.png", "fewshot.csv", "fewshot_summary.csv",
                          "fewshot_all.png", "fewshot_per_class.png"],
    "leaks": ["leaks.csv", "leaks.png", "leaks_summary.json"],
    "embedding_quality": ["embedding_quality.csv"],
    "seeds": ["seed_robustness.csv", "seed_robustness_summary.csv", "seed_training_curves.png"],
    "feature_maps": ["feature_map_stats.csv", "feature_map_spectra.csv", "feature_map_spectra.png",
                     "feature_map_nonpositive.png"],
    "open_set": ["open_set_scores.csv", "open_set_image_scores.csv", "open_set_roc.png"],
    "calibration": ["calibration.csv", "calibration_bins.csv", "calibration.json", "reliability_diagram.png"],
    "predict": ["predictions/predictions.csv", "predictions/predictions.json", "predictions/bad_files.csv",
                "predictions/predictions.png"],
    "report": ["report.html"],
}


def provenance_path(paths: Paths, stage: str) -> Path:
    return paths.out / f"provenance_{stage}.json"


def start_stage(paths: Paths, stage: str, inputs: list[Path]) -> dict[str, str]:
    """Call after a stage's inputs are checked, before it writes anything: deletes its provenance
    record (the stage's outputs count as incomplete until save_provenance writes a new one), says so
    when earlier outputs are replaced, and returns the inputs' SHA-256 as they are now."""
    record = provenance_path(paths, stage)
    if not record.is_file() and existing_outputs(paths, stage):
        print(f"note: {stage} outputs in {paths.out} have no {record.name} (an earlier run stopped part-way): "
              f"replacing them")
    try:
        record.unlink(missing_ok=True)
    except OSError as err:  # a read-only output folder
        raise PipelineError(f"cannot remove {record}: {err.strerror or err}") from err
    return {str(p): file_sha256(p) for p in inputs}


def save_provenance(paths: Paths, stage: str, inputs: dict[str, str], outputs: list[Path]) -> None:
    """provenance_<stage>.json, the stage's last write: the SHA-256 of each input (as start_stage
    found them; an input replaced while the stage ran is an error) and of each file it wrote."""
    for name, sha256 in inputs.items():
        if not Path(name).is_file() or file_sha256(name) != sha256:
            raise PipelineError(f"{name} changed while {stage} ran (another run beside this one?); "
                                f"re-run {stage}.py")
    save_json(dict(stage=stage, code_version=code_version(), packages=package_versions(), inputs=inputs,
                   outputs={output_name(paths, p): file_sha256(p) for p in outputs}), provenance_path(paths, stage))
    left_over = stale_outputs(paths, stage)
    if left_over:
        print(f"note: {len(left_over)} older {stage} output(s) were not written by this run, e.g. {left_over[0]}")


def stale_outputs(paths: Paths, stage: str) -> list[str]:
    """The stage's output files that its provenance does not vouch for: all of them when the record
    is missing or unreadable or an input has changed since; otherwise each file missing, changed, or
    not written by the run that made the record."""
    on_disk = existing_outputs(paths, stage)
    try:
        record = json.loads(provenance_path(paths, stage).read_text())
        inputs, outputs = dict(record["inputs"]), dict(record["outputs"])
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(str(paths.out / name) for name in on_disk)
    if any(not Path(p).is_file() or file_sha256(p) != sha256 for p, sha256 in inputs.items()):
        return sorted(str(paths.out / name) for name in on_disk | set(outputs))
    return sorted(str(paths.out / name) for name in on_disk | set(outputs)
                  if name not in outputs or not (paths.out / name).is_file()
                  or file_sha256(paths.out / name) != outputs[name])


def output_name(paths: Paths, path: Path) -> str:
    """How provenance names an output: its path relative to the output folder ("predictions/x.csv"),
    which for the files directly in it is their name."""
    path = Path(path)
    return path.relative_to(paths.out).as_posix() if path.is_relative_to(paths.out) else path.name


def stage_of(name: str) -> str | None:
    """The stage whose output patterns match `name` (relative to the output folder), if any."""
    from fnmatch import fnmatch
    return next((stage for stage, patterns in STAGE_OUTPUTS.items() if any(fnmatch(name, p) for p in patterns)), None)


def existing_outputs(paths: Paths, stage: str) -> set[str]:
    """Names (relative to the output folder) of the files there that match the stage's output patterns."""
    return {output_name(paths, p) for pattern in STAGE_OUTPUTS[stage] for p in paths.out.glob(pattern) if p.is_file()}
