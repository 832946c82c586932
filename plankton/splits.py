"""The split, one owner for both tasks: drawn once (per class, or per label set for a multi-label
run), persisted as outputs/split.csv with each image's SHA-256, and checked against the images on
disk before it is trusted. Split.subset/source give a stage the images, targets and features of
train, val, test or unseen."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dataloader import FeatureSource, Preprocess, feature_source
from plankton import ecotaxa, images, labelsets
from plankton.errors import PipelineError
from plankton.fileio import read_csv, save_csv
from plankton.hashing import sha256_file
from plankton.locations import Paths

SUBSETS = ("train", "val", "test")


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
               color_jitter: float = 0.0, orientation: int = 0) -> FeatureSource:
        """A subset's trunk features: from `cache` (a trunk_cache.TrunkCache), which names each image
        by its content's SHA-256, or from the images themselves (augmented if asked), each image in
        `orientation` (plankton/orientations.py)."""
        relpaths, labels = self.subset(name)
        return feature_source(self.root, relpaths, labels, preprocess, cache, augment, keys=self.hashes(name),
                              color_jitter=color_jitter, orientation=orientation)


def prepare_split(paths: Paths, root: Path, seen: list[str], unseen: list[str], create: bool,
                  bad_images: str = "skip", val_fraction: float = 0.05, test_fraction: float = 0.2,
                  seed: int = 0, labels_csv: Path | None = None,
                  export: "ecotaxa.Selection | None" = None) -> Split:
    """Find and check the images, then draw the split (create=True) or verify the persisted one.
    With a labels_csv, the images and label sets are those of the labels CSV (labelsets.py); with an
    EcoTaxa export, the images and classes are its objects' (ecotaxa.py), the split as for folders.

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
        if export is not None:  # the objects' image paths and categories: no class folders
            usable, hashes = ecotaxa.usable_objects(export, seen, unseen, paths.scan_cache(root), paths.out,
                                                    bad_images, report=create)
        else:
            usable, hashes = images.usable_images(root, seen, unseen, paths.scan_cache(root), paths.bad_images,
                                                  bad_images)
            if create:  # train.py reports the data; later scripts only check it
                images.print_class_counts("Seen classes", seen, {c: len(usable[c]) for c in seen})
                images.print_class_counts("Unseen classes", unseen, {c: len(usable[c]) for c in unseen})
        check = lambda table: _check_split_matches(table, usable, hashes, seen, unseen, paths.split,  # noqa: E731
                                                   by_folder=export is None)
        draw = lambda: images.draw_split({c: usable[c] for c in seen}, {c: usable[c] for c in unseen},  # noqa: E731
                                         hashes, val_fraction, test_fraction, seed)
    if paths.split.is_file():
        try:
            table = read_csv(paths.split, dtype=str, keep_default_na=False).fillna("")
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
    digit mosaics (multilabel), or the folder of an EcoTaxa export (ECOTAXA_EXPORT; its images are
    relative to it); the labels CSV is None for a single-label run."""
    if getattr(cfg, "ECOTAXA_EXPORT", None) is not None:
        return ecotaxa.locate(cfg.ECOTAXA_EXPORT, Path(cfg.CACHE_DIR)).root, None
    if cfg.TASK == "multilabel":
        root = labelsets.data_dir(cfg.DATA_DIR, cfg.BUILTIN_MULTILABEL_DIR)
        return root, labelsets.labels_csv_path(cfg.LABELS_CSV, root)
    return images.data_dir(cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR), None


def split_from_settings(cfg, paths: Paths, create: bool) -> Split:
    """The split for the settings' data folder and classes (train.py), drawn with SPLIT_SEED (None: SEED)."""
    root, labels_csv = data_root(cfg)
    split_seed = cfg.SEED if cfg.SPLIT_SEED is None else cfg.SPLIT_SEED
    return prepare_split(paths, root, cfg.SEEN_CLASSES, cfg.UNSEEN_CLASSES, create, cfg.BAD_IMAGES,
                         cfg.VAL_FRACTION, cfg.TEST_FRACTION, split_seed, labels_csv, ecotaxa_selection(cfg))


def ecotaxa_selection(cfg) -> "ecotaxa.Selection | None":
    """The EcoTaxa objects a single-label run takes (ECOTAXA_EXPORT), or None for class folders."""
    return ecotaxa.selection_from_settings(cfg) if getattr(cfg, "ECOTAXA_EXPORT", None) is not None else None


def _check_split_matches(table, usable, hashes, seen_names, unseen_names, split_path, by_folder: bool = True) -> None:
    """split.csv is checked before it is trusted (columns, subsets, one row per image, classes),
    then against the usable images on disk: none added, removed, modified (by SHA-256) or, for an
    EcoTaxa export, where the class is not the folder, given another category."""
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
        (by_folder & (table.class_name != folder), lambda r: f"class_name {r.class_name!r} is not the image's folder"),
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
    class_now = {f: c for c, files in usable.items() for f in files}
    class_then = dict(zip(table.relpath, table.class_name))
    relabelled = sorted(f for f in on_disk & in_split.keys() if class_now[f] != class_then[f])  # EcoTaxa only
    if added or removed or modified or relabelled:
        example = next(f"{files[0]!r} ({kind})" for files, kind in
                       ((modified, "modified"), (relabelled, "relabelled"), (added, "added"), (removed, "removed"))
                       if files)
        also = f", {len(relabelled)} relabelled" if relabelled else ""
        raise PipelineError(f"the images changed since {split_path} was drawn ({len(added)} added, "
                            f"{len(removed)} removed or unreadable, {len(modified)} modified{also}, e.g. {example}); "
                            f"{fix}")
