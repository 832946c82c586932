"""report.py on a small made-up output folder (no pipeline run, no browser): one self-contained page
with every section, the stages' figures and tables, and the UMAP's thumbnails inside its Bokeh data."""
import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from conftest import made_up_checkpoint, make_image_folder, tiny_config
from PIL import Image

import report
import verify
from plankton import fileio, hashing, locations, provenance, registry


def _png(path, width=60, height=40, value=90):
    Image.fromarray(np.full((height, width, 3), value, dtype=np.uint8)).save(path)


@pytest.fixture
def made_up_run(tmp_path):
    """An output folder with a few files of some stages (others left out), a checkpoint that names
    the classes and data folder, UMAP coordinates of real images, and evaluate's provenance record."""
    folder = make_image_folder(tmp_path / "images", {"a": 4, "b": 4, "c": 4, "u": 3, "v": 3})
    cfg = tiny_config(tmp_path, folder)
    paths = locations.prepare_output_dirs(cfg)
    made_up_checkpoint(paths.best, folder, ["a", "b", "c"], ["u", "v"])
    pd.DataFrame(dict(class_name=["a", "b"], train=[3, 3])).to_csv(paths.out / "class_counts.csv", index=False)
    _png(paths.out / "class_counts.png")
    (paths.out / "model_summary.txt").write_text("PlanktonNet <head>\nTotal params: 12")
    pd.DataFrame(dict(class_name=["a", "overall"], accuracy=[0.5, 0.75])).to_csv(paths.out / "test_metrics.csv",
                                                                                 index=False)
    _png(paths.out / "confusion_matrix.png", value=30)
    rows = [(c, f"{c}/img_{j:03d}.png", "unseen" if c in "uv" else ("train", "test")[j % 2])
            for c, n in dict(a=4, b=4, c=4, u=3, v=3).items() for j in range(n)]
    coords = pd.DataFrame(rows, columns=["class_name", "path", "subset"])
    coords.insert(0, "label", 0)
    coords["x"], coords["y"] = np.arange(len(coords), dtype=float), np.arange(len(coords), dtype=float) ** 0.5
    coords.to_csv(paths.out / "umap_coordinates.csv", index=False)
    _png(paths.out / "umap_embeddings.png", value=200)
    pd.DataFrame(dict(n=np.arange(50), value=np.linspace(0, 1, 50))).to_csv(paths.out / "transfer_learning.csv",
                                                                            index=False)
    inputs = provenance.start_stage(paths, "evaluate", [paths.best])
    provenance.save_provenance(paths, "evaluate", inputs, [paths.out / "test_metrics.csv",
                                                          paths.out / "confusion_matrix.png"])
    inputs = provenance.start_stage(paths, "dimensionality_reduction", [paths.best])
    provenance.save_provenance(paths, "dimensionality_reduction", inputs, [paths.out / "umap_coordinates.csv",
                                                                          paths.out / "umap_embeddings.png"])
    fileio.save_json(dict(dataset_overview=1.5, train=10.0), paths.out / "stage_times.json")
    return cfg, paths, coords, folder


def test_umap_coordinates_that_provenance_does_not_vouch_for_are_not_drawn(made_up_run):
    cfg, paths, coords, folder = made_up_run
    coords.assign(x=coords.x + 1).to_csv(paths.umap_coordinates, index=False)  # changed after the stage ran
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    assert "No interactive UMAP:" in page and "re-run dimensionality_reduction.py" in page
    assert 'id="umap-tapped"' not in page


def test_the_page_is_self_contained_with_every_section(made_up_run):
    cfg, paths, coords, folder = made_up_run
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    assert not re.findall(r"<(?:script|link|img)[^>]*(?:src|href)=[\"']?https?:", page)  # nothing fetched
    assert "Bokeh" in page and "<script" in page  # bokeh.min.js itself is in the file
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    expected = (["Settings", "Data overview", "Model summary", "Training curves", "Test metrics"]
                + [s.title for s in registry.run_all_stages(cfg) if s.name != "report"]
                + ["Stage timings", "Provenance"])
    assert [h for h in headings if h in expected] == expected
    assert "PlanktonNet &lt;head&gt;" in page  # the model summary, escaped
    assert "first 30 of 50 rows" in page  # transfer_learning.csv, capped
    assert "No outputs of embed in" in page  # a stage that has not run says so
    assert "not ImageNet-pretrained" in page
    pngs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 3  # class counts, confusion matrix (once: its stage says "shown above"), UMAP
    assert Image.open(io.BytesIO(base64.b64decode(pngs[0]))).size == (60, 40)


def test_the_umap_data_carries_each_points_thumbnail_class_and_subset(made_up_run):
    cfg, paths, coords, folder = made_up_run
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    data = page[page.index("docs_json = '"):]  # the Bokeh document, as components() embeds it
    for row in coords.itertuples():
        assert report.thumbnail_uri(folder / row.path) in data, row.path
    assert data.count('"subset"') >= 1 and '"unseen"' in data and '"triangle"' in data
    assert "click_policy" in data or '"hide"' in data


def test_the_report_records_provenance_that_verifies(made_up_run):
    cfg, paths, _, _ = made_up_run
    report.run(cfg)
    record = provenance.read_record(paths, "report")
    assert list(record.outputs) == ["report.html"]
    assert str(paths.out / "provenance_evaluate.json") in record.inputs
    assert verify.stage_mismatches(paths, "report", record) == []


