"""What to annotate next (plankton/annotation.py, annotate_next.py): each strategy picks what it
should on constructed inputs, the batch's CSV, EcoTaxa TSV and contact sheet are written from a tiny
folder, the EcoTaxa candidates are the objects not yet validated, bad settings end in one error
line; and (slow) the stage on a trained tiny model, from a folder and from an export."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import dir_args, make_image_folder, one_error_line, tiny_config
from PIL import Image
from test_ecotaxa import tiny_export

import annotate_next
from plankton import annotation, ecotaxa, locations, provenance, registry, unlabelled
from plankton.errors import PipelineError


def candidates(probabilities, embeddings=None, labelled=None, k: int = 1, metric: str = "euclidean"):
    probabilities = np.asarray(probabilities, dtype=float)
    embeddings = np.eye(len(probabilities)) if embeddings is None else np.asarray(embeddings, dtype=float)
    labelled = embeddings[:1] if labelled is None else np.asarray(labelled, dtype=float)
    return annotation.Candidates(probabilities, embeddings, annotation.labelled_reference(labelled, k, metric))


def confident_and_tied(n_confident: int, ties: list[float], classes: int = 3) -> np.ndarray:
    """Rows with p1 = 0.9 (confident) then rows whose top two classes differ by each of `ties`."""
    rows = [[0.9] + [0.1 / (classes - 1)] * (classes - 1)] * n_confident
    rows += [[0.5 + gap / 2, 0.5 - gap / 2] + [0.0] * (classes - 2) for gap in ties]
    return np.array(rows)


# ---- the strategies --------------------------------------------------------------------------------

def test_margin_picks_the_near_ties_nearest_first():
    probabilities = confident_and_tied(6, [0.3, 0.0, 0.1])  # rows 6, 7, 8; row 7 an exact tie
    picked, scores = annotation.select("margin", candidates(probabilities), 3)
    assert list(picked) == [7, 8, 6]
    top_two = np.sort(probabilities, axis=1)[:, -2:]  # brute force: 1 - (p1 - p2)
    np.testing.assert_allclose(scores, 1 - (top_two[:, 1] - top_two[:, 0]))


def test_entropy_prefers_the_spread_out_row_and_is_between_0_and_1():
    probabilities = np.array([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0], [0.7, 0.1, 0.1, 0.1]])
    picked, scores = annotation.select("entropy", candidates(probabilities), 2)
    assert list(picked) == [1, 3] and scores[1] == pytest.approx(1.0) and scores[0] == pytest.approx(0, abs=1e-9)


def test_knn_picks_the_images_furthest_from_the_labelled_ones():
    labelled = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    embeddings = np.array([[0.05, 0.05], [5.0, 5.0], [0.2, 0.1], [-3.0, 0.0]])
    probabilities = np.full((4, 2), 0.5)
    picked, scores = annotation.select("knn", candidates(probabilities, embeddings, labelled), 2)
    assert list(picked) == [1, 3]
    brute = [np.linalg.norm(labelled - e, axis=1).min() for e in embeddings]  # k = 1: the nearest
    np.testing.assert_allclose(scores, brute)


def test_diverse_spreads_the_batch_where_margin_takes_one_cluster():
    """Four clusters of embeddings; the tightest, A, holds every near-tie. margin's batch is all A;
    diverse's comes from all four and still starts with the nearest tie."""
    rng = np.random.default_rng(0)
    centres = np.array([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0], [-10.0, 0, 0]])
    cluster = np.repeat(np.arange(4), [20, 15, 15, 15])
    embeddings = centres[cluster] + rng.normal(0, 0.5, (len(cluster), 3))
    gaps = np.where(cluster == 0, rng.uniform(0.0, 0.1, len(cluster)), rng.uniform(0.2, 0.6, len(cluster)))
    probabilities = np.stack([0.5 + gaps / 2, 0.5 - gaps / 2], axis=1)
    pool = candidates(probabilities, embeddings)
    margin, _ = annotation.select("margin", pool, 6)
    diverse, scores = annotation.select("diverse", pool, 6, seed=3)
    assert set(cluster[margin]) == {0}
    assert len(set(cluster[diverse])) == 4 and len(set(diverse)) == 6
    assert diverse[0] == np.argmax(scores) and list(scores[diverse]) == sorted(scores[diverse], reverse=True)


