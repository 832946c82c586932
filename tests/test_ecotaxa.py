"""EcoTaxa exports (plankton/ecotaxa.py): the reader on hand-written exports (every kind of bad row
listed with its reason, latin-1 and UTF-8 with BOM, the types row, a zip with a '..' member), the
status filter and the minimum count, a tiny train + evaluate on an export, bad settings as one
error line, and predict.py's ecotaxa_import.tsv read back by the same reader."""
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config
from PIL import Image

from plankton import ecotaxa, locations, splits
from plankton.errors import PipelineError

HEADER = ["object_id", "img_file_name", "object_annotation_category", "object_annotation_status", "sample_id",
          "object_area"]
TYPES = ["[t]", "[t]", "[t]", "[t]", "[t]", "[f]"]


def tiny_image(path: Path, colour: int, seed: int, size: int = 24) -> None:
    """Noise with a bright square whose place and colour depend on `colour` (the class)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (size, size, 3))
    corner = (colour * 5) % (size - 8)
    image[corner:corner + 6, corner:corner + 6] = [(37 * colour) % 256, (91 * colour + 80) % 256, 200]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(path)


def write_tsv(path: Path, rows: list[list], encoding: str = "utf-8", header=HEADER, types=TYPES) -> Path:
    lines = ["\t".join(header)] + (["\t".join(types)] if types else []) + ["\t".join(map(str, r)) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return path


def tiny_export(root: Path, per_class: dict[str, int], statuses=("validated", "validated", "predicted")) -> Path:
    """One object per image: class i's images in images/<class>_<j>.png, statuses cycling through
    `statuses`, samples of 5 objects. Returns the TSV's path."""
    rows = []
    for i, (name, count) in enumerate(per_class.items()):
        for j in range(count):
            relpath = f"images/{name}_{j:03d}.png"
            tiny_image(root / relpath, i, seed=100 * i + j)
            rows.append([f"obj_{name}_{j}", relpath, name, statuses[j % len(statuses)], f"s{j // 5}", 1.5])
    return write_tsv(root / "export.tsv", rows)


# ---- the reader ------------------------------------------------------------------------------------

def test_every_kind_of_bad_row_is_listed_with_its_reason(tmp_path):
    root = tmp_path / "export"
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png"):
        tiny_image(root / "img" / name, 0, seed=len(name))
    (tmp_path / "outside.png").write_bytes((root / "img" / "a.png").read_bytes())
    (root / "img" / "link").symlink_to(tmp_path)
    (root / "img" / "notes.txt").write_text("not an image")
    write_tsv(root / "export.tsv", [
        ["o1", "img/a.png", "Copepoda", "validated", "s1", 1],  # good
        ["o2", "img/missing.png", "Copepoda", "validated", "s1", 1],
        ["o1", "img/b.png", "Copepoda", "validated", "s1", 1],
        ["o3", "img/c.png", "Copepoda", "checked", "s1", 1],
        ["o4", "img/d.png", "", "validated", "s1", 1],
        ["o5", "../outside.png", "Copepoda", "validated", "s1", 1],
        ["o6", "/etc/passwd.png", "Copepoda", "validated", "s1", 1],
        ["o7", "img/link/outside.png", "Copepoda", "validated", "s1", 1],
        ["o8", "img/notes.txt", "Copepoda", "validated", "s1", 1],
        ["", "img/e.png", "Copepoda", "validated", "s1", 1],
        ["o9", "img/./a.png", "Copepoda", "predicted", "s1", 1],
        ["o10", "img/f.png", "detritus", "dubious", "s2", 1],  # good
    ])
    objects, bad = ecotaxa.read_objects(ecotaxa.locate(str(root / "export.tsv"), tmp_path / "cache"))
    assert list(objects.object_id) == ["o1", "o10"]
    assert list(objects.sample_id) == ["s1", "s2"] and list(objects.status) == ["validated", "dubious"]
    reasons = dict(zip(bad.line, bad.reason))
    assert reasons[4] == "missing image"
    assert reasons[5] == "duplicate object_id (first on export.tsv line 3)"
    assert reasons[6].startswith("unknown status 'checked'")
    assert reasons[7] == "empty object_annotation_category"
    assert "leaves the export folder" in reasons[8] and "leaves the export folder" in reasons[9]
    assert "outside the export folder through a symbolic link" in reasons[10]
    assert reasons[11].startswith("not an image by its extension")
    assert reasons[12] == "empty object_id"
    assert reasons[13] == "the image is already the image of object_id 'o1'"
    assert len(bad) == 10 and list(bad.columns) == ecotaxa.BAD_ROW_COLUMNS


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8-sig", "utf-8"])
def test_latin1_and_utf8_with_or_without_bom_are_read(tmp_path, encoding):
    root = tmp_path / "export"
    tiny_image(root / "x.png", 0, seed=0)
    tsv = write_tsv(root / "export.tsv", [["o1", "x.png", "Cératium", "validated", "Station é", 2.5]], encoding)
    table, types = ecotaxa.read_tsv(tsv)
    assert list(table.columns) == HEADER and types["object_area"] == "[f]" and types["object_id"] == "[t]"
    assert table.object_annotation_category[0] == "Cératium" and table.sample_id[0] == "Station é"


