"""Embedding quality in numbers, one row per subset, so that two runs (another trunk, other weights,
fine-tuned or not) can be compared by number rather than by looking at UMAP (t-SNE, PCA) pictures.

    python embedding_quality.py

Reads:  outputs/embeddings_{test,unseen}.pkl (checked against checkpoints/best.pth),
        outputs/<method>_coordinates.csv (from dimensionality_reduction.py, for the trustworthiness:
        the plane of whichever DIMRED it ran, named in the table's `projection` column).
Writes: outputs/embedding_quality.csv (one row per subset: test, unseen), and last
        outputs/provenance_embedding_quality.json.

The metrics, all on the 128-d embeddings as embed.py wrote them (no standardising), Euclidean:
- silhouette: scikit-learn's silhouette_score (mean over images of (b - a) / max(a, b), a = mean
  distance to its own class, b = to the nearest other class); from -1 to 1, higher is better.
- recall_at_k (k = 1, 5, 10), leave-one-out: for each image, its k nearest other images of the
  same subset (itself excluded; ties broken by row order); recall@k is the share of images with at
  least one image of their own class among those k. Images whose class has no other image in the
  subset cannot score and are left out (n_recall counts the images that count).
- mean_within / mean_between: the mean distance over all pairs of different images of the same
  class / of different classes (each unordered pair once); between_within_ratio is their ratio
  (above 1: classes are further from each other than their members are from one another).
- trustworthiness: scikit-learn's trustworthiness of the 2-d coordinates (UMAP, t-SNE or PCA:
  `projection`) against the embeddings, for the subset's points that dimensionality_reduction.py
  plotted, with QUALITY_TRUST_NEIGHBORS neighbours (1 = every 2-d neighbourhood holds only true
  neighbours). The plane was fitted on standardised train, test and unseen points together; this
  measures how well the picture keeps each subset's own neighbourhoods.
Every metric uses at most QUALITY_SAMPLES random images of a subset (the same sample for all;
n_used says how many, and a note is printed when the cap applies): silhouette and the pairwise
means grow with the square of the images.

Multi-label runs (TASK="multilabel") measure each label one-vs-rest, over the subset's images
(test: the seen labels; unseen: the unseen labels), and write outputs/embedding_quality_labels.csv
(one row per subset and label, then a row "(mean)" per subset: the mean over its labels, with the
subset's trustworthiness, which needs no labels):
- silhouette of the two groups "carries the label" / "does not" (NaN with fewer than 2 of either);
- recall_at_k: among the images carrying the label that share it with another image, the share with
  at least one other image carrying it among their k nearest (leave-one-out, as above); compare it
  with carrying_share, the share of the images that carry the label (what a random neighbour gives);
- mean_within: mean distance over pairs of different images that both carry the label;
  mean_between: over pairs of which exactly one carries it; their ratio as above.
"""
import numpy as np
import pandas as pd
import sklearn
import torch
from sklearn.manifold import trustworthiness
from sklearn.metrics import silhouette_score

import dataloader
from plankton import embedding_files, fileio, labelsets, locations, provenance, registry, runner

SUBSETS = ("test", "unseen")
RECALL_AT = (1, 5, 10)
SILHOUETTE_WORKING_MB = 64  # scikit-learn's default, 1 GB, took 5,000 x 5,000 distances at once (+0.4 GB)



def pairwise_pass(x: np.ndarray, labels: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, dict]:
    """One blocked pass over all pairs: each row's k nearest other rows (Euclidean, nearest first,
    ties by row order) and the sums and counts of same-class and different-class pair distances
    (each ordered pair, self-pairs excluded)."""
    points = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(labels)
    squares = (points * points).sum(1)
    k = min(k, len(points) - 1)
    nearest, sums = dataloader.Rows(len(points), np.int64), dict(within=0.0, n_within=0, between=0.0, n_between=0)
    for start in range(0, len(points), block):
        rows = torch.arange(start, min(start + block, len(points)))
        d2 = (squares[rows, None] - 2.0 * (points[rows] @ points.T) + squares[None, :]).clamp_(min=0.0)
        distances = d2.sqrt()
        same = y[rows, None] == y[None, :]
        own = torch.zeros_like(same)
        own[torch.arange(len(rows)), rows] = True
        sums["within"] += float(distances[same & ~own].sum())
        sums["n_within"] += int((same & ~own).sum())
        sums["between"] += float(distances[~same].sum())
        sums["n_between"] += int((~same).sum())
        distances[own] = float("inf")
        # a stable sort keeps row order among equal distances; written into one array (dataloader.Rows)
        nearest.add(torch.sort(distances, dim=1, stable=True).indices[:, :k])
    return nearest.result(), sums


