"""Multi-label data (TASK = "multilabel"): the built-in demo of digit mosaics, reading and checking a
labels CSV, drawing and checking the multi-label split, and label sets as multi-hot matrices.
Nothing here knows about models; plankton/splits.py owns the split file and calls these.

The labels CSV has a header and two columns:

    path,labels
    images/mosaic_0000.png,1;3;5
    plankton/img_17.jpg,chainthin;parasite

`path` is relative to DATA_DIR; `labels` are label names separated by LABEL_SEPARATOR (";"),
spaces around them ignored, a label repeated in one row counted once. Every label must be named in
SEEN_CLASSES or UNSEEN_CLASSES. An image carrying ANY unseen label is held out (subset "unseen"),
so the classifier never sees an unseen label; images whose labels are all seen are split into
train/val/test (randomly, not stratified: label sets have no single class to stratify by).
"""
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from plankton.errors import PipelineError
from plankton.fileio import atomic_path, save_csv
from plankton.images import IMAGE_EXTENSIONS, printable, scan_and_report

LABEL_SEPARATOR = ";"  # between the labels of one image in the labels CSV and in split.csv
LABELS_COLUMNS = ["path", "labels"]
SPLIT_COLUMNS = ["relpath", "labels", "subset", "sha256"]
SUBSETS = ("train", "val", "test", "unseen")


# ---- the built-in demo: 2x2 mosaics of the built-in digits ---------------------------------------

MOSAICS_SEEN_ONLY = 1000  # mosaics whose four tiles are digits 0-5 (the default SEEN_CLASSES)
MOSAICS_ANY = 600  # mosaics whose tiles are any digit 0-9


def export_mosaics(folder: Path, seed: int = 0) -> None:
    """Write 1,600 mosaics of 2x2 built-in digits (16x16 px PNG) under folder/images and their label
    sets (the digits shown) to folder/labels.csv, once and deterministically. The first 1,000 use
    digits 0-5 only, so the default SEEN_CLASSES keep about 1,080 images to train and test on;
    the other 600 use all ten digits. Tiles are drawn with replacement from the 1,797 digits, so
    a test mosaic may share a digit image with a training mosaic (a demo, not a benchmark)."""
    from sklearn.datasets import load_digits
    folder = Path(folder)
    if (folder / "COMPLETE").is_file():
        return
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    low = np.flatnonzero(digits.target <= 5)
    tiles = np.concatenate([rng.choice(low, size=(MOSAICS_SEEN_ONLY, 4)),
                            rng.choice(len(pixels), size=(MOSAICS_ANY, 4))])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, picked in enumerate(tiles):
        mosaic = np.block([[pixels[picked[0]], pixels[picked[1]]], [pixels[picked[2]], pixels[picked[3]]]])
        relpath = f"images/mosaic_{i:04d}.png"
        with atomic_path(folder / relpath) as tmp:
            Image.fromarray(mosaic, mode="L").save(tmp, format="PNG")
        rows.append((relpath, LABEL_SEPARATOR.join(str(d) for d in sorted(set(digits.target[picked])))))
    save_csv(pd.DataFrame(rows, columns=LABELS_COLUMNS), folder / "labels.csv", index=False)
    (folder / "COMPLETE").write_text("2x2 mosaics of scikit-learn load_digits, exported by labelsets.py\n")


def data_dir(data_dir_setting: str | None, builtin_dir: str) -> Path:
    """The image folder of a multi-label run: DATA_DIR, or the built-in mosaics (exported on first use)."""
    if data_dir_setting is None:
        export_mosaics(Path(builtin_dir))
        return Path(builtin_dir).resolve()
    folder = Path(data_dir_setting).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"DATA_DIR={str(data_dir_setting)!r} is not a folder; set DATA_DIR in configfile.py")
    return folder.resolve()


def labels_csv_path(labels_csv_setting: str | None, root: Path) -> Path:
    """LABELS_CSV, or <DATA_DIR>/labels.csv when it is None."""
    return (Path(labels_csv_setting).expanduser() if labels_csv_setting else Path(root) / "labels.csv").resolve()


# ---- reading and checking the labels CSV ---------------------------------------------------------

