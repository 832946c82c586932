"""EcoTaxa exports in and out, one owner for the format: finding an export's TSV files (a TSV, a
folder of them, or EcoTaxa's zip, unpacked safely into the cache), reading and checking them, the
(relative path, class) listing a single-label split is drawn from, the writer of TSVs that EcoTaxa
imports, and the built-in digits written as an EcoTaxa-shaped export (the offline demo).

The format, as EcoTaxa writes and reads it: tab-separated; row 1 the header, every name lower-case
`prefix_field` with a prefix from PREFIXES; row 2 the types row, `[t]` (text) or `[f]` (number) per
column; then one object per row. Columns read here: object_id, img_file_name (the image, relative
to the TSV's folder), object_annotation_category, object_annotation_status (one of STATUSES) and
sample_id. Files are read as UTF-8 (with or without BOM), else as latin-1.

A row that cannot be used (missing image, duplicate object_id, unknown status, empty category, a
path leaving the export folder, ...) is listed with its reason in outputs/ecotaxa_bad_rows.csv and
left out, never a crash; a file that is not an EcoTaxa TSV at all is one PipelineError.
"""
import csv
import hashlib
import io
import os
import shutil
import stat
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image

from plankton import distributed
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, save_csv
from plankton.images import IMAGE_EXTENSIONS, is_hidden, print_class_counts, printable, scan_and_report

STATUSES = ("predicted", "validated", "dubious", "discarded")  # object_annotation_status
PREFIXES = ("object_", "sample_", "acq_", "process_", "img_")  # every column name starts with one
TYPES = {"[t]": "text", "[f]": "number"}  # the types row
REQUIRED = ("object_id", "img_file_name", "object_annotation_category", "object_annotation_status", "sample_id")
MAX_VALUE = 250  # characters: EcoTaxa's limit on an imported value
BAD_ROW_COLUMNS = ["tsv", "line", "object_id", "img_file_name", "reason"]
OBJECT_COLUMNS = ["relpath", "object_id", "sample_id", "category", "status", "tsv", "line"]
# the zip EcoTaxa writes, unpacked into CACHE_DIR: limits against archives built to fill the disk
ZIP_MAX_BYTES = 64 * 2**30  # unpacked, all members together
ZIP_MAX_MEMBERS = 2_000_000
ZIP_MAX_RATIO = 1000  # unpacked size / packed size of one member (a zip bomb compresses far more)


# ---- finding the export's TSV files --------------------------------------------------------------

@dataclass(frozen=True)
class Export:
    """An export on disk: the folder every image path is relative to, and its TSV files in it."""
    setting: str  # ECOTAXA_EXPORT as given
    root: Path
    tsvs: tuple[Path, ...]


def locate(setting: str, cache_dir: Path) -> Export:
    """ECOTAXA_EXPORT as an Export: a .tsv file (root: its folder), a folder (every .tsv in it, at any
    depth, hidden ones left out) or a .zip (unpacked once into cache_dir/ecotaxa/)."""
    path = Path(setting).expanduser()
    if not path.exists():
        raise PipelineError(f"ECOTAXA_EXPORT={setting!r}: no such file or folder; give an EcoTaxa export (a .tsv "
                            f"file, a folder of them with their images, or the .zip EcoTaxa writes)")
    path = path.resolve()
    if path.is_file() and zipfile.is_zipfile(path):
        path = unpack_zip(path, Path(cache_dir) / "ecotaxa")
    if path.is_file():
        return Export(setting, path.parent, (path,))
    tsvs = tuple(sorted(p for p in path.rglob("*.tsv") if p.is_file()
                        and not any(is_hidden(part) for part in p.relative_to(path).parts)))
    if not tsvs:
        raise PipelineError(f"ECOTAXA_EXPORT={setting!r}: no .tsv file in {path}; give the folder or zip of an "
                            f"EcoTaxa export, or its .tsv file")
    return Export(setting, path, tsvs)