def test_thumbnails_shrink_to_the_longest_side_and_never_grow(tmp_path):
    _png(tmp_path / "wide.png", width=120, height=60)
    _png(tmp_path / "small.png", width=20, height=10)
    for name, size in (("wide.png", (48, 24)), ("small.png", (20, 10))):
        uri = report.thumbnail_uri(tmp_path / name)
        assert uri.startswith("data:image/")
        assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size == size
    assert report.thumbnail_uri(tmp_path / "gone.png") == ""


def test_a_csv_table_is_capped_and_says_so(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame(np.arange(45 * 25).reshape(45, 25)).to_csv(path, index=False)
    table = report.csv_table(path)
    assert "first 30 of 45 rows, first 20 of 25 columns" in table
    assert table.count("</tr>") == 31 and "<td>744</td>" in table and "<td>745</td>" not in table  # 30 rows, 20 columns


def test_without_chromium_the_browser_test_fails_saying_how_to_install(monkeypatch):
    import test_report_browser
    monkeypatch.setattr(test_report_browser.shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match="install them with `apt-get install chromium chromium-driver`"):
        test_report_browser.chromium_driver()


def test_a_multilabel_run_leaves_out_single_label_stages_and_says_why(made_up_run):
    cfg, paths, coords, folder = made_up_run
    cfg.TASK = "multilabel"
    for name in ("class_counts.csv", "class_counts.png"):
        (paths.out / name).unlink()
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    single_only = [s.name for s in registry.STAGES if s.tasks == ("multiclass",)]
    assert single_only and not any(f"Stage: {name}" in headings for name in single_only)
    assert "Stage: embed" in headings and "Stages not run for this task" in headings
    overview = page[page.index("<h2>Data overview</h2>"):page.index("<h2>Model summary</h2>")]
    # the overview handles multi-label runs (label counts, co-occurrence): its missing files are asked for
    assert "not for this task" not in overview and "run run_all.py, or the stage that writes them" in overview


# ---- what the page may trust -----------------------------------------------------------------------

def test_files_their_record_does_not_vouch_for_are_marked_in_their_section_and_at_the_top(made_up_run):
    cfg, paths, coords, folder = made_up_run
    _png(paths.out / "umap_embeddings.png", value=10)  # replaced after dimensionality_reduction recorded it
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    umap = page[page.index("<h2>Stage: dimensionality_reduction"):]
    umap = umap[:umap.index("</section>")]
    assert 'class="warn stale">Not vouched for' in umap and "umap_embeddings.png" in umap
    metrics = page[page.index("<h2>Test metrics</h2>"):]
    assert "Not vouched for" not in metrics[:metrics.index("</section>")]  # evaluate's record holds
    top = page[:page.index("<nav>")]
    assert "stage(s) show files that their provenance record does not vouch for" in top
    assert "dimensionality_reduction" in top and "evaluate" not in top.split("vouch for")[1]


def test_nothing_outside_the_output_folder_is_read_into_the_page(made_up_run, tmp_path):
    """A link in the output folder, or a record naming a file outside it, shows nothing of that file."""
    cfg, paths, coords, folder = made_up_run
    secret = tmp_path / "private_notes.txt"
    secret.write_text("MY-PRIVATE-TEXT")
    (paths.out / "model_summary.txt").unlink()
    (paths.out / "model_summary.txt").symlink_to(secret)
    record = json.loads(provenance.provenance_path(paths, "evaluate").read_text())
    record["outputs"]["../private_notes.txt"] = hashing.file_sha256(secret)
    provenance.provenance_path(paths, "evaluate").write_text(json.dumps(record))
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    assert "MY-PRIVATE-TEXT" not in page
    assert "names outputs outside the output folder" in page  # the record is refused, visibly


@pytest.mark.parametrize("damage", ["cut short", "a list", "hashes as numbers"])
def test_a_damaged_record_or_timings_file_is_a_warning_on_the_page_and_a_mismatch_in_verify(made_up_run, capsys, damage):
    cfg, paths, coords, folder = made_up_run
    path = provenance.provenance_path(paths, "evaluate")
    text = path.read_text()
    damaged = {"cut short": text[: len(text) // 2], "a list": "[1, 2]",
               "hashes as numbers": text.replace('"test_metrics.csv": "', '"test_metrics.csv": 1, "x": "')}[damage]
    path.write_text(damaged)
    (paths.out / "stage_times.json").write_text('{"train": "ten"}')
    report.run(cfg)
    page = (paths.out / "report.html").read_text(encoding="utf-8")
    assert "provenance_evaluate.json is not a provenance record" in page
    assert "stage_times.json cannot be read" in page
    with pytest.raises(SystemExit) as stop:
        verify.main([f"--OUTPUT_DIR={paths.out}", f"--CHECKPOINT_DIR={paths.checkpoints}"])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "Traceback" not in err
    assert "provenance_evaluate.json is not a provenance record" in err and err.strip().splitlines()[-1].startswith("error:")


def test_links_to_files_in_a_sub_folder_point_into_it(made_up_run):
    """predict.py's files live in outputs/predictions/: the page's links must reach them there."""
    cfg, paths, coords, folder = made_up_run
    (paths.out / "predictions").mkdir()
    table = paths.out / "predictions" / "predictions.csv"
    pd.DataFrame(dict(path=["x.png"], predicted_class=["a"])).to_csv(table, index=False)
    (paths.out / "predictions" / "predictions.json").write_text("{}")
    page = report.render_files([table, paths.out / "predictions" / "predictions.json"], [], paths.out)
    assert 'href="predictions/predictions.csv"' in page and 'href="predictions/predictions.json"' in page
