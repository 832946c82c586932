"""The split, one owner for both tasks: drawn once (per class, or per label set for a multi-label
run), persisted as outputs/split.csv with each image's SHA-256, and checked against the images on
disk before it is trusted. Split.subset/source give a stage the images, targets and features of
train, val, test or unseen.

GROUP_BY (single-label runs) names a group for each image (a folder level of its path, a column of
GROUP_CSV, or EcoTaxa's sample_id): every image of a group then falls in one subset, the groups
assigned so that each class's images come near the subset fractions (draw_grouped), and split.csv
gets a `group` column. A class with fewer than three groups cannot be in all three subsets: one
warning line names such classes (their groups go to train first, then test, then validation).
"""
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dataloader import FeatureSource, Preprocess, feature_source
from plankton import ecotaxa, images, labelsets
from plankton.errors import PipelineError
from plankton.fileio import read_csv, save_csv
from plankton.hashing import ContentMemo, sha256_file
from plankton.locations import Paths

SUBSETS = ("train", "val", "test")
GROUP_COLUMN = "group"  # split.csv's last column when GROUP_BY is set
KEEP_GROUPS = "keep"  # prepare_split(group_by=KEEP_GROUPS): take split.csv's groups as they are (later stages)


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
                  export: "ecotaxa.Selection | None" = None, group_by: str | None = KEEP_GROUPS,
                  group_csv: str | None = None) -> Split:
    """Find and check the images, then draw the split (create=True) or verify the persisted one.
    With a labels_csv, the images and label sets are those of the labels CSV (labelsets.py); with an
    EcoTaxa export, the images and classes are its objects' (ecotaxa.py), the split as for folders.

    A split that no longer matches the usable images on disk (added, removed or modified, by
    content) stops the run: re-drawing it silently could move test images into training. So does one
    drawn with other groups than GROUP_BY (`group_by`) gives now; KEEP_GROUPS trusts its groups."""
    seen, unseen = list(seen), list(unseen)
    if labels_csv is not None:
        found, hashes = labelsets.usable_label_sets(root, Path(labels_csv), seen, unseen, paths.scan_cache(root),
                                                    paths.bad_images, bad_images)
        if create:
            labelsets.print_label_counts(found, seen, unseen)
        check = lambda table: labelsets.check_split(table, found, hashes, seen, unseen, paths.split)  # noqa: E731
        check_inputs = ("label sets", found, hashes, seen, unseen)
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
        groups = None
        if group_by not in (None, KEEP_GROUPS):
            groups = image_groups(group_by, [f for files in usable.values() for f in files], root, group_csv, export)
        check = lambda table: _check_split_matches(table, usable, hashes, seen, unseen, paths.split,  # noqa: E731
                                                   by_folder=export is None, groups=groups,
                                                   group_by=group_by)
        check_inputs = ("images", usable, hashes, seen, unseen, export is None, groups, group_by)
        if groups is None:
            draw = lambda: images.draw_split({c: usable[c] for c in seen}, {c: usable[c] for c in unseen},  # noqa
                                             hashes, val_fraction, test_fraction, seed)
        else:
            draw = lambda: draw_grouped(usable, seen, unseen, hashes, groups, val_fraction, test_fraction,  # noqa
                                        seed, group_by)
    if paths.split.is_file():
        table, split_sha256 = _read_checked_split(paths.split, check, check_inputs)
    elif not create:
        raise PipelineError(f"no split file at {paths.split} — run train.py first")
    else:
        table = draw()
        save_csv(table, paths.split, index=False)
        print(f"split drawn and saved to {paths.split}")
        split_sha256 = sha256_file(paths.split)
    counts = table.subset.value_counts()
    print("split: " + ", ".join(f"{s} {counts.get(s, 0)}" for s in SUBSETS + ("unseen",)) + " images")
    return Split(root, table, seen, unseen, split_sha256, None if labels_csv is None else str(labels_csv))


_CHECKED_SPLITS = ContentMemo()  # the split.csv last read and checked, by its bytes and the images it was checked against


def _read_checked_split(path: Path, check, check_inputs: tuple) -> tuple[pd.DataFrame, str]:
    """split.csv read and checked (check(table) raises if it does not hold), and the SHA-256 of the
    bytes read. The same bytes checked against the same images, classes and groups (check_inputs)
    pass again without a second read and check: run_all.py's stages each open the split. A copy,
    so a stage that changes its table changes nobody else's."""
    def read_and_check(data: bytes) -> pd.DataFrame:
        try:
            table = read_csv(io.BytesIO(data), dtype=str, keep_default_na=False).fillna("")
        except ValueError as err:  # not CSV, not UTF-8, empty, ragged rows
            raise PipelineError(f"cannot read {path} ({str(err).strip().splitlines()[0]}); restore it, "
                                f"or delete it and the checkpoints to re-split and retrain")
        check(table)
        return table
    table, digest = _CHECKED_SPLITS.get(path, read_and_check, check_inputs)
    return table.copy(), digest


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
                         cfg.VAL_FRACTION, cfg.TEST_FRACTION, split_seed, labels_csv, ecotaxa_selection(cfg),
                         group_by=getattr(cfg, "GROUP_BY", None), group_csv=getattr(cfg, "GROUP_CSV", None))


