"""How well can the unseen classes be learned from the embeddings? The unseen classes' embeddings
are split into a training part and a fixed test part (stratified); for growing training-set sizes
each probe (SVC, logistic regression, kNN, cosine-weighted kNN, nearest class mean) is fitted and
scored by balanced accuracy. Then the few-shot curves: training sets of exactly k images per class.

    python transfer_learning.py

Reads:  outputs/embeddings_unseen.pkl (checked against checkpoints/best.pth).
Writes: outputs/transfer_learning.csv (every fit), outputs/accuracy_<probe>.png for each probe of
        PROBES (the study's SVC, Linear and kNN plots among them), outputs/accuracy_all.png,
        outputs/fewshot.csv (every few-shot fit: probe, shots, draw, balanced accuracy, accuracy per class),
        outputs/fewshot_summary.csv (per probe and shots: mean, sd, 95% t-interval over the draws),
        outputs/fewshot_all.png (every probe, accuracy against k with its interval band),
        outputs/fewshot_per_class.png (per-class accuracy at the largest k),
        and last outputs/provenance_transfer_learning.json.

Study curves: each training subset is stratified and drawn TRANSFER_REPEATS times per size with
different seeds; the plots show the mean and the spread (min to max) over those draws. SVC (RBF
kernel) and the linear classifier (logistic regression) see standardised embeddings; kNN measures
plain Euclidean distances in the embedding space, as the distance analysis does, with k = KNN_K or,
for the smallest training sets, the size of the smallest class (recorded in the CSV's k column).
The cosine-weighted kNN is DINO's evaluation of features: the KNN_K training images of highest
cosine similarity (all of them when fewer) vote for their class with weight exp(cos / T),
T = FEWSHOT_TEMPERATURE; the class with the largest sum wins. Nearest class mean predicts the class
whose mean training embedding is closest (Euclidean).

Few-shot: on the same fixed test part, training sets of exactly k images per class (k = 1, 2, 5,
10, 20, 50, ... while the smallest class's training part has k images and k x classes stays within
TRANSFER_MAX_TRAIN), FEWSHOT_DRAWS random draws for each k. The mean over draws comes with a 95%
Student-t confidence interval: mean +- t(0.975, draws - 1) x sd / sqrt(draws), sd the sample
standard deviation over draws. It says how well the mean is known for this test part; it does not
cover the choice of test part.
"""
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from scipy.stats import t as student_t
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

import artifacts
import common
import tasks

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


# The probes fitted on the embeddings: name -> (training labels, KNN_K, seed, temperature) -> an
# unfitted scikit-learn classifier. Adding a probe is one entry here; its own plot, its line in the
# all-probes plots and its few-shot curve follow.
PROBES = {
    "SVC": lambda y, k, seed, t: make_pipeline(StandardScaler(), SVC(kernel="rbf", random_state=seed)),
    "Linear": lambda y, k, seed, t: make_pipeline(StandardScaler(),
                                                  LogisticRegression(max_iter=2000, random_state=seed)),
    "kNN": lambda y, k, seed, t: KNeighborsClassifier(n_neighbors=knn_k(y, k)),
    "kNN_cosine": lambda y, k, seed, t: CosineKNN(k=k, temperature=t),
    "NCM": lambda y, k, seed, t: NearestClassMean(),
}


TASKS = ("multiclass",)  # single-label only: learns the unseen classes as single labels; run_all.py skips it for TASK="multilabel"


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


def fit_and_predict(method, x_train, y_train, x_test, k, seed, temperature=DINO_TEMPERATURE) -> np.ndarray:
    return PROBES[method](y_train, k, seed, temperature).fit(x_train, y_train).predict(x_test)


def fit_and_score(method, x_train, y_train, x_test, y_test, k, seed, temperature=DINO_TEMPERATURE) -> float:
    return balanced_accuracy_score(y_test, fit_and_predict(method, x_train, y_train, x_test, k, seed, temperature))


def transfer_curves(x: np.ndarray, labels: np.ndarray, test_fraction: float, repeats: int, k: int, seed: int,
                    n_jobs: int = -1, max_train: int | None = None,
                    temperature: float = DINO_TEMPERATURE) -> pd.DataFrame:
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
    scores = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fit_and_score)(m, x[s], labels[s], x[test], labels[test],
                                                            k, seed, temperature) for m, _, _, s in jobs)
    return pd.DataFrame([dict(method=m, n_train=size, repeat=r, n_test=len(test), balanced_accuracy=score,
                              k=knn_k(labels[s], k) if m == "kNN" else np.nan)
                         for (m, size, r, s), score in zip(jobs, scores)])


# ---- few-shot: exactly k images per class ---------------------------------------------------------

SHOTS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def shot_counts(train_labels: np.ndarray, max_train: int | None = None) -> list[int]:
    """The k of SHOTS that every class's training part can give, within max_train images in all."""
    counts = np.bincount(train_labels)[np.unique(train_labels)]
    return [k for k in SHOTS if k <= counts.min() and (max_train is None or k * len(counts) <= max_train)]