def unpack_zip(archive: Path, cache: Path) -> Path:
    """The folder the zip is unpacked into, once per version of the file (name, size and times).
    Every member is checked before anything is written: no absolute name, no '..', no link, and the
    sizes within ZIP_MAX_*; one bad member refuses the whole archive (zip-slip is an attack)."""
    info = archive.stat()
    key = hashlib.sha256(f"{archive}|{info.st_size}|{info.st_mtime_ns}|{info.st_ctime_ns}".encode()).hexdigest()
    target = cache / key[:16]
    if (target / "COMPLETE").is_file():
        return target
    with zipfile.ZipFile(archive) as zipped:
        members = [m for m in zipped.infolist() if not m.is_dir()]
        check_zip_members(archive, members)
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"{key[:16]}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        for member in members:
            destination = partial / member.filename
            destination.parent.mkdir(parents=True, exist_ok=True)
            try:
                copy_member(zipped, member, destination)
            except (PipelineError, OSError, zipfile.BadZipFile) as err:
                shutil.rmtree(partial, ignore_errors=True)
                if isinstance(err, PipelineError):
                    raise
                raise PipelineError(f"cannot unpack ECOTAXA_EXPORT={str(archive)!r} into {cache} ({err}); "
                                    f"unpack it yourself and give the folder") from None
    (partial / "COMPLETE").write_text(f"unpacked from {archive}\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def copy_member(zipped: zipfile.ZipFile, member: zipfile.ZipInfo, destination: Path) -> None:
    """One member, stopped as soon as it unpacks to more than its declared size (the header lied)."""
    written = 0
    with zipped.open(member) as source, open(destination, "wb") as sink:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            written += len(chunk)
            if written > member.file_size:
                raise PipelineError(f"ECOTAXA_EXPORT={zipped.filename!r}: member {member.filename!r} unpacks to more "
                                    f"than its declared size; the archive is refused")
            sink.write(chunk)


def check_zip_members(archive: Path, members: list[zipfile.ZipInfo]) -> None:
    where = f"ECOTAXA_EXPORT={str(archive)!r}"
    if len(members) > ZIP_MAX_MEMBERS:
        raise PipelineError(f"{where}: {len(members)} members, more than {ZIP_MAX_MEMBERS}; the archive is refused")
    total = 0
    for member in members:
        name = member.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts or "\0" in name:
            raise PipelineError(f"{where}: member {name!r} would be written outside the folder it is unpacked into "
                                f"(an absolute name or '..'); the archive is refused")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise PipelineError(f"{where}: member {name!r} is a symbolic link; the archive is refused")
        if member.file_size > ZIP_MAX_RATIO * max(member.compress_size, 1):
            raise PipelineError(f"{where}: member {name!r} unpacks to {member.file_size} bytes from "
                                f"{member.compress_size} (more than {ZIP_MAX_RATIO}x); the archive is refused")
        total += member.file_size
    if total > ZIP_MAX_BYTES:
        raise PipelineError(f"{where}: unpacks to {total} bytes, more than {ZIP_MAX_BYTES}; unpack it yourself and "
                            f"give the folder")


# ---- reading one TSV -----------------------------------------------------------------------------

def decode(raw: bytes) -> str:
    """UTF-8 (a BOM dropped), else latin-1 (every byte is a latin-1 character)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def read_tsv(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """(the data rows as text, {column: "[t]" or "[f]"}) after the header and types rows are checked;
    the first problem is one PipelineError naming the file."""
    where = f"EcoTaxa TSV {path}"
    try:
        text = decode(Path(path).read_bytes())
        table = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, csv.Error) as err:  # unreadable, empty, ragged rows
        raise PipelineError(f"cannot read {where} ({str(err).strip().splitlines()[0]}); an EcoTaxa TSV has a "
                            f"header row and a types row ([t]/[f]), tab-separated") from None
    names = [str(name) for name in table.columns]
    bad = [n for n in names if n != n.strip().lower() or not n.startswith(PREFIXES) or n in PREFIXES]
    if bad:
        raise PipelineError(f"{where}: column {bad[0]!r} is not an EcoTaxa name (lower-case, starting with "
                            f"{', '.join(PREFIXES)}); is this an EcoTaxa TSV?")
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise PipelineError(f"{where}: no column {missing[0]!r} (it needs {', '.join(REQUIRED)})")
    if table.empty or not all(str(v).strip().lower() in TYPES for v in table.iloc[0]):
        first = "nothing" if table.empty else repr("\t".join(table.iloc[0])[:80])
        raise PipelineError(f"{where}: row 2 must be the types row ([t] or [f] in every column), not {first}")
    types = {name: str(v).strip().lower() for name, v in zip(names, table.iloc[0])}
    return table.iloc[1:].reset_index(drop=True), types


# ---- reading the export: objects and bad rows ----------------------------------------------------

def read_objects(export: Export) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(objects: OBJECT_COLUMNS, one row per usable object; bad rows: BAD_ROW_COLUMNS with the reason)."""
    objects, bad, first_id, first_image = [], [], {}, {}
    real_root = os.path.realpath(export.root)
    for tsv in export.tsvs:
        table, _ = read_tsv(tsv)
        folder = tsv.parent.relative_to(export.root).as_posix()
        name = tsv.relative_to(export.root).as_posix()
        for i, row in enumerate(table.to_dict("records")):
            line = i + 3  # row 1 the header, row 2 the types
            object_id, image = row["object_id"].strip(), row["img_file_name"].strip()
            relpath = image_path(folder, image)
            reason = row_problem(row, export.root, real_root, relpath, object_id, first_id, first_image)
            if reason:
                bad.append((name, line, printable(object_id), printable(image), reason))
                continue
            first_id[object_id], first_image[relpath] = f"{name} line {line}", object_id
            objects.append((relpath, object_id, row["sample_id"].strip(), row["object_annotation_category"].strip(),
                            row["object_annotation_status"].strip(), name, line))
    return pd.DataFrame(objects, columns=OBJECT_COLUMNS), pd.DataFrame(bad, columns=BAD_ROW_COLUMNS)


def image_path(folder: str, image: str) -> str | None:
    """The image's path relative to the export folder, or None if it would leave it."""
    if not image or image.startswith(("/", "\\")) or "\0" in image:
        return None
    relpath = os.path.normpath(os.path.join(folder, image.replace("\\", "/")))
    return None if relpath == ".." or relpath.startswith("../") or relpath == "." else Path(relpath).as_posix()


def row_problem(row: dict, root: Path, real_root: str, relpath: str | None, object_id: str,
                first_id: dict, first_image: dict) -> str:
    """Why a row cannot be used, or "" (the checks in order, the first failure named)."""
    status, category = row["object_annotation_status"].strip(), row["object_annotation_category"].strip()
    if not object_id:
        return "empty object_id"
    if object_id in first_id:
        return f"duplicate object_id (first on {first_id[object_id]})"
    if status not in STATUSES:
        return f"unknown status {status!r} (not {', '.join(STATUSES)})"
    if not category:
        return "empty object_annotation_category"
    if not row["img_file_name"].strip():
        return "empty img_file_name"
    if relpath is None:
        return "img_file_name leaves the export folder (absolute or '..')"
    if not os.path.realpath(root / relpath).startswith(real_root + os.sep):
        return "img_file_name leads outside the export folder through a symbolic link"
    if Path(relpath).suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image by its extension ({', '.join(sorted(IMAGE_EXTENSIONS))})"
    if relpath in first_image:
        return f"the image is already the image of object_id {first_image[relpath]!r}"
    if not (root / relpath).is_file():
        return "missing image"
    return ""


# ---- the listing a split is drawn from -----------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """What a single-label run takes from an export: the objects of these statuses, per category."""
    export: Export
    statuses: tuple[str, ...]
    min_count: int


def selection_from_settings(cfg) -> Selection | None:
    if cfg.ECOTAXA_EXPORT is None:
        return None
    return Selection(locate(cfg.ECOTAXA_EXPORT, Path(cfg.CACHE_DIR)), tuple(cfg.ECOTAXA_STATUSES),
                     cfg.ECOTAXA_MIN_COUNT)


def usable_objects(selection: Selection, seen: list[str], unseen: list[str], scan_cache: Path, out: Path,
                   bad_images: str, report: bool) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({class: readable image paths} for every configured class, {path: SHA-256}), as
    images.usable_images gives for class folders: the classes are the categories of the objects whose
    status is one of the selection's. With report=True (the run that draws the split) the bad rows go
    to out/ecotaxa_bad_rows.csv and every object to out/ecotaxa_objects.csv."""
    objects, bad = read_objects(selection.export)
    if report and distributed.is_main():
        save_csv(bad, out / "ecotaxa_bad_rows.csv", index=False)
        save_csv(objects, out / "ecotaxa_objects.csv", index=False)
    if len(bad):
        print(f"warning: {len(bad)} row(s) of the EcoTaxa export left out; see {out / 'ecotaxa_bad_rows.csv'}",
              file=sys.stderr)
    chosen = objects[objects.status.isin(selection.statuses)]
    counts = chosen.category.value_counts()
    check_named_classes(selection, counts, seen, unseen)
    wanted = {c: list(chosen.relpath[chosen.category == c]) for c in seen + unseen}
    unreadable, hashes = scan_and_report(selection.export.root, [f for files in wanted.values() for f in files],
                                         scan_cache, out / "bad_images.csv", bad_images)
    usable = {c: [f for f in files if f not in unreadable] for c, files in wanted.items()}
    for c, files in usable.items():
        if len(files) < selection.min_count:
            raise PipelineError(f"class {c!r} has {len(files)} readable {'/'.join(selection.statuses)} object(s) in "
                                f"the EcoTaxa export, fewer than ECOTAXA_MIN_COUNT={selection.min_count}; "
                                f"annotate more, lower ECOTAXA_MIN_COUNT, or leave the class out")
    if report:
        others = [f"{printable(c)} ({n})" for c, n in counts.items() if c not in seen + unseen]
        if others:
            print(f"note: {len(others)} EcoTaxa categor{'ies' if len(others) > 1 else 'y'} in neither SEEN_CLASSES "
                  f"nor UNSEEN_CLASSES left out: {', '.join(others[:20])}{' ...' if len(others) > 20 else ''}")
        print_class_counts("Seen classes", seen, {c: len(usable[c]) for c in seen})
        print_class_counts("Unseen classes", unseen, {c: len(usable[c]) for c in unseen})
    return usable, {f: hashes[f] for files in usable.values() for f in files}


def check_named_classes(selection: Selection, counts: pd.Series, seen: list[str], unseen: list[str]) -> None:
    """Every configured class must be a category with at least min_count objects of the statuses."""
    if len(seen) < 2:
        raise PipelineError("SEEN_CLASSES needs at least two classes to train a classifier")
    for name in list(seen) + list(unseen):
        if counts.get(name, 0) < selection.min_count:
            eligible = [f"{printable(c)} ({n})" for c, n in counts.items() if n >= selection.min_count]
            have = f"has {counts.get(name, 0)}" if name in counts else "is not a category there"
            raise PipelineError(f"class {name!r} {have} with status {'/'.join(selection.statuses)} in EcoTaxa export "
                                f"{selection.export.setting!r} (ECOTAXA_MIN_COUNT={selection.min_count}); categories "
                                f"with enough: {', '.join(eligible[:30]) or 'none'}")


# ---- writing a TSV EcoTaxa imports ---------------------------------------------------------------

def write_tsv(table: pd.DataFrame, types: dict[str, str], path: Path) -> None:
    """table as an EcoTaxa TSV, atomically: the header row, the types row, then the rows. Every
    column name must be lower-case with an EcoTaxa prefix, every type [t] or [f], every value at most
    MAX_VALUE characters without tab or line break (ValueError otherwise: the caller builds the table)."""
    for name in table.columns:
        if name != name.lower() or not name.startswith(PREFIXES) or types.get(name) not in TYPES:
            raise ValueError(f"EcoTaxa column {name!r}: lower-case, a prefix of {PREFIXES} and a type of {set(TYPES)}")
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(tsv_bytes(table, types))


def tsv_bytes(table: pd.DataFrame, types: dict[str, str]) -> bytes:
    lines = ["\t".join(table.columns), "\t".join(types[name] for name in table.columns)]
    for row in table.itertuples(index=False):
        cells = [format_value(v) for v in row]
        for cell in cells:
            if len(cell) > MAX_VALUE or any(c in cell for c in "\t\r\n"):
                raise ValueError(f"EcoTaxa value {cell[:40]!r}: more than {MAX_VALUE} characters, or a tab or break")
        lines.append("\t".join(cells))
    return ("\n".join(lines) + "\n").encode("utf-8")


def format_value(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.6g}"
    return str(value)


# ---- predictions EcoTaxa can import ----------------------------------------------------------------

IMPORT_TYPES = {"object_id": "[t]", "img_file_name": "[t]", "object_annotation_category": "[t]",
                "object_annotation_status": "[t]", "sample_id": "[t]", "object_score": "[f]",
                "object_open_set_score": "[f]", "object_unknown": "[f]"}


def fits(value) -> bool:
    """A value EcoTaxa imports as it is: at most MAX_VALUE characters, no tab or line break."""
    text = format_value(value)
    return len(text) <= MAX_VALUE and not any(c in text for c in "\t\r\n")


def source_objects(root: Path) -> dict[str, tuple[str, str]]:
    """{image path: (object_id, sample_id)} from the EcoTaxa TSVs in a folder of new images (the
    objects of an export to be classified); a .tsv that is not EcoTaxa's is named in a note and ignored."""
    found = {}
    for tsv in sorted(p for p in Path(root).rglob("*.tsv") if p.is_file()
                      and not any(is_hidden(part) for part in p.relative_to(root).parts)):
        try:
            objects, _ = read_objects(Export(str(tsv), Path(root), (tsv,)))
        except PipelineError as err:
            print(f"note: {err}; its object_ids are not used", file=sys.stderr)
            continue
        found.update({r: (o, sample) for r, o, sample in zip(objects.relpath, objects.object_id, objects.sample_id)})
    return found


def derived_object_id(relpath: str, sha256: str, taken: set[str]) -> str:
    """An object_id from the file's path without its extension ("a/b.png" -> "a_b"), made unique
    (and short enough) with the start of the image's SHA-256."""
    stem = PurePosixPath(relpath).with_suffix("").as_posix().replace("/", "_")
    object_id = stem if len(stem) <= MAX_VALUE else f"{stem[:MAX_VALUE - 17]}_{sha256[:16]}"
    if object_id in taken or not fits(object_id):
        object_id = f"{stem[:MAX_VALUE - 17]}_{sha256[:16]}"
    return object_id


def object_identity(relpath: str, sha256: str, root: Path, known: dict[str, tuple[str, str]],
                    taken: set[str]) -> tuple[str, str]:
    """(object_id, sample_id) of an image: the ones `known` lists for it (an EcoTaxa TSV among the
    images, or the export it came from), else from its path and folder; the id is added to `taken`."""
    object_id, sample = known.get(relpath, (None, None))
    if object_id is None:
        object_id = derived_object_id(relpath, sha256, taken)
        sample = PurePosixPath(relpath).parent.as_posix().replace("/", "_")
        sample = Path(root).name if sample == "." else sample
    taken.add(object_id)
    return object_id, sample


def fitting_rows(rows: list[dict], types: dict[str, str]) -> tuple[pd.DataFrame, int]:
    """(the rows whose every value fits, how many were left out: a value over MAX_VALUE characters,
    or a tab or line break)."""
    table = pd.DataFrame(rows, columns=list(types))
    keep = table.map(fits).all(axis=1) if len(table) else pd.Series([], dtype=bool)
    return table[keep].reset_index(drop=True), int((~keep).sum())


def import_table(predictions: pd.DataFrame, root: Path) -> tuple[pd.DataFrame, int]:
    """(predict.py's table as EcoTaxa import rows, how many rows were left out because a value would
    not fit: over MAX_VALUE characters, or a tab or line break). object_id and sample_id come from the
    EcoTaxa TSVs among the new images when they list the image, else from its path and folder."""
    known, taken, rows = source_objects(root), set(), []
    for row in predictions.itertuples(index=False):
        object_id, sample = object_identity(row.path, row.sha256, root, known, taken)
        rows.append(dict(object_id=object_id, img_file_name=row.path, object_annotation_category=row.predicted_class,
                         object_annotation_status="predicted", sample_id=sample, object_score=row.top1_score,
                         object_open_set_score=row.open_set_score, object_unknown=int(row.unknown)))
    return fitting_rows(rows, IMPORT_TYPES)


# annotate_next.py's batch: the predicted category, with the batch's rank and the strategy's score
ANNOTATION_TYPES = {"object_id": "[t]", "img_file_name": "[t]", "object_annotation_category": "[t]",
                    "object_annotation_status": "[t]", "sample_id": "[t]", "object_score": "[f]",
                    "object_annotate_rank": "[f]", "object_annotate_score": "[f]"}


def annotation_table(batch: pd.DataFrame, root: Path, known: dict[str, tuple[str, str]] | None = None
                     ) -> tuple[pd.DataFrame, int]:
    """(annotate_next.py's batch, columns rank, path, sha256, predicted_class, score and
    strategy_score, as EcoTaxa rows, how many rows were left out as import_table leaves them out).
    object_id and sample_id: `known`'s (the export's objects), else the TSVs among the images', else
    from the path."""
    known = source_objects(root) if known is None else known
    taken, rows = set(), []
    for row in batch.itertuples(index=False):
        object_id, sample = object_identity(row.path, row.sha256, root, known, taken)
        rows.append(dict(object_id=object_id, img_file_name=row.path, object_annotation_category=row.predicted_class,
                         object_annotation_status="predicted", sample_id=sample, object_score=row.score,
                         object_annotate_rank=int(row.rank), object_annotate_score=row.strategy_score))
    return fitting_rows(rows, ANNOTATION_TYPES)


def write_import_zip(tsv: Path, root: Path, relpaths: list[str], path: Path) -> None:
    """The TSV at the top of a zip with each image at its img_file_name, as EcoTaxa's import takes it."""
    with atomic_path(Path(path)) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zipped:  # images are compressed already
            zipped.write(tsv, tsv.name)
            for relpath in relpaths:
                zipped.write(Path(root) / relpath, relpath)


# ---- the offline demo: the built-in digits as an EcoTaxa export ----------------------------------

DEMO_TSV = "ecotaxa_export.tsv"
DEMO_STATUS_SHARES = {"validated": 0.6, "predicted": 0.3, "dubious": 0.1}


def export_digits_demo(folder: Path, seed: int = 0) -> Path:
    """scikit-learn's digits (1,797 8x8 images) as an EcoTaxa-shaped export in `folder`: images under
    images/, and DEMO_TSV with categories "0" to "9" (the default SEEN_CLASSES and UNSEEN_CLASSES),
    statuses drawn by DEMO_STATUS_SHARES (a fifth of the predicted ones in a wrong category, as a
    classifier's), 18 samples, and four bad rows (a missing image, a repeated object_id, an unknown
    status, an empty category). Written once and deterministically; returns the TSV's path."""
    from sklearn.datasets import load_digits
    folder = Path(folder)
    if (folder / "COMPLETE").is_file():
        return folder / DEMO_TSV
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    statuses = rng.choice(list(DEMO_STATUS_SHARES), size=len(pixels), p=list(DEMO_STATUS_SHARES.values()))
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, target, status) in enumerate(zip(pixels, digits.target, statuses)):
        relpath = f"images/digit_{i:04d}.png"
        with atomic_path(folder / relpath) as tmp:
            Image.fromarray(image, mode="L").save(tmp, format="PNG")
        wrong = status == "predicted" and rng.random() < 0.2
        category = str((target + rng.integers(1, 10)) % 10 if wrong else target)
        rows.append(demo_row(f"digits_{i:04d}", relpath, category, str(status), f"digits_sample_{i // 100:02d}"))
    rows += [demo_row("digits_missing", "images/no_such_image.png", "3", "validated", "digits_sample_00"),
             demo_row("digits_0000", "images/digit_0001.png", "0", "validated", "digits_sample_00"),
             demo_row("digits_bad_status", "images/digit_0002.png", "2", "checked", "digits_sample_00"),
             demo_row("digits_no_category", "images/digit_0003.png", "", "validated", "digits_sample_00")]
    table = pd.DataFrame(rows)
    write_tsv(table, {name: "[f]" if name in ("img_rank", "object_img_size") else "[t]" for name in table.columns},
              folder / DEMO_TSV)
    (folder / "COMPLETE").write_text("scikit-learn load_digits as an EcoTaxa export, by plankton/ecotaxa.py\n")
    return folder / DEMO_TSV


def demo_row(object_id: str, image: str, category: str, status: str, sample: str) -> dict:
    return dict(object_id=object_id, img_file_name=image, img_rank=0, object_img_size=8,
                object_annotation_category=category, object_annotation_status=status, sample_id=sample,
                acq_id="digits_acq", process_id="digits_process")