def ecotaxa_selection(cfg) -> "ecotaxa.Selection | None":
    """The EcoTaxa objects a single-label run takes (ECOTAXA_EXPORT), or None for class folders."""
    return ecotaxa.selection_from_settings(cfg) if getattr(cfg, "ECOTAXA_EXPORT", None) is not None else None


def _check_split_matches(table, usable, hashes, seen_names, unseen_names, split_path, by_folder: bool = True,
                         groups: dict[str, str] | None = None, group_by: str | None = KEEP_GROUPS) -> None:
    """split.csv is checked before it is trusted (columns, subsets, one row per image, classes),
    then against the usable images on disk: none added, removed, modified (by SHA-256) or, for an
    EcoTaxa export, where the class is not the folder, given another category; and against GROUP_BY
    (`groups`, each image's group now, None without GROUP_BY; group_by=KEEP_GROUPS takes the file's)."""
    fix = (f"set OUTPUT_DIR and CHECKPOINT_DIR to new folders for a new run, or delete {split_path} "
           f"and checkpoints to re-split and retrain")
    restore = f"restore {split_path}, or delete it and the checkpoints to re-split and retrain"
    if list(table.columns) == images.SPLIT_COLUMNS[:-1]:
        raise PipelineError(f"{split_path} predates content fingerprints (no sha256 column), so a replaced image "
                            f"would go unnoticed; {fix}")
    grouped = list(table.columns) == images.SPLIT_COLUMNS + [GROUP_COLUMN]
    if list(table.columns) != images.SPLIT_COLUMNS and not grouped:
        raise PipelineError(f"{split_path} has columns {list(table.columns)}, not {images.SPLIT_COLUMNS}; {restore}")
    _check_groups(table, grouped, groups, group_by, split_path, fix)
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
        if missing and not (grouped and "train" not in missing):  # a class with few groups: train at least
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


# ---- grouped splits (GROUP_BY) -------------------------------------------------------------------

def image_groups(group_by: str, relpaths: list[str], root: Path, group_csv: str | None = None,
                 export: "ecotaxa.Selection | None" = None) -> dict[str, str]:
    """{image path: its group} as GROUP_BY says: "path:N" (the N-th folder of the path in the data
    folder), "csv:<column>" (that column of GROUP_CSV, whose "path" column names the images) or
    "sample_id" (the EcoTaxa objects'). One that cannot give every image a group is one error line."""
    where = f"GROUP_BY={group_by!r}"
    if group_by.startswith("path:"):
        level, groups = int(group_by[5:]), {}
        for relpath in relpaths:
            folders = Path(relpath).parts[:-1]
            if len(folders) < level:
                raise PipelineError(f"{where}: {images.printable(relpath)!r} lies in {len(folders)} folder level(s) of "
                                    f"{root}, so it has no level {level}; choose a level every image has")
            groups[relpath] = folders[level - 1]
        return groups
    if group_by == "sample_id":
        objects, _ = ecotaxa.read_objects(export.export)
        named = dict(zip(objects.relpath, objects.sample_id))
        return _every_image_grouped(where, relpaths, named, f"the EcoTaxa export's sample_id")
    column = group_by[4:]
    try:
        table = read_csv(Path(group_csv), dtype=str, keep_default_na=False)
    except (OSError, ValueError) as err:
        raise PipelineError(f"{where}: cannot read GROUP_CSV={str(group_csv)!r} ({str(err).strip().splitlines()[0]}); "
                            f"give a CSV with a 'path' column and a {column!r} column") from None
    missing = [name for name in ("path", column) if name not in table.columns]
    if missing:
        raise PipelineError(f"{where}: GROUP_CSV={str(group_csv)!r} has no column {missing[0]!r} (its columns: "
                            f"{', '.join(map(repr, table.columns))})")
    named = dict(zip(table.path.map(lambda p: Path(p).as_posix()), table[column]))
    return _every_image_grouped(where, relpaths, named, f"column {column!r} of GROUP_CSV={str(group_csv)!r}")


def _every_image_grouped(where: str, relpaths: list[str], named: dict[str, str], source: str) -> dict[str, str]:
    groups = {p: str(named.get(Path(p).as_posix(), "")).strip() for p in relpaths}
    without = [p for p, group in groups.items() if not group]
    if without:
        raise PipelineError(f"{where}: {len(without)} image(s) have no group in {source}, e.g. "
                            f"{images.printable(without[0])!r}; give every image a non-empty group")
    return groups