@pytest.mark.parametrize("name", list(annotation.STRATEGIES))
def test_every_strategy_gives_distinct_candidates_and_all_of_a_small_pool(name):
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4), size=30)
    pool = candidates(probabilities, rng.normal(size=(30, 5)), rng.normal(size=(8, 5)), k=3, metric="cosine")
    picked, scores = annotation.select(name, pool, 7, seed=5)
    again, _ = annotation.select(name, pool, 7, seed=5)
    assert len(set(picked)) == 7 and scores.shape == (30,) and list(picked) == list(again)
    everything, _ = annotation.select(name, candidates(probabilities[:4], rng.normal(size=(4, 5))), 50)
    assert sorted(everything) == [0, 1, 2, 3]


def test_random_depends_on_the_seed():
    pool = candidates(np.full((200, 2), 0.5))
    first, _ = annotation.select("random", pool, 10, seed=0)
    other, _ = annotation.select("random", pool, 10, seed=1)
    assert set(first) != set(other)


# ---- the files, without a model ------------------------------------------------------------------

def test_the_batch_is_written_as_csv_ecotaxa_tsv_and_contact_sheet(tmp_path, tiny_cfg):
    folder = make_image_folder(tmp_path / "new", {"x": 7, "y": 7}, seed=4)
    root, relpaths, hashes, bad = unlabelled.find_new_images(str(folder), locations.prepare_output_dirs(tiny_cfg))
    pool = unlabelled.Unlabelled(root, relpaths, hashes, bad)
    rng = np.random.default_rng(2)
    cands = candidates(rng.dirichlet(np.ones(3), size=14), rng.normal(size=(14, 4)), rng.normal(size=(5, 4)), k=2)
    picked, scores = annotation.select("diverse", cands, 5)
    table = annotate_next.batch_table(pool, cands, picked, scores, ["a", "b", "c"])
    assert list(table["rank"]) == [1, 2, 3, 4, 5] and list(table.columns) == annotate_next.COLUMNS
    assert list(table.path) == [relpaths[i] for i in picked] and table.predicted_class.isin(["a", "b", "c"]).all()
    np.testing.assert_allclose(table.strategy_score, table.margin)  # diverse ranks by the margin score
    rows, left_out = ecotaxa.annotation_table(table, root)
    ecotaxa.write_tsv(rows, ecotaxa.ANNOTATION_TYPES, tmp_path / "batch.tsv")
    back, types = ecotaxa.read_tsv(tmp_path / "batch.tsv")
    assert left_out == 0 and list(back.img_file_name) == list(table.path)
    assert list(back.object_annotate_rank) == ["1", "2", "3", "4", "5"] and types["object_annotate_score"] == "[f]"
    assert back.object_id.is_unique and set(back.object_annotation_status) == {"predicted"}
    annotate_next.plot_contact_sheet(table, root, "diverse", len(relpaths), tmp_path / "sheet.png")
    assert Image.open(tmp_path / "sheet.png").size[0] > 400


def test_the_ecotaxa_candidates_are_the_objects_not_in_the_trained_statuses(tmp_path, tiny_cfg):
    tsv = tiny_export(tmp_path / "export", {"a": 6, "b": 6})  # every third object "predicted"
    selection = ecotaxa.Selection(ecotaxa.locate(str(tsv), tmp_path / "cache"), ("validated",), 2)
    pool = unlabelled.ecotaxa_candidates(selection, locations.prepare_output_dirs(tiny_cfg))
    assert sorted(pool.relpaths) == [f"images/{c}_{j:03d}.png" for c in "ab" for j in (2, 5)]
    assert pool.objects["images/a_002.png"] == ("obj_a_2", "s0") and len(pool.hashes) == 4
    every = ecotaxa.Selection(selection.export, ("validated", "predicted"), 2)
    with pytest.raises(PipelineError, match="none is left to annotate"):
        unlabelled.ecotaxa_candidates(every, locations.prepare_output_dirs(tiny_cfg))