def recall_at(nearest: np.ndarray, labels: np.ndarray, ks=RECALL_AT) -> tuple[dict, int]:
    """recall@k for each k from each row's nearest other rows, over the rows whose class has
    another member; and how many rows those are."""
    counts = np.bincount(labels)
    counted = counts[labels] > 1
    hits = labels[nearest] == labels[:, None]
    return {f"recall_at_{k}": float(hits[counted, :k].any(1).mean()) if counted.any() else np.nan
            for k in ks}, int(counted.sum())


def quality_row(x: np.ndarray, labels: np.ndarray) -> dict:
    """Silhouette, recall@1/5/10, mean within- and between-class distances and their ratio."""
    nearest, sums = pairwise_pass(x, labels, max(RECALL_AT))
    recalls, n_recall = recall_at(nearest, labels)
    within = sums["within"] / sums["n_within"] if sums["n_within"] else np.nan
    between = sums["between"] / sums["n_between"] if sums["n_between"] else np.nan
    classes = len(np.unique(labels))
    with sklearn.config_context(working_memory=SILHOUETTE_WORKING_MB):  # its distance rows in chunks this size
        silhouette = silhouette_score(x, labels) if 2 <= classes < len(labels) else np.nan
    return dict(n_classes=classes, silhouette=float(silhouette), **recalls, n_recall=n_recall,
                mean_within=within, mean_between=between, between_within_ratio=between / within)


