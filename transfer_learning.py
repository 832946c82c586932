"""How well can the unseen classes be learned from the embeddings? The unseen classes' embeddings
are split into a training part and a fixed test part (stratified); for growing training-set sizes an
SVC, a linear classifier and a kNN classifier are fitted and scored by balanced accuracy.

    python transfer_learning.py

Reads:  outputs/embeddings_unseen.pkl (checked against checkpoints/best.pth).
Writes: outputs/transfer_learning.csv (every fit), outputs/accuracy_SVC.png, outputs/accuracy_Linear.png,
        outputs/accuracy_kNN.png, outputs/accuracy_all.png, and last outputs/provenance_transfer_learning.json.

Each training subset is stratified and drawn TRANSFER_REPEATS times per size with different seeds;
the plots show the mean and the spread (min to max) over those draws. SVC (RBF kernel) and the
linear classifier (logistic regression) see standardised embeddings; kNN measures plain Euclidean
distances in the embedding space, as the distance analysis does, with k = KNN_K or, for the smallest
training sets, the size of the smallest class (recorded in the CSV's k column).
"""
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

import artifacts
import common
import tasks

# The probes fitted on the embeddings: name -> (training labels, KNN_K, seed) -> an unfitted
# scikit-learn classifier. Adding a probe is one entry here; its own plot and its line in the
# all-probes plot follow.
PROBES = {
    "SVC": lambda y, k, seed: make_pipeline(StandardScaler(), SVC(kernel="rbf", random_state=seed)),
    "Linear": lambda y, k, seed: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed)),
    "kNN": lambda y, k, seed: KNeighborsClassifier(n_neighbors=knn_k(y, k)),
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


def fit_and_score(method, x_train, y_train, x_test, y_test, k, seed) -> float:
    model = PROBES[method](y_train, k, seed).fit(x_train, y_train)
    return balanced_accuracy_score(y_test, model.predict(x_test))


def transfer_curves(x: np.ndarray, labels: np.ndarray, test_fraction: float, repeats: int, k: int, seed: int,
                    n_jobs: int = -1, max_train: int | None = None) -> pd.DataFrame:
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
                                                            k, seed) for m, _, _, s in jobs)
    return pd.DataFrame([dict(method=m, n_train=size, repeat=r, n_test=len(test), balanced_accuracy=score,
                              k=knn_k(labels[s], k) if m == "kNN" else np.nan)
                         for (m, size, r, s), score in zip(jobs, scores)])


# how the figures name each probe (the CSV and file names keep the keys of PROBES)
PROBE_NAMES = {"SVC": "SVC (RBF kernel)", "Linear": "logistic regression (linear)", "kNN": "kNN"}
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
                              max_train=cfg.TRANSFER_MAX_TRAIN)
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
    artifacts.save_provenance(paths, "transfer_learning", inputs, outputs)
    print(f"-> {paths.out / 'transfer_learning.csv'}, {paths.out}/accuracy_*.png")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
