"""Transfer probes, one table (PROBES): classifiers trained on embeddings of classes the model never
saw (SVC, logistic regression, kNN, cosine kNN, nearest class mean), the training-set sizes and
splits they are measured on, and their curves (transfer_learning.py and seeds.py use them)."""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from scipy.stats import t as student_t
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from threadpoolctl import threadpool_limits

DINO_TEMPERATURE = 0.07  # the cosine kNN's temperature when none is given (FEWSHOT_TEMPERATURE's default)


BLOCK_BYTES = 16 << 20  # the cosine kNN's similarities (test rows x training rows, float64) at most, per fit


class CosineKNN(BaseEstimator, ClassifierMixin):
    """kNN as DINO evaluates features: the `k` training rows of highest cosine similarity (all of
    them when fewer) each vote for their class with weight exp(cos / temperature); the class with
    the largest sum of votes is predicted (the first such class on a tie). A zero row has cos 0."""

    def __init__(self, k: int = 10, temperature: float = DINO_TEMPERATURE):
        self.k, self.temperature = k, temperature

    def fit(self, x, y):
        self.classes_, self.y_index_ = np.unique(y, return_inverse=True)
        self.train_ = _unit(x)
        return self

    def votes(self, x) -> np.ndarray:
        """Summed weights per class (columns in classes_ order) for each row of x, BLOCK_BYTES of
        similarities at a time (a whole test part against 5,000 training rows took 0.7 GB)."""
        x = _unit(x)
        votes = np.zeros((len(x), len(self.classes_)))
        k = min(self.k, len(self.train_))
        block = max(1, BLOCK_BYTES // (8 * max(1, len(self.train_))))
        for start in range(0, len(x), block):
            similarity = x[start:start + block] @ self.train_.T
            top = top_k_first(similarity, k)
            # exp((cos - 1) / T): the same ranking as exp(cos / T), without overflow for a small T
            weights = np.exp((np.take_along_axis(similarity, top, axis=1) - 1.0) / self.temperature)
            rows = np.repeat(np.arange(start, start + len(similarity)), k)
            np.add.at(votes, (rows, self.y_index_[top].ravel()), weights.ravel())
        return votes

    def predict(self, x):
        return self.classes_[self.votes(x).argmax(1)]


def top_k_first(values: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k largest values, largest first, the lower column first among equal
    values: what a stable argsort of -values gives in its first k columns, found by partitioning
    (linear in the columns) and sorting only the few candidates."""
    if k <= 0 or values.shape[1] == 0:
        return np.zeros((len(values), 0), np.int64)
    k = min(k, values.shape[1])
    kth = -np.partition(-values, k - 1, axis=1)[:, k - 1]  # each row's k-th largest value
    rows, cols = np.nonzero(values >= kth[:, None])  # the candidates: at least k a row, more on ties
    order = np.lexsort((cols, -values[rows, cols], rows))  # by row, then value (largest first), then column
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(len(values)))
    rank = np.arange(len(rows)) - starts[rows]
    return cols[rank < k].reshape(len(values), k)


class NearestClassMean(BaseEstimator, ClassifierMixin):
    """The class whose mean training row is nearest (Euclidean; the first such class on a tie).
    scikit-learn's NearestCentroid warns about one-image classes, the few-shot curves' first point."""

    def fit(self, x, y):
        self.classes_, index = np.unique(y, return_inverse=True)
        x = np.asarray(x, dtype=np.float64)
        self.means_ = np.stack([x[index == c].mean(0) for c in range(len(self.classes_))])
        return self

    def predict(self, x):
        x = np.asarray(x, dtype=np.float64)
        d2 = (x * x).sum(1)[:, None] - 2.0 * x @ self.means_.T + (self.means_ ** 2).sum(1)[None, :]
        return self.classes_[d2.argmin(1)]


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass(frozen=True)
class ProbeSettings:
    """Every probe's own settings, by name (KNN_K, FEWSHOT_TEMPERATURE): passed whole, never by position."""
    knn_k: int = 10
    temperature: float = DINO_TEMPERATURE

    @classmethod
    def from_settings(cls, cfg) -> "ProbeSettings":
        return cls(knn_k=cfg.KNN_K, temperature=cfg.FEWSHOT_TEMPERATURE)


@dataclass(frozen=True)
class Probe:
    label: str  # how the figures name it (the CSV and file names keep its key in PROBES)
    marker: str  # its matplotlib marker in the figures
    colour: str  # its colour in the figures
    build: Callable  # (training labels, ProbeSettings, seed) -> an unfitted scikit-learn classifier


# The probes fitted on the embeddings. Adding a probe is one entry here: its own plot, its line in
# the all-probes plots, its few-shot curve and its column in seeds.py's table follow.
PROBES: dict[str, Probe] = {
    "SVC": Probe("SVC (RBF kernel)", "o", "#1f77b4",
                 lambda y, s, seed: make_pipeline(StandardScaler(), SVC(kernel="rbf", random_state=seed))),
    "Linear": Probe("logistic regression (linear)", "s", "#ff7f0e",
                    lambda y, s, seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000,
                                                                                          random_state=seed))),
    "kNN": Probe("kNN", "^", "#2ca02c", lambda y, s, seed: KNeighborsClassifier(n_neighbors=knn_k(y, s.knn_k))),
    "kNN_cosine": Probe("cosine kNN, votes exp(cos/T)", "D", "#d62728",
                        lambda y, s, seed: CosineKNN(k=s.knn_k, temperature=s.temperature)),
    "NCM": Probe("nearest class mean", "v", "#9467bd", lambda y, s, seed: NearestClassMean()),
}


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: round(test_fraction * n) test samples, at least one; the rest (at least one) train."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(1, int(round(test_fraction * len(members)))), len(members) - 1)
        test += list(members[:n_test])
        train += list(members[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def training_sizes(n_train: int, n_classes: int, largest: int | None = None) -> list[int]:
    """From one sample per class to all (or `largest`), roughly doubling: 1, 2, 5 per class, then 10, 20, 50, ..."""
    top = min(n_train, largest or n_train)
    per_class = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
    sizes = [p * n_classes for p in per_class if p * n_classes * 1.5 <= top]  # none crowding the last
    return sizes + [top]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """`size` indices with every class present and classes in proportion (as far as rounding allows)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if size >= len(labels):
        return np.arange(len(labels))
    take = np.maximum(1, np.floor(counts * size / len(labels)).astype(int))
    while take.sum() < size:  # hand out what rounding left over, largest remainders first
        room = counts - take
        take[np.argmax(np.where(room > 0, counts * size / len(labels) - take, -np.inf))] += 1
    while take.sum() > size:
        take[np.argmax(take)] -= 1
    return np.concatenate([rng.choice(np.flatnonzero(labels == c), t, replace=False) for c, t in zip(classes, take)])


def knn_k(y_train: np.ndarray, k: int) -> int:
    """k, but never more than the smallest class has samples: with k >= the training set, kNN
    votes the same class for every point and says nothing about the embeddings."""
    return max(1, min(k, int(np.bincount(y_train)[np.unique(y_train)].min())))


def fit_and_predict(method: str, x_train, y_train, x_test, settings: ProbeSettings, seed: int) -> np.ndarray:
    return PROBES[method].build(y_train, settings, seed).fit(x_train, y_train).predict(x_test)


def fit_and_score(method: str, x_train, y_train, x_test, y_test, settings: ProbeSettings, seed: int) -> float:
    return balanced_accuracy(y_test, fit_and_predict(method, x_train, y_train, x_test, settings, seed))


def class_recalls(y_true: np.ndarray, predicted: np.ndarray) -> dict:
    """Each class of y_true (sorted) -> the share of its rows predicted as it."""
    return {c: float(np.mean(predicted[y_true == c] == c)) for c in np.unique(y_true)}


def balanced_accuracy(y_true: np.ndarray, predicted: np.ndarray) -> float:
    """The mean recall over the classes of y_true: the value of scikit-learn's balanced_accuracy_score
    (tests/test_probe_speed.py checks), without its input validation, which cost more than the
    numbers in the few-shot runs' hundreds of calls."""
    return float(np.mean(list(class_recalls(y_true, predicted).values())))


def _threaded(calls, n_jobs: int) -> list:
    """joblib threads over the fits, each fit's BLAS on one thread: with the two pools together, 2 x 2
    BLAS threads on 2 cores spun against each other (a logistic regression on 4,000 rows took 6.2 s
    instead of 0.09 s; docs/speed.md). The fits run the same arithmetic either way."""
    with threadpool_limits(limits=1, user_api="blas"):
        return Parallel(n_jobs=n_jobs, prefer="threads")(calls)


def transfer_curves(x: np.ndarray, labels: np.ndarray, test_fraction: float, repeats: int,
                    settings: ProbeSettings, seed: int, n_jobs: int = -1, max_train: int | None = None) -> pd.DataFrame:
    """Balanced accuracy on the fixed test part for each probe, training size and repeat; training
    sets of at most `max_train` samples."""
    train, test = stratified_split(labels, test_fraction, seed)
    n_classes = len(np.unique(labels))
    jobs = []
    for size in training_sizes(len(train), n_classes, max_train):
        for repeat in range(repeats if size < len(train) else 1):
            subset = train[stratified_subset(labels[train], size, seed * 1000 + repeat)]
            jobs += [(method, size, repeat, subset) for method in PROBES]
    # threads: the fits are small and release the GIL; worker processes took longer to start (2.8 s vs 0.5 s)
    scores = _threaded((delayed(fit_and_score)(m, x[s], labels[s], x[test], labels[test], settings, seed)
                        for m, _, _, s in jobs), n_jobs)
    return pd.DataFrame([dict(method=m, n_train=size, repeat=r, n_test=len(test), balanced_accuracy=score,
                              k=knn_k(labels[s], settings.knn_k) if m == "kNN" else np.nan)
                         for (m, size, r, s), score in zip(jobs, scores)])


# ---- few-shot: exactly k images per class (transfer_learning.py, compare_heads.py) -----------------

SHOTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def shot_counts(train_labels: np.ndarray, max_train: int | None = None, shots=SHOTS) -> list[int]:
    """The k of `shots` that every class's training part can give, within max_train images in all."""
    counts = np.bincount(train_labels)[np.unique(train_labels)]
    return [k for k in shots if k <= counts.min() and (max_train is None or k * len(counts) <= max_train)]


def k_per_class(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Exactly k indices of each class, drawn without replacement from `pool` (indices into labels)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(pool[labels[pool] == c], k, replace=False) for c in np.unique(labels[pool])])


def fewshot_runs(x: np.ndarray, labels: np.ndarray, test_fraction: float, draws: int, settings: ProbeSettings,
                 seed: int, n_jobs: int = -1, max_train: int | None = None, shots=SHOTS,
                 methods=None) -> pd.DataFrame:
    """Each probe of `methods` (every one of PROBES by default) on `draws` training sets of exactly k
    images per class for each k of `shots` the data allows, scored on the same fixed test part as
    transfer_curves: balanced accuracy and, in acc_<label> columns, each class's accuracy (recall)."""
    train, test = stratified_split(labels, test_fraction, seed)
    jobs = [(method, k, draw, k_per_class(labels, train, k, seed * 1000 + 100 * k + draw))
            for k in shot_counts(labels[train], max_train, shots) for draw in range(draws)
            for method in (methods or PROBES)]
    predictions = _threaded((delayed(fit_and_predict)(m, x[s], labels[s], x[test], settings, seed)
                             for m, _, _, s in jobs), n_jobs)
    y_test = labels[test]
    rows = []
    for (method, shots, draw, subset), predicted in zip(jobs, predictions):
        recalls = class_recalls(y_test, predicted)
        rows.append(dict(method=method, shots=shots, draw=draw, n_train=len(subset), n_test=len(test),
                         balanced_accuracy=float(np.mean(list(recalls.values()))),
                         **{f"acc_{c}": r for c, r in recalls.items()}))
    return pd.DataFrame(rows)


def t_interval(values) -> tuple[float, float, float]:
    """Mean and the 95% Student-t confidence interval of the mean (NaN bounds for one value)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, np.nan, np.nan
    half = student_t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, mean - half, mean + half


def fewshot_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per probe and shot count: draws, mean, sd and 95% t-interval of the balanced accuracy."""
    rows = []
    for (method, shots), part in runs.groupby(["method", "shots"], sort=False):
        mean, low, high = t_interval(part.balanced_accuracy)
        rows.append(dict(method=method, shots=shots, n_train=int(part.n_train.iloc[0]), draws=len(part),
                         mean=mean, sd=float(part.balanced_accuracy.std(ddof=1)), ci95_low=low, ci95_high=high))
    return pd.DataFrame(rows)