@pytest.mark.parametrize("header, types, words", [
    (HEADER, None, "row 2 must be the types row"),
    (HEADER, ["[t]", "[t]", "[t]", "[t]", "[t]", "[x]"], "row 2 must be the types row"),
    (["path", "labels"], ["[t]", "[t]"], "column 'path' is not an EcoTaxa name"),
    (["Object_ID"] + HEADER[1:], TYPES, "column 'Object_ID' is not an EcoTaxa name"),
    (HEADER[1:], TYPES[1:], "no column 'object_id'"),
])
def test_a_file_that_is_not_an_ecotaxa_tsv_is_one_error(tmp_path, header, types, words):
    tsv = write_tsv(tmp_path / "export.tsv", [["o1", "x.png", "A", "validated", "s", 1][:len(header)]],
                    header=header, types=types)
    with pytest.raises(PipelineError) as caught:
        ecotaxa.read_tsv(tsv)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_zip_is_unpacked_into_the_cache_and_one_with_a_dotdot_member_is_refused(tmp_path):
    tsv = tiny_export(tmp_path / "export", {"a": 2})
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zipped:
        zipped.write(tsv, "export.tsv")
        for image in sorted((tmp_path / "export" / "images").iterdir()):
            zipped.write(image, f"images/{image.name}")
    export = ecotaxa.locate(str(good), tmp_path / "cache")
    assert export.root.is_relative_to(tmp_path / "cache") and len(ecotaxa.read_objects(export)[0]) == 2
    for name in ("../evil.tsv", "/tmp/evil.tsv", "images/../../evil.tsv"):
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as zipped:
            zipped.write(tsv, "export.tsv")
            zipped.writestr(name, "object_id\n")
        with pytest.raises(PipelineError, match="outside the folder it is unpacked into"):
            ecotaxa.locate(str(bad), tmp_path / "cache2")
        assert not (tmp_path / "evil.tsv").exists() and not (tmp_path / "cache2").exists()


# ---- the listing a split is drawn from ---------------------------------------------------------------

def test_statuses_are_filtered_and_the_minimum_count_applied(tmp_path):
    tsv = tiny_export(tmp_path / "export", {"a": 9, "b": 9, "c": 6, "u": 6, "v": 6})
    cfg = tiny_config(tmp_path, None, ECOTAXA_EXPORT=str(tsv), ECOTAXA_MIN_COUNT=3)
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    objects = pd.read_csv(paths.out / "ecotaxa_objects.csv", dtype=str)
    assert set(split.table.relpath) == set(objects.relpath[objects.status == "validated"])
    assert len(split.table) == 6 + 6 + 4 + 4 + 4  # two of every three objects are validated
    cfg.ECOTAXA_STATUSES = ["validated", "predicted"]
    usable, _ = ecotaxa.usable_objects(ecotaxa.selection_from_settings(cfg), ["a", "b", "c"], ["u", "v"],
                                       paths.scan_cache(split.root), paths.out, "skip", report=False)
    assert {c: len(f) for c, f in usable.items()} == {"a": 9, "b": 9, "c": 6, "u": 6, "v": 6}
    cfg.ECOTAXA_STATUSES, cfg.ECOTAXA_MIN_COUNT = ["validated"], 5
    with pytest.raises(PipelineError, match="class 'c' has 4 with status validated .*ECOTAXA_MIN_COUNT=5.*"
                                            "enough: a \\(6\\), b \\(6\\)$"):
        splits.split_from_settings(cfg, paths, create=True)
    cfg.SEEN_CLASSES, cfg.ECOTAXA_MIN_COUNT = ["a", "zebra"], 3
    with pytest.raises(PipelineError, match="class 'zebra' is not a category there.* a \\(6\\), b \\(6\\), c \\(4\\)"):
        splits.split_from_settings(cfg, paths, create=True)