def k_per_class(labels: np.ndarray, pool: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Exactly k indices of each class, drawn without replacement from `pool` (indices into labels)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(pool[labels[pool] == c], k, replace=False) for c in np.unique(labels[pool])])


def fewshot_runs(x: np.ndarray, labels: np.ndarray, test_fraction: float, draws: int, k: int, seed: int,
                 temperature: float = DINO_TEMPERATURE, n_jobs: int = -1, max_train: int | None = None) -> pd.DataFrame:
    """Every probe on `draws` training sets of exactly `shots` images per class for each shot count,
    scored on the same fixed test part as transfer_curves: balanced accuracy and, in acc_<label>
    columns, each class's accuracy (recall)."""
    train, test = stratified_split(labels, test_fraction, seed)
    jobs = [(method, shots, draw, k_per_class(labels, train, shots, seed * 1000 + 100 * shots + draw))
            for shots in shot_counts(labels[train], max_train) for draw in range(draws) for method in PROBES]
    predictions = Parallel(n_jobs=n_jobs, prefer="threads")(
        delayed(fit_and_predict)(m, x[s], labels[s], x[test], k, seed, temperature) for m, _, _, s in jobs)
    classes, y_test = np.unique(labels), labels[test]
    rows = []
    for (method, shots, draw, subset), predicted in zip(jobs, predictions):
        per_class = {f"acc_{c}": float(np.mean(predicted[y_test == c] == c)) for c in classes}
        rows.append(dict(method=method, shots=shots, draw=draw, n_train=len(subset), n_test=len(test),
                         balanced_accuracy=balanced_accuracy_score(y_test, predicted), **per_class))
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


# how the figures name each probe (the CSV and file names keep the keys of PROBES)
PROBE_NAMES = {"SVC": "SVC (RBF kernel)", "Linear": "logistic regression (linear)", "kNN": "kNN",
               "kNN_cosine": "cosine kNN, votes exp(cos/T)", "NCM": "nearest class mean"}
MARKERS = "os^DvP*X"


def plot_curves(results: pd.DataFrame, methods, chance: float, title: str, path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.8, 5.0))
    n_classes = round(1 / chance)
    for marker, method in zip(MARKERS, methods):
        stats = results[results.method == method].groupby("n_train").balanced_accuracy.agg(["mean", "min", "max"])
        name = PROBE_NAMES.get(method, method)
        line, = ax.plot(stats.index, stats["mean"], f"{marker}-", label=f"{name} (mean)")
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15, color=line.get_color(),
                        label=f"{name} (min–max of draws)" if len(methods) == 1 else None)
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
    sizes = sorted(results.n_train.unique())
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s}\n({s / n_classes:.3g})" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training samples in all (per class in brackets; log scale)")
    ax.set_ylabel("balanced accuracy on the test part")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    common.save_figure(fig, path)


