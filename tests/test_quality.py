"""Embedding quality, leaks between splits and few-shot transfer, against direct computations."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.spatial.distance import cdist, pdist, squareform
from sklearn.manifold import trustworthiness

import embedding_quality
import leaks
import train
from plankton import embedding_files, locations, probes, splits

# ---- embedding quality -----------------------------------------------------------------------------

def clustered(seed=0, sizes=(9, 7, 12, 1)):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.normal(size=(len(labels), 5)) + 1.5 * rng.normal(size=(len(sizes), 5))[labels]
    return x, labels


def test_quality_metrics_equal_a_direct_computation():
    x, labels = clustered()
    row = embedding_quality.quality_row(x, labels)
    d = squareform(pdist(x))
    same, off_diagonal = labels[:, None] == labels[None, :], ~np.eye(len(x), dtype=bool)
    assert row["mean_within"] == pytest.approx(d[same & off_diagonal].mean(), rel=1e-9)
    assert row["mean_between"] == pytest.approx(d[~same].mean(), rel=1e-9)
    assert row["between_within_ratio"] == pytest.approx(d[~same].mean() / d[same & off_diagonal].mean(), rel=1e-9)
    # silhouette by hand: a = mean distance to the own class, b = to the nearest other class; 0 for a singleton
    s = []
    for i in range(len(x)):
        own = (labels == labels[i]) & off_diagonal[i]
        if not own.any():
            s.append(0.0)
            continue
        a = d[i, own].mean()
        b = min(d[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        s.append((b - a) / max(a, b))
    assert row["silhouette"] == pytest.approx(np.mean(s), rel=1e-9)
    # leave-one-out recall@k by hand, the singleton class's image left out
    order = np.argsort(np.where(off_diagonal, d, np.inf), axis=1)
    counted = np.bincount(labels)[labels] > 1
    for k in embedding_quality.RECALL_AT:
        hit = (labels[order[:, :k]] == labels[:, None]).any(1)
        assert row[f"recall_at_{k}"] == pytest.approx(hit[counted].mean())
    assert row["n_recall"] == len(x) - 1
    assert 0 < row["recall_at_1"] < 1  # the case is not trivial


def test_recall_counts_a_hit_anywhere_among_the_k_nearest_and_breaks_ties_by_row_order():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    labels = np.array([0, 1, 1, 0, 0])
    nearest, _ = embedding_quality.pairwise_pass(x, labels, k=2, block=2)
    # row 1 is 1 from rows 0 and 2: row 0 comes first; row 4's nearest are 3 then 2
    assert nearest.tolist() == [[1, 2], [0, 2], [1, 3], [2, 1], [3, 2]]
    recalls, counted = embedding_quality.recall_at(nearest, labels, ks=(1, 2))
    assert counted == 5
    assert recalls == {"recall_at_1": pytest.approx(2 / 5), "recall_at_2": pytest.approx(3 / 5)}


def test_trustworthiness_uses_the_subsets_plotted_points_and_equals_sklearns():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    xy = x[:, :2] + 0.3 * rng.normal(size=(40, 2))
    paths = [f"c/{i}.png" for i in range(40)]
    plotted = rng.permutation(40)[:30]  # ten images were not in UMAP's sample
    coords = pd.DataFrame(dict(label=0, class_name="c", path=[paths[i] for i in plotted], subset="test",
                               x=xy[plotted, 0], y=xy[plotted, 1]))
    other = coords.assign(subset="unseen", x=0.0, y=0.0)  # same paths in another subset: ignored
    value, n = embedding_quality.plane_trustworthiness(x, paths, pd.concat([other, coords]), "test", 5)
    keep = np.sort(plotted)
    assert n == 30 and value == pytest.approx(trustworthiness(x[keep], xy[keep], n_neighbors=5))


def test_the_sample_cap_is_applied_and_said(capsys):
    x, labels = clustered(sizes=(30, 30))
    frame = embedding_files.embeddings_frame(x, labels, ["p", "q"], [f"p/{i}.png" for i in range(60)],
                                             embedding_files.EmbeddingsInfo("0" * 64, "1" * 64, "test", ("p", "q"),
                                                                            "data", "random", "multiclass"))
    coords = pd.DataFrame(columns=embedding_files.UMAP_COLUMNS)
    row = embedding_quality.subset_quality(frame, coords, "test", limit=20, neighbours=5, seed=0)
    assert row["n_images"] == 60 and row["n_used"] == 20 and "QUALITY_SAMPLES=20" in capsys.readouterr().out
    assert np.isnan(row["trustworthiness"]) and row["n_trust"] == 0


# ---- leaks between splits --------------------------------------------------------------------------

def test_find_leaks_lists_exact_before_near_and_each_image_once():
    split = pd.DataFrame(dict(relpath=["a/1", "a/2", "b/3", "a/4", "b/5", "u/6"], class_name=["a", "a", "b", "a", "b", "u"],
                              subset=["train", "train", "train", "test", "test", "unseen"],
                              sha256=["h1", "h2", "h3", "h2", "h5", "h6"]))
    nearest = {"test": (np.array([0, 2]), np.array([0.3, 0.001])), "unseen": (np.array([0]), np.array([0.004]))}
    found = leaks.find_leaks(split, nearest, threshold=0.005)
    assert found[["path", "train_path", "kind", "same_class"]].values.tolist() == [
        ["a/4", "a/2", "exact", True], ["b/5", "b/3", "near", True], ["u/6", "a/1", "near", False]]


def test_a_copied_and_a_noised_training_image_in_the_test_set_are_caught(tmp_path, tiny_folder, tiny_cfg, capsys):
    # the folder gets a byte copy and a lightly noised copy of a/img_000.png, and a copy of
    # a/img_001.png filed under the unseen class u; the split is drawn, then edited so that the
    # originals are training images and the copies test (and unseen) images
    shutil.copy(tiny_folder / "a" / "img_000.png", tiny_folder / "a" / "copy.png")
    pixels = np.asarray(Image.open(tiny_folder / "a" / "img_000.png")).astype(float)
    noisy = np.clip(pixels + np.random.default_rng(0).normal(0, 2, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tiny_folder / "a" / "noisy.png")
    shutil.copy(tiny_folder / "a" / "img_001.png", tiny_folder / "u" / "dup.png")
    paths = locations.prepare_output_dirs(tiny_cfg)
    splits.split_from_settings(tiny_cfg, paths, create=True)
    table = pd.read_csv(paths.split, dtype=str)
    subset_of = {"a/img_000.png": "train", "a/img_001.png": "train", "a/img_002.png": "val", "a/copy.png": "test",
                 "a/noisy.png": "test"}
    table["subset"] = [subset_of.get(p, s) for p, s in zip(table.relpath, table.subset)]
    table.to_csv(paths.split, index=False)
    train.run(tiny_cfg)
    capsys.readouterr()
    leaks.run(tiny_cfg)
    printed = capsys.readouterr().out
    found = pd.read_csv(paths.out / "leaks.csv")
    rows = {r.path: r for r in found.itertuples()}
    assert set(rows) == {"a/copy.png", "a/noisy.png", "u/dup.png"}, found  # nothing else flagged
    assert (rows["a/copy.png"].kind, rows["a/copy.png"].train_path) == ("exact", "a/img_000.png")
    assert (rows["a/noisy.png"].kind, rows["a/noisy.png"].train_path) == ("near", "a/img_000.png")
    assert 0 < rows["a/noisy.png"].distance <= tiny_cfg.LEAK_THRESHOLD
    assert (rows["u/dup.png"].kind, bool(rows["u/dup.png"].same_class)) == ("exact", False)
    assert "warning: 2 test image(s) duplicate a training image (1 exact, 1 near" in printed
    assert "warning: 1 unseen image(s)" in printed and "1 of them under another class" in printed
    summary = json.loads(paths.leaks_summary.read_text())
    assert summary["subsets"]["test"]["exact"] == 1 and summary["subsets"]["test"]["near"] == 1
    assert summary["subsets"]["val"]["exact"] + summary["subsets"]["val"]["near"] == 0
    assert (paths.out / "leaks.png").stat().st_size > 0 and (paths.out / "provenance_leaks.json").is_file()


def test_nearest_training_is_the_highest_cosine():
    rng = np.random.default_rng(0)
    train_rows = leaks.unit_rows(rng.normal(size=(50, 8)), np.zeros(8))
    queries = leaks.unit_rows(rng.normal(size=(7, 8)), np.zeros(8))
    index, distance = leaks.nearest_training(queries, train_rows, block_bytes=3 * 4 * 50)  # blocks of 3 queries
    d = cdist(queries, train_rows, "cosine")
    assert index.tolist() == d.argmin(1).tolist()
    np.testing.assert_allclose(distance, d.min(1), atol=1e-6)


# ---- few-shot transfer -----------------------------------------------------------------------------

def test_cosine_knn_votes_equal_a_hand_computation():
    train_x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    train_y = np.array([5, 7, 7, 5])
    query = np.array([[2.0, 0.5]])
    model = probes.CosineKNN(k=3, temperature=0.5).fit(train_x, train_y)
    cos = np.array([2.0, 0.5]) / np.hypot(2.0, 0.5)
    sims = [cos[0], cos[1], (cos[0] + cos[1]) / np.sqrt(2), -cos[0]]  # the 3 highest: rows 0, 2, 1
    votes_5 = np.exp(sims[0] / 0.5)
    votes_7 = np.exp(sims[2] / 0.5) + np.exp(sims[1] / 0.5)
    expected = np.array([votes_5, votes_7]) * np.exp(-1 / 0.5)  # the votes are scaled by exp(-1/T)
    np.testing.assert_allclose(model.votes(query)[0], expected, rtol=1e-12)
    assert model.predict(query).tolist() == [7 if votes_7 > votes_5 else 5]
    assert votes_7 > votes_5  # two weaker neighbours outvote the nearest one here
    # a small temperature lets the nearest neighbour win alone
    assert probes.CosineKNN(k=3, temperature=0.01).fit(train_x, train_y).predict(query).tolist() == [5]


def test_top_k_first_is_a_stable_argsort_cut_to_k_ties_included():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n, m = int(rng.integers(1, 20)), int(rng.integers(1, 30))
        values = rng.integers(0, 3, (n, m)).astype(float) if trial % 2 else rng.normal(size=(n, m))  # many ties
        k = int(rng.integers(1, m + 3))
        expected = np.argsort(-values, axis=1, kind="stable")[:, :min(k, m)]
        assert np.array_equal(probes.top_k_first(values, k), expected)


def test_cosine_knn_votes_are_the_same_in_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    train_x, train_y = rng.normal(size=(40, 6)), rng.integers(0, 4, 40)
    queries = np.vstack([rng.normal(size=(23, 6)), np.zeros((1, 6))])  # a zero row among them
    whole = probes.CosineKNN(k=5, temperature=0.1).fit(train_x, train_y).votes(queries)
    monkeypatch.setattr(probes, "BLOCK_BYTES", 8 * 40 * 3)  # 3 queries a block
    blocked = probes.CosineKNN(k=5, temperature=0.1).fit(train_x, train_y).votes(queries)
    np.testing.assert_array_equal(blocked, whole)
    sims = probes._unit(queries) @ probes._unit(train_x).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    expected = np.zeros((24, 4))
    for i in range(24):
        for j in top[i]:
            expected[i, train_y[j]] += np.exp((sims[i, j] - 1) / 0.1)
    np.testing.assert_allclose(whole, expected, rtol=1e-12)


def test_nearest_class_mean_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.repeat([2, 0, 9], 10)
    queries = rng.normal(size=(25, 4))
    means = np.stack([x[y == c].mean(0) for c in (0, 2, 9)])
    expected = np.array([0, 2, 9])[cdist(queries, means).argmin(1)]
    assert probes.NearestClassMean().fit(x, y).predict(queries).tolist() == expected.tolist()


def test_the_k_per_class_sampler_draws_exactly_k_of_each_class_and_never_a_test_image():
    labels = np.array([0] * 20 + [1] * 9 + [2] * 14)
    train_part, test_part = probes.stratified_split(labels, 0.3, seed=0)
    assert probes.shot_counts(labels[train_part]) == [1, 2, 5]  # the smallest class keeps 6
    for k in (1, 2, 5):
        for seed in range(5):
            picked = probes.k_per_class(labels, train_part, k, seed)
            assert np.bincount(labels[picked]).tolist() == [k, k, k] and len(set(picked)) == 3 * k
            assert set(picked) <= set(train_part) and not set(picked) & set(test_part)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(labels), 3)) + 4.0 * labels[:, None]
    runs = probes.fewshot_runs(x, labels, 0.3, draws=3, settings=probes.ProbeSettings(knn_k=3), seed=0, n_jobs=1)
    assert set(runs.method) == set(probes.PROBES) and (runs.n_train == 3 * runs.shots).all()
    assert sorted(runs.shots.unique()) == [1, 2, 5] and (runs.groupby(["method", "shots"]).size() == 3).all()


def test_the_interval_is_students_t():
    from scipy import stats
    values = [0.5, 0.6, 0.8, 0.7]
    mean, low, high = probes.t_interval(values)
    expected = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(0.65) and (low, high) == pytest.approx(expected)
