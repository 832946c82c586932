"""Class-pair distances and transfer learning against brute-force references."""
import numpy as np
import pytest

import compute_average_distances as cad
from plankton import probes, projection


@pytest.mark.parametrize("block", [3, 512])
def test_average_distances_equal_brute_force(block):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 17, 40, 9]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    x = rng.normal(size=(len(labels), 16)) * 0.2 + rng.normal(size=(len(sizes), 16))[labels] + 30.0
    euclid = cad.average_euclidean_distances(x, labels, len(sizes), block=block)
    cosine = cad.average_cosine_distances(x, labels, len(sizes))
    for fast, metric in ((euclid, "euclidean"), (cosine, "cosine")):
        slow = cad.brute_force_average_distances(x, labels, len(sizes), metric)
        assert np.isnan(fast[0, 0]) and np.isnan(slow[0, 0])  # one sample: no distinct pairs
        mask = ~np.isnan(slow)
        np.testing.assert_allclose(fast[mask], slow[mask], rtol=1e-6)
        np.testing.assert_allclose(fast, fast.T, rtol=1e-12)


def test_cosine_distance_treats_a_zero_vector_as_orthogonal():
    x = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    matrix = cad.average_cosine_distances(x, np.array([0, 0, 1]), 2)
    assert matrix[0, 0] == pytest.approx(1.0)  # cos(u, 0) counts as 0
    assert matrix[0, 1] == pytest.approx(1 - (np.sqrt(0.5) + 0) / 2)


def test_transfer_learning_learns_well_separated_embeddings():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 60)
    x = rng.normal(size=(180, 128)) + 6.0 * np.eye(3, 128)[labels] * 3
    results = probes.transfer_curves(x, labels, test_fraction=0.3, repeats=2, settings=probes.ProbeSettings(knn_k=10), seed=0, n_jobs=1)
    full = results[results.n_train == results.n_train.max()].groupby("method").balanced_accuracy.mean()
    assert set(full.index) == set(probes.PROBES) and (full > 0.95).all()
    assert results.n_train.min() == 3  # one per class
    shuffled = probes.transfer_curves(x, rng.permutation(labels), 0.3, 2, probes.ProbeSettings(knn_k=10), 0, n_jobs=1)
    assert shuffled[shuffled.n_train == shuffled.n_train.max()].balanced_accuracy.mean() < 0.6


def test_stratified_subset_has_every_class_and_the_size_asked():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 45)
    for size in (3, 10, 37, 100):
        picked = probes.stratified_subset(labels, size, seed=0)
        assert len(picked) == size and len(set(picked)) == size
        assert set(labels[picked]) == {0, 1, 2}



def test_exact_neighbours_equal_sklearns_and_start_with_the_point_itself():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 16)).astype(np.float32)
    indices, distances = projection.exact_neighbours(x, 7, block=256)  # blocks of uneven size
    ref_distances, ref_indices = NearestNeighbors(n_neighbors=7).fit(x).kneighbors(x)
    assert (indices[:, 0] == np.arange(700)).all() and (distances[:, 0] == 0).all()
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-4, atol=1e-4)


def test_distances_sample_at_most_the_cap_per_class_and_keep_small_classes_whole():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 30)
    kept = cad.at_most_per_class(labels, 20, seed=0)
    assert np.bincount(labels[kept]).tolist() == [20, 5, 20] and len(set(kept)) == len(kept)
    assert (kept == np.sort(kept)).all()
    assert cad.at_most_per_class(labels, 100, seed=0).tolist() == list(range(85))


def test_transfer_training_sets_stop_at_the_cap():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 100)
    x = rng.normal(size=(200, 8)) + 3.0 * labels[:, None]
    results = probes.transfer_curves(x, labels, 0.3, 2, probes.ProbeSettings(knn_k=5), 0, n_jobs=1, max_train=50)
    assert results.n_train.max() == 50 and (results[results.n_train == 50].repeat.nunique() == 2)


def test_compile_ahead_starts_nothing_when_umaps_code_is_cached(tmp_path, monkeypatch):
    from plankton import projection as dr
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert not dr.umap_code_cached()
    (tmp_path / "umap_x").mkdir()
    (tmp_path / "umap_x" / "layouts._optimize_layout_euclidean_single_epoch-63.py311.nbi").write_bytes(b"")
    assert dr.umap_code_cached()
    dr.compile_ahead()
    assert dr._compiling is None


@pytest.mark.slow
def test_compile_ahead_fills_a_cold_numba_cache_in_the_background(tmp_path, monkeypatch):
    from plankton import projection as dr
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    dr.compile_ahead()
    assert dr._compiling is not None and dr._compiling.poll() is None  # running while we go on
    dr.stop_compiling(wait=True)
    assert dr._compiling is None and dr.umap_code_cached()