def plot_fewshot(summary: pd.DataFrame, chance: float, title: str, path) -> None:
    """Every probe's mean balanced accuracy against k images per class, its 95% interval as a band."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8.4, 5.2))
    for marker, method in zip(MARKERS, PROBES):
        part = summary[summary.method == method].sort_values("shots")
        line, = ax.plot(part.shots, part["mean"], f"{marker}-", label=PROBE_NAMES.get(method, method))
        ax.fill_between(part.shots, part.ci95_low, part.ci95_high, alpha=0.15, color=line.get_color())
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
    shots = sorted(summary.shots.unique())
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("training images per class, k (log scale)")
    ax.set_ylabel("balanced accuracy on the test part")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8, title="probe (band: 95% t-interval)", title_fontsize=8)
    common.save_figure(fig, path)


def plot_per_class(runs: pd.DataFrame, class_names: list[str], title: str, path) -> None:
    """Each class's accuracy at the largest k: one bar per probe, the mean over draws with its 95%
    t-interval as an error bar."""
    plt = common.pyplot()
    largest = runs[runs.shots == runs.shots.max()]
    width = 0.8 / len(PROBES)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(class_names) + 3), 4.8))
    for i, method in enumerate(PROBES):
        part = largest[largest.method == method]
        cells = [t_interval(part[f"acc_{name}"]) for name in class_names]
        means = np.array([c[0] for c in cells])
        errors = np.array([[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]])
        ax.bar(np.arange(len(class_names)) + (i - (len(PROBES) - 1) / 2) * width, means, width,
               yerr=np.nan_to_num(errors), capsize=2, label=PROBE_NAMES.get(method, method))
    ax.set_xticks(range(len(class_names)), class_names, rotation=30 if max(map(len, class_names)) > 6 else 0)
    ax.set_xlabel("unseen class")
    ax.set_ylabel("accuracy on the class's test images")
    ax.set_ylim(0, 1.15)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncol=min(3, len(PROBES)), fontsize=8)
    common.save_figure(fig, path)


def run_fewshot(cfg, x: np.ndarray, labels: np.ndarray, class_names: list[str], out) -> list:
    """The few-shot runs, their table and summary, and their two figures; returns the files written."""
    runs = fewshot_runs(x, labels, cfg.TRANSFER_TEST_FRACTION, cfg.FEWSHOT_DRAWS, cfg.KNN_K, cfg.SEED,
                        cfg.FEWSHOT_TEMPERATURE, max_train=cfg.TRANSFER_MAX_TRAIN)
    if runs.empty:
        print("note: few-shot curves skipped: no class has a training part")
        return []
    runs = runs.rename(columns={f"acc_{i}": f"acc_{name}" for i, name in enumerate(class_names)})
    summary = fewshot_summary(runs)
    outputs = [out / "fewshot.csv", out / "fewshot_summary.csv", out / "fewshot_all.png", out / "fewshot_per_class.png"]
    common.save_csv(runs, outputs[0], index=False)
    common.save_csv(summary, outputs[1], index=False)
    table = summary.assign(cell=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                 zip(summary["mean"], summary.ci95_low, summary.ci95_high)])
    print(f"Few-shot balanced accuracy, mean [95% t-interval] over {cfg.FEWSHOT_DRAWS} draws of exactly k images "
          f"per class:")
    print(table.pivot(index="shots", columns="method", values="cell")[list(PROBES)].to_string())
    present = [class_names[c] for c in np.unique(labels)]
    where = (f"{len(present)} unseen classes, {int(runs.n_test.iloc[0])} test images, {cfg.FEWSHOT_DRAWS} draws per k; "
             f"cosine kNN: {cfg.KNN_K} neighbours, T = {cfg.FEWSHOT_TEMPERATURE}")
    plot_fewshot(summary, 1.0 / len(present), f"Few-shot transfer, every probe: mean and 95% t-interval\n{where}",
                 outputs[2])
    plot_per_class(runs, present, f"Per-class accuracy with k = {int(runs.shots.max())} training images per class "
                                   f"(mean and 95% t-interval over {cfg.FEWSHOT_DRAWS} draws)", outputs[3])
    return outputs


def run(cfg) -> None:
    tasks.require(cfg.TASK, TASKS, "transfer_learning.py")
    paths = artifacts.prepare_output_dirs(cfg)
    frame = artifacts.open_embeddings(paths, "unseen")
    names = list(frame.attrs["class_names"])
    counts = frame.class_name.value_counts()
    too_few = [c for c in names if counts.get(c, 0) < 2]
    if too_few:
        print(f"note: classes {too_few} have fewer than 2 images and cannot be both trained and tested: left out")
        frame = frame[~frame.class_name.isin(too_few)]
    if frame.class_name.nunique() < 2:
        raise common.PipelineError("transfer learning needs at least two unseen classes with 2 or more images each")
    inputs = artifacts.start_stage(paths, "transfer_learning", [paths.best, paths.embeddings("unseen")])
    x, labels = artifacts.embedding_matrix(frame), frame.label.to_numpy()
    results = transfer_curves(x, labels, cfg.TRANSFER_TEST_FRACTION, cfg.TRANSFER_REPEATS, cfg.KNN_K, cfg.SEED,
                              max_train=cfg.TRANSFER_MAX_TRAIN, temperature=cfg.FEWSHOT_TEMPERATURE)
    available = len(labels) - int(results.n_test.iloc[0])
    if available > cfg.TRANSFER_MAX_TRAIN:
        print(f"note: training sets capped at TRANSFER_MAX_TRAIN={cfg.TRANSFER_MAX_TRAIN} of the {available} "
              f"training images (an RBF SVC's cost grows with the square of its training set or more)")
    outputs = [paths.out / "transfer_learning.csv"]
    common.save_csv(results, outputs[0], index=False)

    n_classes, n_test = frame.class_name.nunique(), int(results.n_test.iloc[0])
    summary = results.groupby(["n_train", "method"]).balanced_accuracy.mean().unstack()[list(PROBES)]
    print(f"Balanced accuracy on {n_test} held-out unseen images ({n_classes} classes), mean over draws:")
    print(summary.round(4).to_string())
    if n_test < 10 * n_classes:
        print(f"note: the test part has only {n_test} images: each accuracy moves by {1 / n_test:.2f} per image")
    chance = 1.0 / n_classes
    where = f"{n_classes} unseen classes, {n_test} test images"
    for method in PROBES:
        outputs.append(paths.out / f"accuracy_{method}.png")
        plot_curves(results, [method], chance, f"{PROBE_NAMES.get(method, method)} on the embeddings: {where}", outputs[-1])
    outputs.append(paths.out / "accuracy_all.png")
    plot_curves(results, list(PROBES), chance, f"All classifiers: {where}", outputs[-1])
    outputs += run_fewshot(cfg, x, labels, names, paths.out)
    artifacts.save_provenance(paths, "transfer_learning", inputs, outputs)
    print(f"-> {paths.out / 'transfer_learning.csv'}, {paths.out}/accuracy_*.png")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