def plane_trustworthiness(x: np.ndarray, paths_used: list[str], coords: pd.DataFrame, subset: str,
                          neighbours: int) -> tuple[float, int]:
    """Trustworthiness of the subset's 2-d coordinates against its embeddings, over the
    images that are both in `paths_used` and in the plotted sample; (NaN, n) when too few."""
    plotted = coords[coords.subset == subset].drop_duplicates("path").set_index("path")[["x", "y"]]
    keep = np.flatnonzero(pd.Index(paths_used).isin(plotted.index))
    n_neighbours = min(neighbours, (len(keep) - 1) // 2)  # scikit-learn needs n_neighbors < n / 2
    if n_neighbours < 1:
        return np.nan, len(keep)
    xy = plotted.loc[[paths_used[i] for i in keep]].to_numpy()
    return float(trustworthiness(x[keep], xy, n_neighbors=n_neighbours)), len(keep)


def subset_quality(frame: pd.DataFrame, coords: pd.DataFrame, subset: str, limit: int, neighbours: int,
                   seed: int) -> dict:
    """The table's row for one subset, on at most `limit` random images of it."""
    n = len(frame)
    used = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if n > limit else np.arange(n)
    if n > limit:
        print(f"note: {subset}: the metrics use {limit} random images of {n} (QUALITY_SAMPLES={limit})")
    x, labels = embedding_files.embedding_matrix(frame)[used].astype(np.float64), frame.label.to_numpy()[used]
    trust, n_trust = plane_trustworthiness(x, list(frame.path.iloc[used]), coords, subset, neighbours)
    row = dict(subset=subset, n_images=n, n_used=len(used))
    if len(used) < 3:
        print(f"note: {subset}: {len(used)} image(s), too few for the metrics")
        return row
    return {**row, **quality_row(x, labels), "trustworthiness": trust, "n_trust": n_trust,
            "trust_neighbors": min(neighbours, (n_trust - 1) // 2)}


# ---- multi-label: each label one-vs-rest ---------------------------------------------------------

def label_pair_sums(x: np.ndarray, carried: np.ndarray, block: int = 256) -> tuple[np.ndarray, ...]:
    """Per label (column of `carried`): the sum and count of distances over ordered pairs of different
    images that both carry it (within), and over ordered pairs of which exactly one does (between)."""
    points = torch.as_tensor(x, dtype=torch.float64)
    c = torch.as_tensor(carried, dtype=torch.float64)
    squares = (points * points).sum(1)
    within, between = np.zeros(c.shape[1]), np.zeros(c.shape[1])
    for start in range(0, len(points), block):
        rows = slice(start, min(start + block, len(points)))
        distances = (squares[rows, None] - 2.0 * (points[rows] @ points.T) + squares[None, :]).clamp_(min=0.0).sqrt()
        # distances @ c: each row's summed distance to the carriers of each label (self-distance 0 adds nothing)
        to_carriers, to_others = distances @ c, distances @ (1.0 - c)
        within += (c[rows] * to_carriers).sum(0).numpy()
        between += (c[rows] * to_others + (1.0 - c[rows]) * to_carriers).sum(0).numpy()
    n_carrying = carried.sum(0).astype(np.int64)
    return within, n_carrying * (n_carrying - 1), between, 2 * n_carrying * (len(x) - n_carrying)


def label_quality_rows(x: np.ndarray, carried: np.ndarray, names: list[str]) -> list[dict]:
    """One row per label: its one-vs-rest silhouette, recall@1/5/10 and within/between distances."""
    nearest, _ = pairwise_pass(x, np.zeros(len(x), dtype=np.int64), max(RECALL_AT))  # neighbours need no labels
    within, n_within, between, n_between = label_pair_sums(x, carried)
    rows = []
    for i, name in enumerate(names):
        mine = carried[:, i] > 0
        counted = mine & (mine.sum() > 1)
        hits = mine[nearest]
        recalls = {f"recall_at_{k}": float(hits[counted, :k].any(1).mean()) if counted.any() else np.nan
                   for k in RECALL_AT}
        with sklearn.config_context(working_memory=SILHOUETTE_WORKING_MB):
            silhouette = silhouette_score(x, mine) if 2 <= mine.sum() <= len(x) - 2 else np.nan
        mean_within = within[i] / n_within[i] if n_within[i] else np.nan
        mean_between = between[i] / n_between[i] if n_between[i] else np.nan
        rows.append(dict(label=name, n_carrying=int(mine.sum()), carrying_share=float(mine.mean()), silhouette=float(silhouette), **recalls,
                         n_recall=int(counted.sum()), mean_within=mean_within, mean_between=mean_between,
                         between_within_ratio=mean_between / mean_within if mean_within else np.nan))
    return rows


def subset_label_quality(frame: pd.DataFrame, coords: pd.DataFrame, subset: str, limit: int, neighbours: int,
                         seed: int) -> list[dict]:
    """The multi-label table's rows for one subset (its labels, then "(mean)"), on at most `limit`
    random images of it."""
    n = len(frame)
    used = np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)) if n > limit else np.arange(n)
    if n > limit:
        print(f"note: {subset}: the metrics use {limit} random images of {n} (QUALITY_SAMPLES={limit})")
    names = list(embedding_files.info(frame).class_names)
    x = embedding_files.embedding_matrix(frame)[used].astype(np.float64)
    head = dict(subset=subset, n_images=n, n_used=len(used))
    if len(used) < 3:
        print(f"note: {subset}: {len(used)} image(s), too few for the metrics")
        return [dict(head, label="(mean)")]
    rows = [dict(head, **row) for row in label_quality_rows(x, labelsets.multi_hot(frame["labels"].iloc[used], names),
                                                            names)]
    trust, n_trust = plane_trustworthiness(x, list(frame.path.iloc[used]), coords, subset, neighbours)
    mean = pd.DataFrame(rows).drop(columns=["subset", "label", "n_images", "n_used", "n_carrying", "n_recall"]).mean()
    return rows + [dict(head, label="(mean)", **mean.to_dict(), trustworthiness=trust, n_trust=n_trust,
                        trust_neighbors=min(neighbours, (n_trust - 1) // 2))]


def run(cfg) -> None:
    registry.require_task("embedding_quality", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    frames = {s: embedding_files.open_embeddings(paths, s) for s in SUBSETS}
    method, coords = embedding_files.open_projection_coordinates(paths)
    inputs = provenance.start_stage(paths, "embedding_quality", [paths.best, paths.coordinates(method)]
                                   + [paths.embeddings(s) for s in SUBSETS])
    settings = (cfg.QUALITY_SAMPLES, cfg.QUALITY_TRUST_NEIGHBORS, cfg.SEED)
    if embedding_files.info(frames["test"]).task == "multilabel":
        rows = [row for s in SUBSETS for row in subset_label_quality(frames[s], coords, s, *settings)]
        output, title = paths.out / "embedding_quality_labels.csv", "Embedding quality per label, one-vs-rest"
    else:
        rows = [subset_quality(frames[s], coords, s, *settings) for s in SUBSETS]
        output, title = paths.out / "embedding_quality.csv", "Embedding quality"
    table = pd.DataFrame(rows).assign(projection=method)
    fileio.save_csv(table, output, index=False)
    print(f"{title} (Euclidean, leave-one-out recall; see embedding_quality.py):")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.round(4).to_string(index=False))
    provenance.save_provenance(paths, "embedding_quality", inputs, [output], cfg)
    print(f"-> {output}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