def read_labels_csv(path: Path, root: Path, seen: list[str], unseen: list[str]) -> dict[str, tuple[str, ...]]:
    """{relative image path: its labels, sorted as in SEEN_CLASSES + UNSEEN_CLASSES}, after every
    check; the first problem is one PipelineError naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"no labels CSV at {path}; write one (columns path,labels; labels separated by "
                            f"'{LABEL_SEPARATOR}') or set LABELS_CSV")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as err:  # not CSV, not UTF-8, empty
        raise PipelineError(f"cannot read labels CSV {path} ({str(err).strip().splitlines()[0]}); it needs the "
                            f"columns path,labels")
    if list(table.columns) != LABELS_COLUMNS:
        raise PipelineError(f"labels CSV {path} has columns {list(table.columns)}; it needs exactly {LABELS_COLUMNS}")
    order = {name: i for i, name in enumerate(list(seen) + list(unseen))}
    label_sets, first_line = {}, {}  # first_line is keyed by the image's real location (image_identity)
    for line, (relpath, text) in enumerate(zip(table.path, table.labels), start=2):
        where = f"labels CSV {path} line {line} ({relpath!r})"
        _check_image_path(relpath, root, where)
        identity = image_identity(relpath, root, where)
        if identity in first_line:
            raise PipelineError(f"{where}: the image is listed a second time (first on line {first_line[identity]}); "
                                f"give each image one row with all its labels separated by '{LABEL_SEPARATOR}'")
        labels = {label.strip() for label in text.split(LABEL_SEPARATOR)} - {""}
        if not labels:
            raise PipelineError(f"{where}: no labels; every image needs at least one (separated by "
                                f"'{LABEL_SEPARATOR}'), or remove the row")
        unknown = sorted(labels - order.keys())
        if unknown:
            raise PipelineError(f"{where}: label {unknown[0]!r} is in neither SEEN_CLASSES nor UNSEEN_CLASSES "
                                f"({', '.join(order)}); add it to one of them, or fix the row")
        label_sets[relpath], first_line[identity] = tuple(sorted(labels, key=order.get)), line
    carried = {label for labels in label_sets.values() for label in labels}
    for name in order:
        if name not in carried:
            raise PipelineError(f"label {name!r} ({'SEEN' if name in seen else 'UNSEEN'}_CLASSES) is carried by no "
                                f"image in labels CSV {path}; remove it from the settings or label some images")
    return label_sets


def _check_image_path(relpath: str, root: Path, where: str) -> None:
    """The path names an image file inside the folder."""
    if not relpath or Path(relpath).is_absolute() or ".." in Path(relpath).parts:
        raise PipelineError(f"{where}: the path must be relative to DATA_DIR ({root}), without '..'")
    if Path(relpath).suffix.lower() not in IMAGE_EXTENSIONS:
        raise PipelineError(f"{where}: not an image by its extension ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if not (root / relpath).is_file():
        raise PipelineError(f"{where}: no such image in {root}; fix the path (relative to DATA_DIR) or remove the row")


def image_identity(relpath: str, root: Path, where: str) -> Path:
    """Where an image really is: its folder as a real path (links and "." resolved) and its name. Two
    spellings of one image (img/x.png, ./img/x.png, a linked alias of img/) are one image, and a
    linked sub-folder that leads outside the data folder is refused. (A linked image file is an image,
    as in class folders.)"""
    relative = Path(relpath)
    folder = Path(os.path.realpath(root / relative.parent))
    if not folder.is_relative_to(os.path.realpath(root)):
        raise PipelineError(f"{where}: its folder leads outside DATA_DIR ({root}) through a symbolic link, to "
                            f"{folder}; put the image inside DATA_DIR or remove the row")
    return folder / relative.name


def usable_label_sets(root: Path, labels_csv: Path, seen: list[str], unseen: list[str], scan_cache: Path,
                      bad_report: Path, bad_images: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """({path: labels} of the readable images of the labels CSV, {path: SHA-256} of those images).
    Unreadable images are reported and left out (or stop the run) as for single-label folders."""
    label_sets = read_labels_csv(labels_csv, root, seen, unseen)
    bad, hashes = scan_and_report(root, list(label_sets), scan_cache, bad_report, bad_images)
    usable = {path: labels for path, labels in label_sets.items() if path not in bad}
    if not usable:
        raise PipelineError(f"no readable image in labels CSV {labels_csv} (see {bad_report})")
    return usable, {path: hashes[path] for path in usable}


def print_label_counts(label_sets: dict[str, tuple[str, ...]], seen: list[str], unseen: list[str]) -> None:
    counts = pd.Series([label for labels in label_sets.values() for label in labels]).value_counts()
    sizes = pd.Series([len(labels) for labels in label_sets.values()])
    print(f"{len(label_sets)} images, {sizes.mean():.2f} labels per image on average (1 to {sizes.max()})")
    for title, names in (("seen labels", seen), ("unseen labels", unseen)):
        print(f"{title}: " + ", ".join(f"{name} ({counts.get(name, 0)})" for name in names))


# ---- the split -----------------------------------------------------------------------------------

def draw_split(label_sets: dict[str, tuple[str, ...]], unseen: list[str], hashes: dict[str, str],
               val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Images carrying any unseen label -> "unseen"; the others shuffled into train/val/test by the
    fractions (at least one image each). Columns: relpath, labels (joined by ";"), subset, sha256."""
    paths = sorted(label_sets)
    held_out = [p for p in paths if set(label_sets[p]) & set(unseen)]
    seen_only = [p for p in paths if p not in set(held_out)]
    n = len(seen_only)
    if n < 3:
        raise PipelineError(f"{n} image(s) carry only seen labels; training needs at least 3 (one each for train, "
                            f"validation and test)")
    n_test, n_val = max(1, int(round(test_fraction * n))), max(1, int(round(val_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    subset = np.array(["train"] * n, dtype=object)
    subset[order[:n_test]], subset[order[n_test:n_test + n_val]] = "test", "val"
    rows = [(p, LABEL_SEPARATOR.join(label_sets[p]), s, hashes[p]) for p, s in zip(seen_only, subset)]
    rows += [(p, LABEL_SEPARATOR.join(label_sets[p]), "unseen", hashes[p]) for p in held_out]
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def check_split(table: pd.DataFrame, label_sets: dict, hashes: dict, seen: list[str], unseen: list[str],
                split_path: Path) -> None:
    """split.csv of a multi-label run, checked against the labels CSV and the images as they are now."""
    fix = f"delete {split_path} and the checkpoints to re-split and retrain, or use new OUTPUT_DIR and CHECKPOINT_DIR"
    if list(table.columns) != SPLIT_COLUMNS:
        raise PipelineError(f"{split_path} has columns {list(table.columns)}, not {SPLIT_COLUMNS} (a multi-label "
                            f"split); {fix}")
    if (~table.subset.isin(SUBSETS)).any() or table.relpath.duplicated().any():
        raise PipelineError(f"{split_path} has an unknown subset or a repeated image; {fix}")
    in_split = dict(zip(table.relpath, table.labels))
    now = {p: LABEL_SEPARATOR.join(labels) for p, labels in label_sets.items()}
    added, removed = sorted(now.keys() - in_split.keys()), sorted(in_split.keys() - now.keys())
    relabelled = sorted(p for p in now.keys() & in_split.keys() if now[p] != in_split[p])
    modified = sorted(p for p, sha in zip(table.relpath, table.sha256) if p in hashes and hashes[p] != sha)
    if added or removed or relabelled or modified:
        example = next(f"{files[0]!r} ({kind})" for files, kind in ((relabelled, "labels changed"),
                       (modified, "modified"), (added, "added"), (removed, "removed")) if files)
        raise PipelineError(f"the images or labels changed since {split_path} was drawn ({len(added)} added, "
                            f"{len(removed)} removed, {len(relabelled)} relabelled, {len(modified)} modified, "
                            f"e.g. {example}); {fix}")
    held_out = table.labels.map(lambda text: bool(set(text.split(LABEL_SEPARATOR)) & set(unseen)))
    if (held_out != (table.subset == "unseen")).any():
        raise PipelineError(f"{split_path} was drawn for other UNSEEN_CLASSES than {unseen}; restore them, or {fix}")


# ---- label sets as numbers -----------------------------------------------------------------------

def multi_hot(label_texts, classes: list[str]) -> np.ndarray:
    """images x classes int64 matrix: 1 where the image carries the class (labels joined by ";");
    labels outside `classes` (a held-out image's seen labels) are left out."""
    index = {name: i for i, name in enumerate(classes)}
    matrix = np.zeros((len(label_texts), len(classes)), dtype=np.int64)
    for row, text in enumerate(label_texts):
        for label in text.split(LABEL_SEPARATOR):
            if label in index:
                matrix[row, index[label]] = 1
    return matrix


def rarest_labels(targets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each image's rarest label: of the labels it carries, the one fewest images carry (`counts`,
    over the whole split, so a label set gets the same label in every subset; ties to the first
    class). It stands for the image's set where one label must (UMAP colours, close/far figures)."""
    counts = np.asarray(counts, dtype=float)
    rarity = np.where(targets > 0, counts[None, :], np.inf)
    return rarity.argmin(1).astype(np.int64)


def describe(label_set_text: str) -> str:
    return printable(label_set_text.replace(LABEL_SEPARATOR, "+"))


# ---- counts over a split -------------------------------------------------------------------------

ALL_IMAGES = "(all images)"


def label_counts(table: pd.DataFrame, seen: list[str], unseen: list[str]) -> pd.DataFrame:
    """Images carrying each label in each subset (seen labels first; an image counts once in each of
    its labels, its seen labels included when an unseen one holds it out), then a last row counting
    the images themselves. Columns: label, kind, train, val, test, unseen, total. `table` is split.csv's."""
    names = list(seen) + list(unseen)
    carried = multi_hot(table.labels, names)
    rows = [dict(label=name, kind="seen" if name in seen else "unseen",
                 **{s: int(carried[(table.subset == s).to_numpy(), i].sum()) for s in SUBSETS})
            for i, name in enumerate(names)]
    rows.append(dict(label=ALL_IMAGES, kind="all", **{s: int((table.subset == s).sum()) for s in SUBSETS}))
    counts = pd.DataFrame(rows, columns=["label", "kind", *SUBSETS])
    counts["total"] = counts[list(SUBSETS)].sum(axis=1)
    return counts


def cooccurrence(label_texts, names: list[str]) -> pd.DataFrame:
    """Labels x labels: the images carrying both (the diagonal: the images carrying the label)."""
    carried = multi_hot(label_texts, names)
    return pd.DataFrame(carried.T @ carried, index=pd.Index(names, name="label"), columns=names)
