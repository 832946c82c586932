"""What to annotate next: the strategies, one table (STRATEGIES), that pick a batch of unlabelled
images for a person to label, from the classifier's class probabilities and the images' embeddings.
annotate_next.py applies one to new images; tools/annotation_simulation.py measures them all.

Each strategy scores every candidate (higher = annotate sooner):
- "random": a random number (the baseline every other strategy has to beat);
- "margin": 1 - (p1 - p2), p1 and p2 the two highest class probabilities: near-ties first;
- "entropy": the entropy of the class probabilities over log(classes), from 0 to 1;
- "knn": novelty, the distance to the k-th nearest labelled embedding (openset's kNN score);
- "diverse": the margin score, then a batch spread over the embeddings: weighted k-means over the
  most uncertain candidates, one image per cluster (Zhdanov 2019, "Diverse mini-batch Active
  Learning", arXiv:1901.05954), so that a batch is not fifty near-copies of one confusing kind.
The plain strategies take the batch highest score first.
"""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from plankton import openset

DIVERSE_POOL = 10  # "diverse": k-means runs over the DIVERSE_POOL x batch most uncertain candidates (Zhdanov's beta)


@dataclass(frozen=True)
class Candidates:
    """The unlabelled images as the strategies see them."""
    probabilities: np.ndarray  # images x classes, each row sums to 1
    embeddings: np.ndarray  # images x dimensions: where novelty and diversity are measured
    reference: openset.Reference  # the labelled images' embeddings ("knn" compares with them)

    def __len__(self) -> int:
        return len(self.probabilities)


def labelled_reference(embeddings: np.ndarray, k: int, metric: str) -> openset.Reference:
    """The kNN novelty's reference from labelled embeddings alone (no class means or covariance:
    only openset.kth_neighbour_distance reads it)."""
    x = np.asarray(embeddings, dtype=np.float64)
    stored = openset.unit_rows(x) if metric == "cosine" else x
    return openset.Reference(stored, np.empty((0, x.shape[1])), np.empty((0, 0)), min(int(k), len(x)), metric)


# ---- the scores ----------------------------------------------------------------------------------

def margin_score(probabilities: np.ndarray) -> np.ndarray:
    """1 - (p1 - p2): 1 for a tie between the two most probable classes, 0 for a certain image."""
    top_two = -np.partition(-np.asarray(probabilities, dtype=np.float64), 1, axis=1)[:, :2]
    return 1.0 - (top_two[:, 0] - top_two[:, 1])


def entropy_score(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of the class probabilities over its largest value log(classes): from 0 to 1."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(1) / np.log(max(p.shape[1], 2))


def knn_score(candidates: Candidates) -> np.ndarray:
    return openset.kth_neighbour_distance(candidates.embeddings, candidates.reference)


# ---- choosing a batch ----------------------------------------------------------------------------

def top_batch(scores: np.ndarray, batch: int, rng: np.random.Generator, embeddings: np.ndarray) -> np.ndarray:
    """The `batch` highest scores, highest first (ties in candidate order)."""
    return np.argsort(-scores, kind="stable")[:batch]


def diverse_batch(scores: np.ndarray, batch: int, rng: np.random.Generator, embeddings: np.ndarray) -> np.ndarray:
    """Zhdanov's diverse mini-batch: the DIVERSE_POOL x batch highest-scoring candidates, k-means
    with k = batch over their embeddings (unit length) weighted by their scores, and from each
    cluster the candidate nearest its centre; the batch is ranked by score, highest first."""
    pool = np.argsort(-scores, kind="stable")[:DIVERSE_POOL * batch]
    if len(pool) <= batch:
        return pool
    points = openset.unit_rows(np.asarray(embeddings, dtype=np.float64)[pool])
    weights = scores[pool] + 1e-6  # a certain image may still represent a cluster
    kmeans = KMeans(n_clusters=batch, n_init=1, random_state=int(rng.integers(2**31))).fit(points, sample_weight=weights)
    distances = kmeans.transform(points)  # pool x clusters
    chosen: list[int] = []
    for cluster in range(batch):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        if len(members):
            chosen.append(int(members[np.argmin(distances[members, cluster])]))
    # an empty cluster (identical points): fill with the next most uncertain candidates
    taken = set(chosen)
    rest = [i for i in range(len(pool)) if i not in taken]
    chosen += rest[:batch - len(chosen)]
    picked = pool[np.array(chosen)]
    return picked[np.argsort(-scores[picked], kind="stable")]


@dataclass(frozen=True)
class Strategy:
    label: str  # what it prefers, in words (figures, the contact sheet)
    score: Callable[[Candidates, np.random.Generator], np.ndarray]  # per candidate; higher = annotate sooner
    pick: Callable = top_batch  # (scores, batch, rng, embeddings) -> candidate indices, in rank order


STRATEGIES: dict[str, Strategy] = {
    "random": Strategy("random (baseline)", lambda c, rng: rng.random(len(c))),
    "margin": Strategy("smallest margin between the top two classes", lambda c, rng: margin_score(c.probabilities)),
    "entropy": Strategy("highest entropy of the class probabilities", lambda c, rng: entropy_score(c.probabilities)),
    "knn": Strategy("furthest from the labelled images (kNN novelty)", lambda c, rng: knn_score(c)),
    "diverse": Strategy("margin, spread by weighted k-means over the embeddings",
                        lambda c, rng: margin_score(c.probabilities), diverse_batch),
}


def select(name: str, candidates: Candidates, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the batch: at most `batch` candidate indices in rank order, the strategy's score of every
    candidate). Deterministic for a seed."""
    strategy = STRATEGIES[name]
    rng = np.random.default_rng(seed)
    scores = np.asarray(strategy.score(candidates, rng), dtype=np.float64)
    return strategy.pick(scores, min(int(batch), len(candidates)), rng, candidates.embeddings), scores