def assign_groups(labels: np.ndarray, group_ids: np.ndarray, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Subset index (0 train, 1 val, 2 test) of each image, the same for every image of a group.

    scikit-learn's StratifiedGroupKFold makes equal folds only; the subsets are 75/5/20, so the same
    greedy idea with a target per subset: first each class, fewest groups first, gets one of its
    groups in each subset its groups allow (the largest in train, the smallest in validation), then
    the other groups, largest first (ties in a random order from `seed`), each go where they bring
    the subsets' class counts closest to fractions x the class's images (squared errors relative to
    the class's size, so a rare class counts as much as a common one)."""
    rng = np.random.default_rng(seed)
    names, group_of = np.unique(np.asarray(group_ids, dtype=str), return_inverse=True)
    k = int(labels.max()) + 1 if len(labels) else 0
    counts = np.zeros((len(names), k))
    np.add.at(counts, (group_of, labels), 1)
    totals = counts.sum(0)
    target = np.outer(fractions, totals)
    placed, subset_of = np.zeros((3, k)), np.full(len(names), -1)
    tiebreak = rng.permutation(len(names))

    def place(g: int, s: int) -> None:
        subset_of[g] = s
        placed[s] += counts[g]

    for c in sorted(range(k), key=lambda c: ((counts[:, c] > 0).sum(), c)):
        mine = [g for g in np.flatnonzero(counts[:, c] > 0) if subset_of[g] < 0]
        mine.sort(key=lambda g: (counts[g, c], tiebreak[g]))  # smallest first
        wanted = {1: [0], 2: [0, 2]}.get(int((counts[:, c] > 0).sum()), [0, 1, 2])  # train first, then test
        for s in wanted:
            if placed[s, c] == 0 and mine:
                place(mine.pop(-1) if s == 0 else mine.pop(0), s)
    rest = [g for g in np.argsort(tiebreak) if subset_of[g] < 0]
    for g in sorted(rest, key=lambda g: -counts[g].sum()):  # stable: ties keep the random order
        scale = np.maximum(totals, 1) ** 2
        growth = (counts[g] * (2 * (placed - target) + counts[g]) / scale).sum(1)
        place(g, int(np.argmin(growth)))
    return subset_of[group_of]


def draw_grouped(usable: dict[str, list[str]], seen: list[str], unseen: list[str], hashes: dict[str, str],
                 groups: dict[str, str], val_fraction: float, test_fraction: float, seed: int,
                 group_by: str) -> pd.DataFrame:
    """The split with whole groups in train/val/test (assign_groups); unseen classes' images in
    "unseen". split.csv's columns plus `group`. One warning line names the seen classes with too
    few groups to appear in every subset."""
    files = [(f, c) for c in seen for f in usable[c]]
    labels = np.array([seen.index(c) for _, c in files], dtype=np.int64)
    fractions = (1 - val_fraction - test_fraction, val_fraction, test_fraction)
    subset = assign_groups(labels, np.array([groups[f] for f, _ in files], dtype=object), fractions, seed)
    rows = [(f, c, SUBSETS[s], hashes[f], groups[f]) for (f, c), s in zip(files, subset)]
    rows += [(f, c, "unseen", hashes[f], groups[f]) for c in unseen for f in usable[c]]
    table = pd.DataFrame(rows, columns=images.SPLIT_COLUMNS + [GROUP_COLUMN])
    few = []
    for c in seen:
        mine = table[(table.class_name == c) & (table.subset != "unseen")]
        missing = [s for s in SUBSETS if s not in set(mine.subset)]
        if missing:
            n = mine.group.nunique()
            few.append(f"{images.printable(c)!r} ({n} group{'s' if n != 1 else ''}: no {'/'.join(missing)} images)")
    if few:
        print(f"warning: GROUP_BY={group_by!r}: {len(few)} seen class(es) have too few groups to appear in train, "
              f"validation and test: {', '.join(few)}", file=sys.stderr)
    return table


def _check_groups(table: pd.DataFrame, grouped: bool, groups: dict[str, str] | None, group_by,
                  split_path: Path, fix: str) -> None:
    """split.csv's groups against GROUP_BY now (None: no groups; KEEP_GROUPS: as they are), and no
    group with images in two of train/val/test (a hand-edited file)."""
    if group_by != KEEP_GROUPS:
        if grouped and groups is None:
            raise PipelineError(f"{split_path} was drawn with whole groups in each subset (GROUP_BY), but GROUP_BY is "
                                f"None now; restore GROUP_BY, or {fix}")
        if not grouped and groups is not None:
            raise PipelineError(f"{split_path} was drawn image by image, but GROUP_BY={group_by!r} now; restore "
                                f"GROUP_BY=None, or {fix}")
        if grouped:
            changed = [(p, g) for p, g in zip(table.relpath, table[GROUP_COLUMN]) if p in groups and groups[p] != g]
            if changed:
                p, g = changed[0]
                raise PipelineError(f"{split_path} was drawn with other groups than GROUP_BY={group_by!r} gives now "
                                    f"({len(changed)} image(s), e.g. {images.printable(p)!r}: group {g!r} then, "
                                    f"{groups[p]!r} now); restore GROUP_BY, or {fix}")
    if grouped:
        seen_rows = table[table.subset != "unseen"]
        straddling = seen_rows.groupby(GROUP_COLUMN).subset.nunique()
        if (straddling > 1).any():
            raise PipelineError(f"{split_path}: group {straddling[straddling > 1].index[0]!r} has images in more than "
                                f"one of train, val and test; restore {split_path}, or {fix}")
