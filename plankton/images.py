"""Image files: the built-in digits, finding and checking a folder's images, decoding them to RGB,
resizing, and drawing the stratified split. Nothing here knows about models or saved artifacts."""
import errno
import io
import os
import stat
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from plankton import distributed
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, read_csv, save_csv
from plankton.hashing import ContentMemo, sha256_file
from plankton.progress import Progress

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".webp"}  # GIF, WebP: first frame


# ---- the built-in dataset ------------------------------------------------------------------------

def export_digits(folder: Path) -> None:
    """Write scikit-learn's bundled handwritten digits (1,797 images, 8x8) as PNG files, once."""
    from sklearn.datasets import load_digits
    folder = Path(folder)
    if (folder / "COMPLETE").is_file():
        return
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for i, (image, target) in enumerate(zip(pixels, digits.target)):
        class_dir = folder / str(target)
        class_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(class_dir / f"digit_{i:04d}.png") as tmp:
            Image.fromarray(image, mode="L").save(tmp, format="PNG")
    (folder / "COMPLETE").write_text("scikit-learn load_digits, exported by images.py\n")


def data_dir(data_dir_setting: str | None, builtin_dir: str) -> Path:
    """The image folder: DATA_DIR, or the built-in digits (exported on first use)."""
    if data_dir_setting is None:
        export_digits(Path(builtin_dir))
        return Path(builtin_dir).resolve()
    folder = Path(data_dir_setting).expanduser()
    if not folder.is_dir():
        raise PipelineError(f"DATA_DIR={str(data_dir_setting)!r} is not a folder; set DATA_DIR in configfile.py")
    return folder.resolve()


# ---- finding images ------------------------------------------------------------------------------

HIDDEN_FOLDERS = {"__MACOSX", "__pycache__"}  # archive and Python leftovers, never images


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name in HIDDEN_FOLDERS


def printable(name: str) -> str:
    """A file name as text that any CSV writer or terminal accepts: bytes that are not valid UTF-8
    (kept by Python as lone surrogates) are written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def is_valid_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class ClassFiles(NamedTuple):
    images: list[str]  # relative paths of files with an image extension, sorted
    ignored: list[str]  # relative paths of other files
    linked_folders: list[str]  # symbolic links to folders, never followed (they may loop)


def list_class_files(root: Path) -> dict[str, ClassFiles]:
    """{class folder: its files}, hidden files and folders (.*, __MACOSX, __pycache__) left out."""
    return {class_dir.name: list_folder_images(class_dir, relative_to=root)
            for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))}


def list_class_images(root: Path) -> dict[str, list[str]]:
    """{class folder: sorted relative paths of its image files}, hidden files and folders ignored."""
    return {name: files.images for name, files in list_class_files(root).items()}


def list_folder_images(folder: Path, relative_to: Path | None = None) -> ClassFiles:
    """Every file of a folder at any depth (predict.py's new images, or one class folder), split
    into image extensions, other files and linked folders (not followed: they may loop), as paths
    relative to `relative_to` (default: the folder); hidden files and folders left out."""
    base = relative_to or folder
    images, ignored, linked = [], [], []
    for dirpath, dirnames, filenames in os.walk(folder):  # followlinks=False: a linked folder may loop
        where = os.path.relpath(dirpath, base)  # once per folder: relpath per file was most of a 50,000-file walk
        prefix = "" if where == "." else where + os.sep
        linked += [prefix + d for d in dirnames
                   if os.path.islink(os.path.join(dirpath, d)) and not is_hidden(d)]
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for f in filenames:
            if not is_hidden(f):
                is_image = os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
                (images if is_image else ignored).append(prefix + f)
    return ClassFiles(sorted(images), sorted(ignored), sorted(linked))


def print_ignored_files(class_name: str, files: ClassFiles) -> None:
    """One note per class for the files that are not taken as images, so none is dropped silently."""
    if files.ignored:
        extensions = sorted({printable(os.path.splitext(f)[1].lower()) or "(none)" for f in files.ignored})
        count = f"{len(files.ignored)} file{'s' if len(files.ignored) > 1 else ''}"
        print(f"note: class {printable(class_name)}: {count} ignored (not images by extension: "
              f"{', '.join(extensions)})", file=sys.stderr)
    if files.linked_folders:
        print(f"note: class {printable(class_name)}: {len(files.linked_folders)} linked folder(s) not followed "
              f"(a link may loop), e.g. {printable(files.linked_folders[0])}", file=sys.stderr)


def check_classes(found: dict[str, list[str]], seen: list[str], unseen: list[str], root: Path) -> None:
    """Every configured class must be a sub-folder with images, and in one list only."""
    both = sorted(set(seen) & set(unseen))
    if both:
        raise PipelineError(f"{both} listed in both SEEN_CLASSES and UNSEEN_CLASSES; a class is one or the other")
    if len(seen) < 2:
        raise PipelineError("SEEN_CLASSES needs at least two classes to train a classifier")
    for name in list(seen) + list(unseen):
        if name not in found:
            existing = ", ".join(f"{printable(c)} ({len(f)})" for c, f in found.items()) or "none"
            raise PipelineError(f"class {name!r} is not a sub-folder of {root}; sub-folders (images): {existing}")
        if not found[name]:
            raise PipelineError(f"class folder {root / name} holds no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")


def print_class_counts(title: str, classes: list[str], counts: dict[str, int]) -> None:
    total = sum(counts[c] for c in classes)
    print(f"{title}:")
    for c in classes:
        print(f"  {c}: {counts[c]} images ({100.0 * counts[c] / total:.2f}%)")
    print(f"  total: {total} images")


# ---- decoding and resizing -----------------------------------------------------------------------

def load_rgb(path: Path) -> Image.Image:
    """Decode an image fully (a GIF's or WebP's first frame), turn it upright as its EXIF
    orientation says, and return it as 8-bit RGB.

    16-bit and float images are scaled to 8 bits (Pillow's convert would clip them); transparent
    images are composited onto white; CMYK, palette and grayscale go through Pillow's conversion.
    Images over Pillow's decompression-bomb limit raise Image.DecompressionBombWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(img, dtype=np.float64)
                scale = 255.0 / 65535.0 if img.mode != "F" and array.max() > 255 else 1.0
                if img.mode == "F":
                    lo, hi = float(array.min()), float(array.max())
                    array, scale = array - lo, 255.0 / (hi - lo) if hi > lo else 0.0
                return Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8)).convert("RGB")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return img.convert("RGB")


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """"stretch" to size x size, or "pad": shrink or enlarge so the longer side is `size` (aspect
    kept, at least 1 pixel), then centre on a size x size square of the border's median colour.
    Padding after resizing keeps memory at size x size whatever the image's shape."""
    if mode == "stretch":
        return img.resize((size, size), Image.BILINEAR)
    if mode != "pad":
        raise PipelineError(f"RESIZE_MODE={mode!r}; use 'stretch' or 'pad'")
    w, h = img.size
    scale = size / max(w, h)
    fitted = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    array = np.asarray(fitted)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    fill = tuple(int(v) for v in np.median(border, axis=0))
    square = Image.new("RGB", (size, size), fill)
    square.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return square


