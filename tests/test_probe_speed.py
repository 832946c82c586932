"""The cheaper paths of the probes and suspicious labels give what the library calls they replace gave."""
import numpy as np
from joblib import delayed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info

import suspicious_labels
from plankton import probes


def test_balanced_accuracy_is_scikit_learns():
    rng = np.random.default_rng(0)
    for classes in (2, 5, 9):
        y_true = rng.integers(0, classes, 300)
        predicted = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, classes + 2, 300))  # some never-true classes
        assert probes.balanced_accuracy(y_true, predicted) == balanced_accuracy_score(y_true, predicted)
    assert probes.balanced_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == 0.75


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_threaded_fits_keep_blas_to_one_thread_and_restore_it():
    before = blas_threads()
    seen = probes._threaded((delayed(blas_threads)() for _ in range(3)), n_jobs=2)
    assert seen == [[1] * len(before)] * 3
    assert blas_threads() == before


def test_out_of_fold_probabilities_as_a_plain_cross_val_predict():
    """One BLAS thread inside suspicious_labels' fits: the same probabilities as scikit-learn's own call, BLAS
    threads as they were afterwards."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 16)) + labels[:, None] * 0.5
    before = blas_threads()
    found = suspicious_labels.out_of_fold_probabilities(features, labels, 4, 5, seed=0)
    expected = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)), features, labels,
                                 cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
    np.testing.assert_allclose(found[:, :3], expected, rtol=0, atol=1e-12)
    assert (found[:, 3] == 0).all() and blas_threads() == before