def test_a_relabelled_object_after_the_split_is_drawn_stops_the_run(tmp_path):
    tsv = tiny_export(tmp_path / "export", {"a": 6, "b": 6, "c": 6, "u": 3, "v": 3}, statuses=("validated",))
    cfg = tiny_config(tmp_path, None, ECOTAXA_EXPORT=str(tsv), ECOTAXA_MIN_COUNT=3)
    paths = locations.prepare_output_dirs(cfg)
    splits.split_from_settings(cfg, paths, create=True)
    tsv.write_text(tsv.read_text().replace("obj_a_0\timages/a_000.png\ta", "obj_a_0\timages/a_000.png\tb"))
    with pytest.raises(PipelineError, match="1 relabelled, e.g. 'images/a_000.png' \\(relabelled\\)"):
        splits.split_from_settings(cfg, paths, create=False)


def test_the_demo_export_has_its_four_bad_rows_and_the_default_classes(tmp_path):
    tsv = ecotaxa.export_digits_demo(tmp_path / "demo")
    objects, bad = ecotaxa.read_objects(ecotaxa.locate(str(tsv), tmp_path / "cache"))
    assert len(bad) == 4 and bad.reason.str.contains("missing image|duplicate|unknown status|empty").all()
    assert set(objects.status) == {"validated", "predicted", "dubious"}
    counts = objects[objects.status == "validated"].category.value_counts()
    assert sorted(counts.index) == [str(d) for d in range(10)] and counts.min() >= 10
    assert len(objects) + len(bad) == 1797 + 4


# ---- through the scripts -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_on_export(tmp_path_factory):
    """A tiny model trained on a tiny export (two of every three objects validated): (cfg, folder)."""
    import train
    tmp_path = tmp_path_factory.mktemp("trained")
    tsv = tiny_export(tmp_path / "export", {"a": 15, "b": 15, "c": 15, "u": 6, "v": 6})
    cfg = tiny_config(tmp_path, None, ECOTAXA_EXPORT=str(tsv), ECOTAXA_MIN_COUNT=3, MAX_EPOCHS=2)
    train.run(cfg)
    return cfg, tmp_path


def test_train_and_evaluate_on_an_export_use_the_validated_objects_only(trained_on_export):
    import evaluate
    cfg, _ = trained_on_export
    evaluate.run(cfg)
    out = Path(cfg.OUTPUT_DIR)
    split = pd.read_csv(out / "split.csv", dtype=str)
    objects = pd.read_csv(out / "ecotaxa_objects.csv", dtype=str).set_index("relpath")
    assert (objects.loc[split.relpath, "status"] == "validated").all()
    assert (objects.loc[split.relpath, "category"].to_numpy() == split.class_name.to_numpy()).all()
    assert len(split) == len(objects[objects.status == "validated"]) and len(objects) > len(split)
    predictions = pd.read_csv(out / "test_predictions.csv", dtype=str)
    assert set(predictions.path) == set(split.relpath[split.subset == "test"])