# ---- bad settings and missing inputs: one error line -----------------------------------------------

@pytest.mark.parametrize("argument, expected", [
    ("--ANNOTATE_STRATEGY=marginn", "did you mean 'margin'"),
    ("--ANNOTATE_BATCH=0", "ANNOTATE_BATCH=0: must be an integer >= 1"),
    ("--ANNOTATE_BATCH=5.5", "ANNOTATE_BATCH=5.5"),
])
def test_a_bad_setting_is_one_error_line(tmp_path, capsys, argument, expected):
    line = one_error_line(capsys, annotate_next.main, [*dir_args(tmp_path), argument])
    assert expected in line


def test_no_candidates_or_no_model_is_one_error_line(tmp_path, capsys):
    line = one_error_line(capsys, annotate_next.main, dir_args(tmp_path))
    assert "PREDICT_DIR" in line and "ECOTAXA_EXPORT" in line
    folder = make_image_folder(tmp_path / "new", {"x": 2})
    line = one_error_line(capsys, annotate_next.main, [*dir_args(tmp_path), f"--PREDICT_DIR={folder}"])
    assert "best.pth" in line
    assert not (tmp_path / "outputs" / "annotate").exists()


def test_the_stage_is_registered_for_runs_with_new_images():
    entry = registry.stage("annotate_next")
    assert entry.when_set == "PREDICT_DIR" and not entry.resumable and "train" in entry.reads
    assert registry.stage_of("annotate/annotate_next.tsv") == "annotate_next"


# ---- the stage on a trained tiny model (slow) --------------------------------------------------------

@pytest.mark.slow
def test_the_stage_ranks_a_folder_and_the_objects_of_an_export(tmp_path):
    """One tiny model trained on an export's validated objects ranks a folder of new images
    (PREDICT_DIR), then, without PREDICT_DIR, the export's objects not yet validated."""
    import train
    tsv = tiny_export(tmp_path / "export", {"a": 15, "b": 15, "c": 15, "u": 6, "v": 6})
    cfg = tiny_config(tmp_path, None, ECOTAXA_EXPORT=str(tsv), ECOTAXA_MIN_COUNT=3, MAX_EPOCHS=1,
                      TRUNK="resnet18", ANNOTATE_BATCH=8)
    train.run(cfg)
    new = make_image_folder(tmp_path / "new", {"a": 5, "b": 5, "u": 5}, seed=9)
    (new / "a" / "broken.png").write_bytes(b"\x89PNG truncated")
    cfg.PREDICT_DIR = str(new)
    annotate_next.run(cfg)
    paths = locations.Paths.from_settings(cfg)
    table = pd.read_csv(paths.annotate_dir / "annotate_next.csv")
    assert list(table["rank"]) == list(range(1, 9)) and table.path.is_unique and "a/broken.png" not in set(table.path)
    back, _ = ecotaxa.read_tsv(paths.annotate_dir / "annotate_next.tsv")
    assert list(back.img_file_name) == list(table.path)
    assert Image.open(paths.annotate_dir / "annotate_next.png").size[0] > 400
    record = json.loads(provenance.provenance_path(paths, "annotate_next").read_text())
    assert sorted(record["outputs"]) == ["annotate/annotate_next.csv", "annotate/annotate_next.png",
                                         "annotate/annotate_next.tsv"]
    assert provenance.stale_outputs(paths, "annotate_next") == []

    # without PREDICT_DIR: the objects not validated are the candidates, and keep their object_id
    cfg.PREDICT_DIR, cfg.ANNOTATE_BATCH, cfg.ANNOTATE_STRATEGY = None, 100, "knn"
    annotate_next.run(cfg)
    back, _ = ecotaxa.read_tsv(paths.annotate_dir / "annotate_next.tsv")
    objects = pd.read_csv(paths.out / "ecotaxa_objects.csv", dtype=str)
    waiting = objects[objects.status != "validated"]
    assert sorted(back.object_id) == sorted(waiting.object_id) and len(back) == 19  # 5 of a, b, c; 2 of u, v
    table = pd.read_csv(paths.annotate_dir / "annotate_next.csv")
    assert list(table.knn_distance) == sorted(table.knn_distance, reverse=True)
