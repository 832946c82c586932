"""Finding, checking, decoding and splitting images (images.py, splits.prepare_split)."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image_folder, tiny_config
from PIL import Image, ImageFile

import train
from plankton import fileio, hashing, images, locations, splits
from plankton.errors import PipelineError


def test_builtin_digits_export_real_images(tmp_path):
    cfg = tiny_config(tmp_path)
    root = images.data_dir(cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR)
    classes = images.list_class_images(root)
    assert sorted(classes) == [str(d) for d in range(10)]
    assert sum(len(v) for v in classes.values()) == 1797  # scikit-learn's bundled digits
    assert Image.open(root / classes["3"][0]).size == (8, 8)


def test_split_is_stratified_disjoint_persisted_and_reread(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 40, "b": 60, "c": 20, "u": 5, "v": 5})
    cfg = tiny_config(tmp_path, folder)
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    table = split.table
    assert not table.relpath.duplicated().any()  # every image in exactly one subset
    for name, n in (("a", 40), ("b", 60), ("c", 20)):
        part = table[table.class_name == name].subset.value_counts()
        assert part["test"] == round(0.2 * n) and part["val"] == max(1, round(0.05 * n))
        assert part["train"] == n - part["test"] - part["val"]
    assert (table[table.class_name.isin(["u", "v"])].subset == "unseen").all()
    first_bytes = paths.split.read_bytes()
    again = splits.split_from_settings(tiny_config(tmp_path, folder, SEED=123), paths, create=True)
    assert paths.split.read_bytes() == first_bytes  # re-read, never re-drawn (even with another seed)
    assert again.sha256 == split.sha256


def test_split_of_small_classes_keeps_one_image_in_each_subset(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 3, "b": 10, "c": 4, "u": 1, "v": 2})
    cfg = tiny_config(tmp_path, folder)
    split = splits.split_from_settings(cfg, locations.prepare_output_dirs(cfg), create=True)
    counts = split.table.groupby(["class_name", "subset"]).size()
    for name in "abc":
        assert all(counts[(name, s)] >= 1 for s in ("train", "val", "test"))


def test_pad_mode_keeps_the_shape_and_fills_with_the_border_colour():
    image = Image.new("RGB", (40, 10), (200, 10, 10))
    image.paste((0, 0, 255), (18, 3, 22, 7))
    padded = np.asarray(images.resize(image, 40, "pad"))
    stretched = np.asarray(images.resize(image, 40, "stretch"))
    assert tuple(padded[0, 0]) == (200, 10, 10) and tuple(padded[20, 20]) == (0, 0, 255)
    assert (stretched[:, :, 2] > 128).sum() > 3 * (padded[:, :, 2] > 128).sum()  # stretch smears the spot


def test_an_image_over_the_decompression_bomb_limit_is_rejected_by_path(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 24 * 24 - 1)  # our 24 x 24 images count as "too large"
    relpaths = ["a/img_000.png"]
    bad, _ = images.scan_images(tiny_folder, relpaths, tmp_path / "scan.csv")
    assert list(bad) == relpaths and "decompression-bomb" in bad["a/img_000.png"]


def _jpeg_bytes(size=64, seed=0) -> bytes:
    import io
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _odd_files(class_dir: Path) -> dict[str, str]:
    """Write odd files into a class folder; return {file name: 'bad' or 'good'}."""
    full = _jpeg_bytes()
    (class_dir / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (class_dir / "empty.jpg").write_bytes(b"")
    (class_dir / "notes.png").write_text("this is a text file, not a PNG\n")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(class_dir / "cmyk.jpg")  # red in CMYK
    gradient = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(gradient).save(class_dir / "deep16.png")
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 2], rgba[:10, :, 3] = 255, 255  # blue, top half opaque, bottom half transparent
    Image.fromarray(rgba, mode="RGBA").save(class_dir / "rgba.png")
    Image.fromarray(np.full((20, 20), 90, dtype=np.uint8), mode="L").save(class_dir / "gray.tif")
    hidden = class_dir / ".ipynb_checkpoints"
    hidden.mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(hidden / "copy.png")
    (class_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    return {"truncated.jpg": "bad", "empty.jpg": "bad", "notes.png": "bad", "cmyk.jpg": "good",
            "deep16.png": "good", "rgba.png": "good", "gray.tif": "good"}


@pytest.fixture
def odd_folder(tmp_path):
    folder = make_image_folder(tmp_path / "images", {"a": 8, "b": 8, "c": 8, "u": 4, "v": 4})
    kinds = _odd_files(folder / "a")
    (folder / ".ipynb_checkpoints").mkdir()  # a hidden folder at the top is never a class
    Image.new("RGB", (20, 20)).save(folder / ".ipynb_checkpoints" / "img.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return folder, kinds


def test_hidden_files_and_folders_are_never_classes_or_images(odd_folder):
    folder, kinds = odd_folder
    found = images.list_class_images(folder)
    assert sorted(found) == ["a", "b", "c", "u", "v"]
    names = {Path(p).name for p in found["a"]}
    assert names == {f"img_{j:03d}.png" for j in range(8)} | set(kinds)
    assert not any(".ipynb_checkpoints" in p or ".DS_Store" in p for files in found.values() for p in files)


def test_load_rgb_converts_odd_modes_to_8_bit_rgb(odd_folder):
    folder, _ = odd_folder
    deep = images.load_rgb(folder / "a" / "deep16.png")
    array = np.asarray(deep)
    assert deep.mode == "RGB" and array.dtype == np.uint8
    assert array.max() == 255 and array.min() == 0
    assert (array == 255).mean() < 0.05, "16-bit values were clipped to white instead of scaled"
    gray16 = np.linspace(0, 65535, 24 * 24).reshape(24, 24)
    np.testing.assert_allclose(array[..., 0], np.round(gray16 * 255 / 65535), atol=1)
    cmyk = np.asarray(images.load_rgb(folder / "a" / "cmyk.jpg"))
    assert cmyk.shape == (20, 20, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60
    rgba = np.asarray(images.load_rgb(folder / "a" / "rgba.png"))
    assert tuple(rgba[0, 0]) == (0, 0, 255) and tuple(rgba[-1, -1]) == (255, 255, 255)  # onto white
    gray = images.load_rgb(folder / "a" / "gray.tif")
    assert gray.mode == "RGB" and tuple(np.asarray(gray)[5, 5]) == (90, 90, 90)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_unreadable_images_are_left_out_and_reported(tmp_path, odd_folder):
    folder, kinds = odd_folder
    cfg = tiny_config(tmp_path, folder)
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    bad = {f"a/{name}" for name, kind in kinds.items() if kind == "bad"}
    good = {f"a/{name}" for name, kind in kinds.items() if kind == "good"}
    in_split = set(split.table.relpath)
    assert not bad & in_split
    assert good <= in_split
    assert not any("ipynb" in p or "DS_Store" in p for p in in_split)
    report = pd.read_csv(paths.bad_images, keep_default_na=False)
    assert list(report.columns) == ["relpath", "reason"]
    assert set(report.relpath) == bad
    reasons = dict(zip(report.relpath, report.reason))
    assert all(reasons.values())
    assert "empty" in reasons["a/empty.jpg"] and "truncated" in reasons["a/truncated.jpg"].lower()
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bad_images_error_setting_stops_the_split(tmp_path, odd_folder):
    folder, _ = odd_folder
    cfg = tiny_config(tmp_path, folder, BAD_IMAGES="error")
    paths = locations.prepare_output_dirs(cfg)
    with pytest.raises(PipelineError, match="unreadable image"):
        splits.split_from_settings(cfg, paths, create=True)
    assert not paths.split.exists()
    assert len(pd.read_csv(paths.bad_images)) == 3


def test_scan_is_cached_and_rescans_only_changed_files(tmp_path, odd_folder, monkeypatch):
    folder, _ = odd_folder
    cfg = tiny_config(tmp_path, folder)
    paths = locations.prepare_output_dirs(cfg)
    calls = []
    real = images.load_rgb
    monkeypatch.setattr(images, "load_rgb", lambda path: (calls.append(Path(path).name), real(path))[1])
    first = splits.split_from_settings(cfg, paths, create=True)
    n_files = sum(len(v) for v in images.list_class_images(folder).values())
    assert len(calls) == n_files - 1  # every file decoded once, except the 0-byte one (no decode needed)
    assert list((tmp_path / "cache").glob("scan_*.csv"))
    calls.clear()
    second = splits.split_from_settings(cfg, paths, create=False)
    assert calls == [], f"the second scan decoded {calls}"
    assert second.sha256 == first.sha256
    assert len(pd.read_csv(paths.bad_images)) == 3  # the cached verdicts still leave the bad files out
    # an edited image is decoded again, and only that one; the split then refuses it as modified
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "a" / "img_000.png")
    os.utime(folder / "a" / "img_000.png", ns=(1, 1))
    with pytest.raises(PipelineError, match="1 modified"):
        splits.split_from_settings(cfg, paths, create=False)
    assert calls == ["img_000.png"]


def test_empty_class_folder_is_named(tmp_path, odd_folder):
    folder, _ = odd_folder
    (folder / "w").mkdir()
    cfg = tiny_config(tmp_path, folder, UNSEEN_CLASSES=["u", "w"])
    with pytest.raises(PipelineError) as error:
        splits.split_from_settings(cfg, locations.prepare_output_dirs(cfg), create=True)
    assert str(folder / "w") in str(error.value)


def test_class_folder_holding_only_unreadable_files_is_named(tmp_path, odd_folder):
    folder, _ = odd_folder
    (folder / "w").mkdir()
    (folder / "w" / "broken.png").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "w" / ".hidden.png")  # hidden: does not count
    cfg = tiny_config(tmp_path, folder, UNSEEN_CLASSES=["u", "w"])
    with pytest.raises(PipelineError, match="'w'"):
        splits.split_from_settings(cfg, locations.prepare_output_dirs(cfg), create=True)


def test_truncated_images_stay_refused_after_every_module_is_imported():
    import run_all  # noqa: F401  (imports every stage)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("settings, message", [
    (dict(DATA_DIR="/no/such/folder"), "is not a folder"),
    (dict(SEEN_CLASSES=["a", "bb", "c"]), "'bb' is not a sub-folder"),
    (dict(UNSEEN_CLASSES=["a", "u"]), "in both SEEN_CLASSES and UNSEEN_CLASSES"),
    (dict(SEEN_CLASSES=["a"]), "at least two classes"),
])
def test_bad_settings_stop_training_before_anything_is_written(tmp_path, tiny_folder, settings, message):
    cfg = tiny_config(tmp_path, tiny_folder, **settings)
    with pytest.raises(PipelineError, match=message):
        train.run(cfg)
    assert not (tmp_path / "outputs" / "split.csv").exists() and not (tmp_path / "checkpoints" / "best.pth").exists()


def test_misspelt_class_lists_the_folders_that_exist(tmp_path, tiny_folder):
    with pytest.raises(PipelineError) as error:
        train.run(tiny_config(tmp_path, tiny_folder, SEEN_CLASSES=["a", "B", "c"]))
    assert "a (16), b (16), c (16), u (12), v (12)" in str(error.value)



# ---- hostile inputs ------------------------------------------------------------------------------

def _png_bytes(colour=(10, 200, 10)) -> bytes:
    import io
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_broken_links_and_names_that_are_not_utf8_are_reported_not_crashed(tmp_path, tiny_folder, capsys):
    a = tiny_folder / "a"
    os.symlink("nowhere.png", a / "gone.png")
    os.symlink("loop.png", a / "loop.png")
    os.symlink("img_000.png", a / "alias.png")  # a link to a real image is an image
    os.symlink("..", a / "up")  # a folder link that loops: never followed
    os.symlink("self", tiny_folder / "self")  # a class folder that is a loop: not a class
    fd = os.open(os.fsencode(a) + b"/\xff.png", os.O_WRONLY | os.O_CREAT)  # a valid PNG, but its name cannot be stored
    os.write(fd, _png_bytes())
    os.close(fd)
    cfg = tiny_config(tmp_path, tiny_folder)
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    reasons = dict(pd.read_csv(paths.bad_images, keep_default_na=False).itertuples(index=False))
    assert sorted(reasons) == ["a/\\xff.png", "a/gone.png", "a/loop.png"]
    assert "broken symbolic link" in reasons["a/gone.png"] and "loops" in reasons["a/loop.png"]
    assert "not valid UTF-8" in reasons["a/\\xff.png"]
    assert "a/alias.png" in set(split.table.relpath) and len(split.table) == 16 * 3 + 12 * 2 + 1
    for written in [paths.split, paths.bad_images, *(tmp_path / "cache").glob("scan_*.csv")]:
        written.read_bytes().decode("utf-8")  # every CSV is valid UTF-8
    assert "linked folder(s) not followed" in capsys.readouterr().err
    splits.split_from_settings(cfg, paths, create=False)  # the cached scan reads back


def test_names_starting_with_double_underscore_are_images_unless_archive_leftovers(tmp_path, tiny_folder):
    (tiny_folder / "a" / "__img.png").write_bytes(_png_bytes())
    for leftover in (tiny_folder / "__MACOSX" / "a", tiny_folder / "a" / "__MACOSX", tiny_folder / "a" / "__pycache__"):
        leftover.mkdir(parents=True)
        (leftover / "img.png").write_bytes(_png_bytes())
    found = images.list_class_images(tiny_folder)
    assert sorted(found) == ["a", "b", "c", "u", "v"]
    assert "a/__img.png" in found["a"] and len(found["a"]) == 17


def test_gif_and_webp_are_images_and_other_files_are_named_in_a_note(tmp_path, tiny_folder, capsys):
    a = tiny_folder / "a"
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (20, 20), (0, 250, 0)).save(a / "pic.webp", lossless=True)
    for name in ("notes.txt", "labels.csv", "more.TXT", "README"):
        (a / name).write_text("not an image\n")
    cfg = tiny_config(tmp_path, tiny_folder)
    split = splits.split_from_settings(cfg, locations.prepare_output_dirs(cfg), create=True)
    assert {"a/anim.gif", "a/pic.webp"} <= set(split.table.relpath)
    assert tuple(np.asarray(images.load_rgb(a / "anim.gif"))[5, 5]) == (250, 0, 0)  # the first frame
    assert tuple(np.asarray(images.load_rgb(a / "pic.webp"))[5, 5]) == (0, 250, 0)
    err = capsys.readouterr().err
    assert "note: class a: 4 files ignored (not images by extension: (none), .csv, .txt)" in err
    assert "note: class b" not in err


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (120, 30, 30)).save(tmp_path / "turned.jpg", exif=exif)
    assert Image.open(tmp_path / "turned.jpg").size == (40, 20)
    assert images.load_rgb(tmp_path / "turned.jpg").size == (20, 40)


def test_pad_mode_resizes_before_padding_and_stretch_is_unchanged(monkeypatch):
    real_new = Image.new

    def small_new(mode, size, *args, **kwargs):
        assert size[0] * size[1] <= 10 ** 6, f"allocated a {size} canvas"
        return real_new(mode, size, *args, **kwargs)

    monkeypatch.setattr(Image, "new", small_new)
    line = real_new("RGB", (100000, 1), (200, 10, 10))
    padded = images.resize(line, 32, "pad")
    assert padded.size == (32, 32) and tuple(np.asarray(padded)[16, 16]) == (200, 10, 10)
    tall = real_new("RGB", (10, 100), (0, 0, 255))
    tall.paste((255, 255, 255), (0, 0, 10, 3))  # a white top edge: most of the border stays blue
    array = np.asarray(images.resize(tall, 50, "pad"))
    assert tuple(array[25, 0]) == (0, 0, 255) and tuple(array[25, 25]) == (0, 0, 255)
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
    for size in (16, 32):  # "stretch" (the default) is what it always was
        assert images.resize(noise, size, "stretch").tobytes() == noise.resize((size, size), Image.BILINEAR).tobytes()


def test_an_image_replaced_with_its_old_size_and_time_is_caught(tmp_path, tiny_folder):
    import time
    a = tiny_folder / "a"
    Image.new("RGB", (24, 24), (1, 2, 3)).save(a / "extra.bmp")  # BMP: same size on disk for any pixels
    cfg = tiny_config(tmp_path, tiny_folder)
    paths = locations.prepare_output_dirs(cfg)
    paths.scan_cache(tiny_folder).write_text("relpath,size,mtime_ns,reason\na/extra.bmp,1,1,\n")  # an old cache
    split = splits.split_from_settings(cfg, paths, create=True)
    relpaths = split.subset("train")[0] + split.subset("test")[0]
    file_hashes = [hashing.sha256_file(tiny_folder / p) for p in relpaths]
    split_bytes = paths.split.read_bytes()
    before = os.stat(a / "extra.bmp")
    time.sleep(0.05)  # file times tick every few milliseconds
    Image.new("RGB", (24, 24), (200, 2, 3)).save(a / "extra.bmp")  # what cp -p / rsync -a / unzip do
    os.utime(a / "extra.bmp", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(a / "extra.bmp").st_size == before.st_size
    with pytest.raises(PipelineError) as error:
        splits.split_from_settings(cfg, paths, create=False)
    message = str(error.value)
    assert "\n" not in message and "1 modified" in message and "a/extra.bmp" in message
    assert paths.split.read_bytes() == split_bytes
    assert split.hashes("train") + split.hashes("test") == file_hashes  # in the order of subset()


def _edit_split(table: pd.DataFrame, edit: str) -> pd.DataFrame:
    """One kind of damage to a split table; returns the damaged copy."""
    table = table.copy()
    first_val_a = table.index[(table.class_name == "a") & (table.subset == "val")][0]
    if edit == "no sha256 column":
        return table.drop(columns="sha256")
    if edit == "extra column":
        return table.assign(note="x")
    if edit == "unknown subset":
        table.loc[5, "subset"] = "training"
    elif edit == "duplicated row":
        table = pd.concat([table, table.iloc[[3]]], ignore_index=True)
    elif edit == "relabelled image":
        table.loc[table.index[table.class_name == "a"][0], "class_name"] = "b"
    elif edit == "seen class without val":
        table.loc[table.class_name == "a", "subset"] = table.subset.replace("val", "train")
    elif edit == "unseen class in train":
        table.loc[table.index[table.class_name == "u"][0], "subset"] = "train"
    elif edit == "not a sha256":
        table.loc[first_val_a, "sha256"] = "abc"
    return table


@pytest.mark.parametrize("edit, message", [
    ("no sha256 column", "predates content fingerprints"),
    ("extra column", "has columns"),
    ("unknown subset", r"line 7 \('a/.*'\): subset 'training'"),
    ("duplicated row", "line 74 .* listed a second time"),
    ("relabelled image", r"line 2 \('a/img_000.png'\): class_name 'b' is not the image's folder"),
    ("seen class without val", "seen class 'a' has no val image"),
    ("unseen class in train", r"line \d+ \('u/.*'\): class 'u' is also in 'unseen'"),
    ("not a sha256", r"line \d+ .*: sha256 'abc' is not a SHA-256"),
])
def test_a_damaged_split_file_is_refused_in_one_line_and_left_alone(tmp_path, tiny_cfg, edit, message):
    paths = locations.prepare_output_dirs(tiny_cfg)
    splits.split_from_settings(tiny_cfg, paths, create=True)
    fileio.save_csv(_edit_split(pd.read_csv(paths.split, dtype=str), edit), paths.split, index=False)
    damaged = paths.split.read_bytes()
    with pytest.raises(PipelineError, match=message) as error:
        splits.split_from_settings(tiny_cfg, paths, create=True)
    assert "\n" not in str(error.value) and str(paths.split) in str(error.value)
    assert ("delete" in str(error.value)) and paths.split.read_bytes() == damaged