def test_predict_writes_an_ecotaxa_import_that_the_reader_reads_back(trained_on_export):
    import predict
    cfg, tmp_path = trained_on_export
    new = tmp_path / "new"
    for j in range(6):
        tiny_image(new / "station_1" / f"n{j}.png", j % 3, seed=1000 + j)
    tiny_image(new / "loose.png", 1, seed=2000)
    # two of the new images come with an EcoTaxa TSV: their object_id and sample_id are kept
    write_tsv(new / "station_1" / "objects.tsv", [["ext_0", "n0.png", "a", "predicted", "cruise_7", 1],
                                                  ["ext_1", "n1.png", "b", "predicted", "cruise_7", 1]])
    predict.run(tiny_config(tmp_path, None, **{k: getattr(cfg, k) for k in ("ECOTAXA_EXPORT", "ECOTAXA_MIN_COUNT",
                                                                          "MAX_EPOCHS")},
                            PREDICT_DIR=str(new), ECOTAXA_IMPORT_ZIP=True))
    folder = Path(cfg.OUTPUT_DIR) / "predictions"
    predictions = pd.read_csv(folder / "predictions.csv", dtype=str).set_index("path")
    raw = (folder / "ecotaxa_import.tsv").read_text(encoding="utf-8").splitlines()
    header, types = raw[0].split("\t"), raw[1].split("\t")
    assert all(n == n.lower() and n.startswith(ecotaxa.PREFIXES) for n in header)
    assert dict(zip(header, types))["object_score"] == "[f]" and dict(zip(header, types))["object_id"] == "[t]"
    assert all(len(cell) <= ecotaxa.MAX_VALUE for line in raw for cell in line.split("\t"))
    export = ecotaxa.locate(str(folder / "ecotaxa_import.zip"), tmp_path / "readback")
    objects, bad = ecotaxa.read_objects(export)  # every image found beside the TSV in the zip
    assert bad.empty and len(objects) == len(predictions) == 7
    table, read_types = ecotaxa.read_tsv(export.tsvs[0])
    assert read_types == ecotaxa.IMPORT_TYPES and (table.object_annotation_status == "predicted").all()
    table = table.set_index("img_file_name")
    assert (table.object_annotation_category == predictions.loc[table.index, "predicted_class"]).all()
    assert (table.object_unknown.astype(int) == (predictions.loc[table.index, "unknown"] == "True")).all()
    assert np.allclose(table.object_score.astype(float), predictions.loc[table.index, "top1_score"].astype(float),
                       atol=1e-5)
    assert table.loc["station_1/n0.png", "object_id"] == "ext_0"
    assert table.loc["station_1/n1.png", "sample_id"] == "cruise_7"
    assert table.loc["station_1/n2.png", "object_id"] == "station_1_n2" and table.loc["loose.png", "sample_id"] == "new"
    assert table.object_id.is_unique
    record = (Path(cfg.OUTPUT_DIR) / "provenance_predict.json").read_text()
    assert "predictions/ecotaxa_import.tsv" in record and "predictions/ecotaxa_import.zip" in record


@pytest.mark.parametrize("argument, words", [
    ("--ECOTAXA_EXPORT=/no/such/export.tsv", "ECOTAXA_EXPORT='/no/such/export.tsv': no such file or folder"),
    ("--ECOTAXA_STATUSES=['validated', 'checked']", "'checked' is not one of 'predicted', 'validated'"),
])
def test_a_bad_ecotaxa_setting_is_one_error_line(tmp_path, capsys, argument, words):
    import train
    with pytest.raises(SystemExit) as stopped:
        train.main([argument, f"--OUTPUT_DIR={tmp_path / 'o'}", f"--CHECKPOINT_DIR={tmp_path / 'c'}",
                    f"--CACHE_DIR={tmp_path / 'k'}"])
    assert stopped.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_not_an_export_through_the_script_is_one_error_line(tmp_path, capsys):
    import train
    tsv = write_tsv(tmp_path / "data" / "export.tsv", [["o1", "x.png", "a", "validated", "s", 1]], types=None)
    with pytest.raises(SystemExit) as stopped:
        train.main([f"--ECOTAXA_EXPORT={tsv}", f"--OUTPUT_DIR={tmp_path / 'o'}", f"--CHECKPOINT_DIR={tmp_path / 'c'}",
                    f"--CACHE_DIR={tmp_path / 'k'}"])
    assert stopped.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: EcoTaxa TSV") and "types row" in err[0]
