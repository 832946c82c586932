"""Average Euclidean and angular (cosine) distances between every pair of classes, for the test
set (seen classes) and for the unseen classes.

    python compute_average_distances.py

Reads:  outputs/embeddings_test.pkl, outputs/embeddings_unseen.pkl (checked against checkpoints/best.pth).
Writes: outputs/average_{euclidean,angular}_distances_{test,unseen}.csv and .png, and last
        outputs/provenance_compute_average_distances.json (see plankton/provenance.py).

Entry (a, b) is the mean distance over all pairs of one sample of class a and one of class b; the
diagonal is the mean over pairs of *distinct* samples of a class. Angular distance is 1 - cos.
TASK="multilabel": a label's samples are the images carrying it (rows_per_label).
"""
import numpy as np
import pandas as pd
import torch

from plankton import embedding_files, fileio, labelsets, locations, plots, provenance, runner, system


def class_order(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices that sort the samples by class, and each class's [start, end) in that order."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    return order, bounds


def average_cosine_distances(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """O(n·d): mean over pairs of 1 - u_i·u_j is 1 - (S_a·S_b) / (n_a n_b) with S_a the sum of class a's
    unit vectors; on the diagonal the self-pairs (u_i·u_i) are taken out. A zero vector has no
    direction: it counts as cosine 0 (distance 1) to everything."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    units = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    onehot = np.zeros((len(x), k))
    onehot[np.arange(len(x)), labels] = 1.0
    sums = onehot.T @ units  # k x d
    counts = onehot.sum(0)
    self_dots = onehot.T @ (units * units).sum(1)  # sum of u_i·u_i per class (1, or 0 for zero vectors)
    dots = sums @ sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        pairs = np.outer(counts, counts)
        np.fill_diagonal(pairs, counts * (counts - 1))
        np.fill_diagonal(dots, np.diag(dots) - self_dots)
        return np.where(pairs > 0, 1.0 - dots / pairs, np.nan)  # a class of one sample has no pairs


def average_euclidean_distances(x: np.ndarray, labels: np.ndarray, k: int, device: torch.device | str = "cpu",
                                block: int | None = None) -> np.ndarray:
    """Exact mean Euclidean distance per class pair, in blocks of at most block x block distances,
    so memory stays bounded whatever the class sizes.

    Each block is one matrix product: [x, |x|^2, 1] . [-2y, 1, |y|^2] = |x - y|^2. The products run in
    float32 (the speed of the hardware) on points centred on the class pair's own mean, which keeps
    the cancellation error far below 1e-6 relative; the sums of blocks accumulate in float64."""
    device = torch.device(device)
    block = block or (4096 if device.type == "cuda" else 512)
    order, bounds = class_order(labels, k)
    points = np.asarray(x, dtype=np.float64)[order]
    sums = np.zeros((k, k))
    for a in range(k):
        for b in range(a, k):
            rows_a, rows_b = points[bounds[a]:bounds[a + 1]], points[bounds[b]:bounds[b + 1]]
            centre = np.concatenate([rows_a, rows_b]).mean(0) if len(rows_a) + len(rows_b) else 0.0
            left = _augment(rows_a - centre, device, side="left")
            right = _augment(rows_b - centre, device, side="right")
            sums[a, b] = sums[b, a] = _pair_sum(left, right, same=a == b, block=block)
    counts = np.diff(bounds).astype(np.float64)
    pairs = np.outer(counts, counts)
    np.fill_diagonal(pairs, counts * (counts - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, sums / pairs, np.nan)


def _augment(rows: np.ndarray, device, side: str) -> torch.Tensor:
    """Left rows become [x, |x|^2, 1], right rows [-2y, 1, |y|^2] (float32 on `device`)."""
    squares = (rows * rows).sum(1, keepdims=True)
    ones = np.ones_like(squares)
    parts = (rows, squares, ones) if side == "left" else (-2.0 * rows, ones, squares)
    return torch.as_tensor(np.concatenate(parts, axis=1), dtype=torch.float32, device=device)


def _pair_sum(left: torch.Tensor, right: torch.Tensor, same: bool, block: int) -> float:
    """Sum of distances between the rows of `left` and of `right`; within a class (same=True),
    each unordered pair of distinct rows is computed once and counted twice."""
    total = 0.0
    for i in range(0, len(left), block):
        for j in range(i if same else 0, len(right), block):
            d2 = left[i:i + block] @ right[j:j + block].T
            if same and i == j:
                d2.fill_diagonal_(0.0)  # a sample's distance to itself is exactly 0, not rounding noise
            block_sum = _sqrt_sum(d2)
            total += block_sum if not same or i == j else 2.0 * block_sum
    return total


def _sqrt_sum(squared: torch.Tensor) -> float:
    """Sum of sqrt(max(x, 0)) over a block of squared distances. On the CPU one compiled pass
    (numba) instead of torch's three (clamp, sqrt, sum): the Euclidean matrix on 20,000 x 128 went
    from 0.48-0.55 s to 0.38-0.42 s here. On CUDA, torch's kernels."""
    if squared.device.type != "cpu":
        return squared.clamp_(min=0.0).sqrt_().sum(dtype=torch.float64).item()
    return _sqrt_sum_cpu(squared.numpy())


def _compiled_sqrt_sum():
    import numba

    @numba.njit(fastmath=True, cache=True)
    def sqrt_sum(squared):
        total = 0.0
        for i in range(squared.shape[0]):
            row_sum = np.float32(0.0)  # one row of a block: a float32 sum is exact to ~1e-7
            for j in range(squared.shape[1]):
                value = squared[i, j]
                row_sum += np.sqrt(value) if value > 0 else np.float32(0.0)
            total += row_sum  # rows accumulate in float64
        return total
    return sqrt_sum


def _sqrt_sum_cpu(squared: np.ndarray) -> float:
    global _SQRT_SUM
    if _SQRT_SUM is None:  # compiled on first use, and kept in numba's on-disk cache
        _SQRT_SUM = _compiled_sqrt_sum()
    return float(_SQRT_SUM(squared))


_SQRT_SUM = None


def brute_force_average_distances(x: np.ndarray, labels: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Reference: scipy's cdist for every class pair (the straightforward way; O(n^2) memory per pair)."""
    from scipy.spatial.distance import cdist
    result = np.zeros((k, k))
    for a in range(k):
        for b in range(k):
            d = cdist(x[labels == a], x[labels == b], metric=metric)
            if a == b:
                n = len(d)
                result[a, b] = (d.sum() - np.trace(d)) / (n * (n - 1)) if n > 1 else np.nan
            else:
                result[a, b] = d.mean()
    return result


def plot_matrix(matrix: np.ndarray, class_names: list[str], title: str, path, value_range: tuple[float, float],
                colour_label: str, axis_label: str = "class") -> None:
    """A class x class (or label x label) heatmap on a fixed colour range, so that figures made on the
    same range (test and unseen) can be compared by colour."""
    plt = plots.pyplot()
    k = len(class_names)
    side = max(4.5, 0.75 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.4, side))
    image = ax.imshow(matrix, cmap="viridis", vmin=value_range[0], vmax=value_range[1])
    middle = sum(value_range) / 2
    digits = 3 if np.nanmax(np.abs(matrix)) < 10 else 1
    for i in range(k):
        for j in range(k):
            value = matrix[i, j]
            ax.text(j, i, "n/a" if not np.isfinite(value) else f"{value:.{digits}f}", ha="center", va="center",
                    fontsize=9 if k <= 10 else 6, color="black" if value > middle else "white")
    plots.class_ticks(ax, class_names)
    ax.set_xlabel(axis_label)
    ax.set_ylabel(axis_label)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(colour_label)
    plots.save_figure(fig, path)


def at_most_per_class(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices keeping every sample of a class of at most `limit`, and `limit` random ones of
    a larger class: the mean over sampled pairs estimates the mean over all pairs without bias."""
    rng = np.random.default_rng(seed)
    keep = [members if len(members) <= limit else rng.choice(members, limit, replace=False)
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def rows_per_label(frame: pd.DataFrame) -> pd.DataFrame:
    """Multi-label embeddings (a `labels` column): one row per image and label it carries among the
    table's classes, so each label's distances are over the images carrying it (an image with two
    labels counts in both; its pair with itself, distance 0, is in their off-diagonal entry).
    Single-label tables come back as they are."""
    if "labels" not in frame.columns:
        return frame
    names = list(embedding_files.info(frame).class_names)
    index = {name: i for i, name in enumerate(names)}
    pairs = [(row, index[label]) for row, text in enumerate(frame["labels"])
             for label in text.split(labelsets.LABEL_SEPARATOR) if label in index]
    rows, labels = (list(column) for column in zip(*pairs))
    exploded = frame.iloc[rows].reset_index(drop=True)
    exploded["label"] = np.array(labels, dtype=np.int64)
    exploded["class_name"] = [names[i] for i in labels]
    exploded.attrs = dict(frame.attrs)
    return exploded


KINDS = {"euclidean": "Average Euclidean distance", "angular": "Average angular distance (1 - cos)"}


def class_distances(frame: pd.DataFrame, limit: int, seed: int, device) -> dict:
    """Both class x class matrices of one embeddings table; Euclidean on at most `limit` samples per class."""
    source = embedding_files.info(frame)
    names = list(source.class_names)
    x, labels = embedding_files.embedding_matrix(frame), frame.label.to_numpy()
    kept = at_most_per_class(labels, limit, seed)
    sampled = "" if len(kept) == len(labels) else f" (Euclidean: at most {limit} random samples per class)"
    subset = source.subset
    if sampled:
        print(f"note: {subset}: Euclidean distances from {len(kept)} of {len(labels)} samples, at most "
              f"DISTANCE_SAMPLES={limit} per class (all pairs of every class would grow with the square)")
    for name, n in zip(names, np.bincount(labels, minlength=len(names))):
        if n < 2:
            print(f"note: class {name} has {n} {subset} sample(s): its diagonal entry is undefined (n/a)")
        elif n < 10:
            print(f"note: class {name} has only {n} {subset} samples: its distances rest on very few images")
    return dict(euclidean=average_euclidean_distances(x[kept], labels[kept], len(names), device),
                angular=average_cosine_distances(x, labels, len(names)), sampled=sampled)


def shared_range(matrices: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([m[np.isfinite(m)] for m in matrices])
    return (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    device = system.pick_device(cfg.DEVICE)
    frames = {subset: rows_per_label(embedding_files.open_embeddings(paths, subset)) for subset in ("test", "unseen")}
    inputs = provenance.start_stage(paths, "compute_average_distances",
                                   [paths.best] + [paths.embeddings(s) for s in frames])
    matrices = {subset: class_distances(frame, cfg.DISTANCE_SAMPLES, cfg.SEED, device) for subset, frame in frames.items()}
    outputs = []
    for kind, label in KINDS.items():
        value_range = shared_range([matrices[s][kind] for s in frames])  # one colour scale for test and unseen
        for subset, frame in frames.items():
            names, matrix = list(embedding_files.info(frame).class_names), matrices[subset][kind]
            table = pd.DataFrame(matrix, index=names, columns=names)
            print(f"\nAverage {kind} distances, {subset} ({len(frame)} samples):\n{table.round(4).to_string()}")
            stem = paths.out / f"average_{kind}_distances_{subset}"
            outputs += [stem.with_suffix(".csv"), stem.with_suffix(".png")]
            fileio.save_csv(table, stem.with_suffix(".csv"))
            what, samples, unit = ("test data (seen classes)" if subset == "test" else "unseen classes",
                                   f"{len(frame)} samples", "class")
            if embedding_files.info(frame).task == "multilabel":  # an image counts once for each label it carries
                what = ("test images carrying each seen label" if subset == "test"
                        else "held-out images carrying each unseen label")
                samples, unit = f"{len(frame)} image-label pairs", "label"
            sampled = matrices[subset]["sampled"] if kind == "euclidean" else ""
            plot_matrix(matrix, names, f"{label}, {what}\n{samples}{sampled.replace('class', unit)}; diagonal: "
                        f"distinct pairs within a {unit}\n(colour scale shared with the "
                        f"{'unseen' if subset == 'test' else 'test'} figure)", stem.with_suffix(".png"), value_range,
                        label, axis_label=unit)
    provenance.save_provenance(paths, "compute_average_distances", inputs, outputs, cfg)
    print(f"\n-> {paths.out}/average_*_distances_*.csv and .png")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