# ---- checking every image once -------------------------------------------------------------------

SCAN_COLUMNS = ["relpath", "size", "mtime_ns", "ctime_ns", "inode", "reason", "sha256"]


def scan_images(root: Path, relpaths: list[str], cache_file: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Decode every image once and hash its bytes. Returns ({relative path: reason} for the files
    that cannot be used, {relative path: SHA-256 of the file} for every file that could be read).

    Verdict and hash are cached by (path, size, modification time, change time, inode): a file
    rewritten with its old size and modification time restored (cp -p, rsync -a, unzip) still has
    a new change time, which no user can set, so it is decoded and hashed again."""
    cached = _read_scan_cache(cache_file)
    rows, todo, bad = [], [], {}
    for rel in relpaths:
        if not is_valid_utf8(rel):  # no CSV (split, cache, report) could hold the name
            bad[rel] = "file name is not valid UTF-8; rename it"
            continue
        try:
            st = os.stat(os.path.join(root, rel))  # not root / rel: pathlib's parsing, 50,000 times a stage
        except OSError as err:
            bad[rel] = _why_not_found(root / rel, err)
            continue
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.png would block or never end
            bad[rel] = "not a regular file"
            continue
        key = (rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        (rows.append(key + cached[key]) if key in cached else todo.append(key))
    for key in Progress(todo, "checking images", unit="images", min_total=200):
        rows.append(key + _check_image(root / key[0], key[1]))
    if (todo or len(rows) != len(cached)) and distributed.is_main():
        save_csv(pd.DataFrame(rows, columns=SCAN_COLUMNS), cache_file, index=False)
    bad.update({row[0]: row[5] for row in rows if row[5]})
    return bad, {row[0]: row[6] for row in rows if row[6]}


def _read_scan_cache(cache_file: Path) -> Mapping[tuple, tuple[str, str]]:
    """{(relpath, size, mtime_ns, ctime_ns, inode): (reason, sha256)} (read-only); empty if the file
    is missing, unreadable or from an older version (its verdicts are then simply computed again).
    Parsed once per process for the same bytes (run_all.py's stages each scan the images)."""
    try:
        return _SCAN_CACHES.get(cache_file, _parse_scan_cache)[0]
    except OSError:
        return {}


def _parse_scan_cache(data: bytes) -> Mapping[tuple, tuple[str, str]]:
    try:
        old = read_csv(io.BytesIO(data), dtype={"relpath": str, "reason": str, "sha256": str}, keep_default_na=False)
        if list(old.columns) != SCAN_COLUMNS:
            return MappingProxyType({})
        return MappingProxyType({(r.relpath, int(r.size), int(r.mtime_ns), int(r.ctime_ns), int(r.inode)):
                                 (r.reason, r.sha256) for r in old.itertuples()})
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return MappingProxyType({})


_SCAN_CACHES = ContentMemo()  # the scan cache last read, by its bytes


def _why_not_found(path: Path, err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link that loops (points to itself or to a link back to it)"
    if os.path.islink(path):
        return f"broken symbolic link (to {printable(os.readlink(path))})"
    return f"cannot read: {err.strerror}"


def _check_image(path: Path, size: int) -> tuple[str, str]:
    """(reason it cannot be used or "", SHA-256 of its bytes or "" if they cannot be read)."""
    try:
        sha256 = sha256_file(path)
    except OSError as err:
        return f"cannot read: {err.strerror}", ""
    if size == 0:
        return "empty file (0 bytes)", sha256
    try:
        load_rgb(path)
        return "", sha256
    except Image.DecompressionBombWarning as err:
        return f"too large (decompression-bomb limit): {err}", sha256
    except Exception as err:  # truncated, not an image, unsupported
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}", sha256


def usable_images(root: Path, seen: list[str], unseen: list[str], scan_cache: Path, bad_report: Path,
                  bad_images: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({class: readable images} for every configured class, {relative path: SHA-256} of those
    images). Unusable files are listed in `bad_report` and left out (bad_images="skip") or stop
    the run ("error"); files without an image extension are named in one note per class."""
    found = list_class_files(root)
    check_classes({c: f.images for c, f in found.items()}, seen, unseen, root)
    for c in seen + unseen:
        print_ignored_files(c, found[c])
    wanted = [f for c in seen + unseen for f in found[c].images]
    bad, hashes = scan_and_report(root, wanted, scan_cache, bad_report, bad_images)
    usable = {c: [f for f in found[c].images if f not in bad] for c in seen + unseen}
    for c, files in usable.items():
        if not files:
            raise PipelineError(f"class {c!r} has no readable images (see {bad_report})")
    return usable, {f: hashes[f] for files in usable.values() for f in files}


def scan_and_report(root: Path, wanted: list[str], scan_cache: Path, bad_report: Path,
                    bad_images: str) -> tuple[dict[str, str], dict[str, str]]:
    """scan_images, then the unusable files listed in `bad_report` and left out (bad_images="skip")
    or the run stopped ("error"). Returns scan_images' ({path: reason}, {path: SHA-256})."""
    bad, hashes = scan_images(root, wanted, scan_cache)
    if bad:
        report = sorted((printable(rel), reason) for rel, reason in bad.items())
        if distributed.is_main():  # under torchrun rank 0 alone writes (the others find the same files)
            save_csv(pd.DataFrame(report, columns=["relpath", "reason"]), bad_report, index=False)
        if bad_images == "error":
            raise PipelineError(f"{len(bad)} unreadable image(s), listed in {bad_report} "
                                f"(BAD_IMAGES='error'); remove or fix them")
        print(f"warning: {len(bad)} unreadable image(s) left out; see {bad_report}", file=sys.stderr)
    return bad, hashes


# ---- the split -----------------------------------------------------------------------------------

SPLIT_COLUMNS = ["relpath", "class_name", "subset", "sha256"]


def draw_split(seen: dict[str, list[str]], unseen: dict[str, list[str]], hashes: dict[str, str],
               val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Split each seen class into train/val/test by the given fractions (stratified); the unseen
    classes' images all go to "unseen". Columns: relpath, class_name, subset, sha256 (of each
    file's bytes, from `hashes`, so a later run can tell an image that was replaced)."""
    rng = np.random.default_rng(seed)
    rows = []
    for class_name, files in seen.items():
        n = len(files)
        if n < 3:
            raise PipelineError(f"class {class_name!r} has {n} usable image(s); a seen class needs at least 3 "
                                f"(one each for train, validation and test)")
        n_test = max(1, int(round(test_fraction * n)))
        n_val = max(1, int(round(val_fraction * n)))
        if n - n_test - n_val < 1:
            n_test, n_val = 1, 1
        order = rng.permutation(n)
        subset = np.array(["train"] * n, dtype=object)
        subset[order[:n_test]] = "test"
        subset[order[n_test:n_test + n_val]] = "val"
        rows += [(f, class_name, s, hashes[f]) for f, s in zip(files, subset)]
    for class_name, files in unseen.items():
        rows += [(f, class_name, "unseen", hashes[f]) for f in files]
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


THUMBNAIL = 160  # pixels: longest side of an image in the sample grid


def thumbnail(path) -> np.ndarray:
    image = load_rgb(path)
    image.thumbnail((THUMBNAIL, THUMBNAIL), Image.BILINEAR)
    return np.asarray(image)
