"""Open-set scores, one table (SCORES): how unlike the seen classes an image is, from its logits
(max softmax, energy) or its embedding (kNN distance, Mahalanobis), with the reference they
compare with and the detection metrics. open_set.py evaluates them, predict.py flags unknowns with one."""
from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

from plankton import checkpoints, fileio, labelsets, provenance
from plankton.errors import PipelineError

TPR_LEVEL = 0.95  # FPR is read where this share of the seen images is kept as known


BLOCK_BYTES = 16 << 20  # one block of the kNN distance matrix (query rows x training rows, float64) at most


@dataclass
class Reference:
    """What the embedding-based scores compare an image with: the training embeddings."""
    train_embeddings: np.ndarray  # float64, at most OPEN_SET_TRAIN_SAMPLES of them; unit rows when metric is "cosine"
    class_means: np.ndarray  # classes x dimensions
    precision: np.ndarray  # inverse of the shared covariance (LedoitWolf)
    k: int
    metric: str
    labels: np.ndarray | None = None  # the class index of each row of train_embeddings (a model bundle keeps them)


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)  # a zero embedding stays zero: cosine 0 to everything


def fit_reference(train_embeddings: np.ndarray, train_labels: np.ndarray, k: int, metric: str,
                  samples: int | None = None, seed: int = 0) -> Reference:
    """Class means, the shared LedoitWolf covariance of the class-centred embeddings (all training
    images), and the training embeddings for the kNN distance: at most `samples` random ones, as
    its cost grows with queries x reference rows (k shrinks to the reference's size)."""
    x = np.asarray(train_embeddings, dtype=np.float64)
    classes = int(train_labels.max()) + 1
    means = np.stack([x[train_labels == c].mean(0) for c in range(classes)])
    precision = LedoitWolf(assume_centered=True).fit(x - means[train_labels]).precision_
    kept = np.arange(len(x))
    if samples is not None and len(x) > samples:
        kept = np.sort(np.random.default_rng(seed).choice(len(x), samples, replace=False))
    x = x[kept]
    stored = unit_rows(x) if metric == "cosine" else x
    return Reference(stored, means, precision, min(int(k), len(x)), metric, np.asarray(train_labels)[kept])


def kth_neighbour_distance(queries: np.ndarray, reference: Reference) -> np.ndarray:
    """Distance from each query to its k-th nearest training embedding (cosine: 1 - cos)."""
    train = reference.train_embeddings
    out = np.empty(len(queries))
    block = max(1, BLOCK_BYTES // (8 * max(1, len(train))))  # one block matrix, worked on in place
    train_squares = (train ** 2).sum(1)[None, :] if reference.metric != "cosine" else None
    for start in range(0, len(queries), block):
        q = np.asarray(queries[start:start + block], dtype=np.float64)
        if reference.metric == "cosine":
            distances = unit_rows(q) @ train.T
            np.subtract(1.0, distances, out=distances)
        else:
            distances = q @ train.T
            distances *= -2.0
            distances += (q ** 2).sum(1)[:, None]
            distances += train_squares
            np.sqrt(np.maximum(distances, 0.0, out=distances), out=distances)
        distances.partition(reference.k - 1, axis=1)
        out[start:start + block] = distances[:, reference.k - 1]
    return out


def mahalanobis_distance(queries: np.ndarray, reference: Reference) -> np.ndarray:
    """Mahalanobis distance to the nearest class mean under the shared covariance."""
    q = np.asarray(queries, dtype=np.float64)
    squared = [np.einsum("ij,jk,ik->i", q - mean, reference.precision, q - mean) for mean in reference.class_means]
    return np.sqrt(np.maximum(np.min(squared, axis=0), 0.0))


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp of the logits: low for confident seen-class images, high for unknown ones."""
    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


# Each score: (logits, embeddings, Reference) -> one number per image, higher = more likely unknown.
SCORES = {
    "max_softmax": lambda logits, emb, ref: 1.0 - softmax(np.asarray(logits, dtype=np.float64), axis=1).max(1),
    "energy": lambda logits, emb, ref: energy(logits),
    "knn": lambda logits, emb, ref: kth_neighbour_distance(emb, ref),
    "mahalanobis": lambda logits, emb, ref: mahalanobis_distance(emb, ref),
}


def joint_energy(logits: np.ndarray) -> np.ndarray:
    """-sum over labels of log(1 + e^logit) (Wang et al. 2021, JointEnergy): low when some seen label
    is confidently present, high when no label is."""
    return -np.logaddexp(0.0, np.asarray(logits, dtype=np.float64)).sum(1)


# The same for a multi-label head (one sigmoid per label): an image is "unknown" when it carries an
# unseen label, so the logit scores ask whether any seen label is there; kNN and Mahalanobis as above.
MULTILABEL_SCORES = {
    "max_sigmoid": lambda logits, emb, ref: 1.0 - expit(np.asarray(logits, dtype=np.float64)).max(1),
    "joint_energy": lambda logits, emb, ref: joint_energy(logits),
    "knn": SCORES["knn"],
    "mahalanobis": SCORES["mahalanobis"],
}


def scores_for(task: str) -> dict:
    """The table of open-set scores for TASK."""
    return MULTILABEL_SCORES if task == "multilabel" else SCORES


def all_scores(logits: np.ndarray, embeddings: np.ndarray, reference: Reference,
               task: str = "multiclass") -> dict[str, np.ndarray]:
    return {name: score(logits, embeddings, reference) for name, score in scores_for(task).items()}


def detection_metrics(seen: np.ndarray, unseen: np.ndarray, tpr_level: float = TPR_LEVEL) -> dict:
    """AUROC and FPR at `tpr_level` TPR of unknown-scores, the seen images being the positive
    ("known") class ranked by -score: FPR is the share of unseen images accepted as known at the
    first threshold that keeps at least `tpr_level` of the seen ones."""
    known = np.r_[np.ones(len(seen)), np.zeros(len(unseen))]
    ranking = -np.r_[seen, unseen]
    fpr, tpr, _ = roc_curve(known, ranking)
    return dict(auroc=float(roc_auc_score(known, ranking)),
                fpr_at_95_tpr=float(fpr[np.searchsorted(tpr, tpr_level, side="left")]), roc=(fpr, tpr))


def keep_threshold(val_scores: np.ndarray, keep: float) -> float:
    """The smallest threshold t with at least `keep` of the validation scores <= t: images scoring
    above it are flagged unknown."""
    ordered = np.sort(np.asarray(val_scores, dtype=np.float64))
    return float(ordered[max(1, int(np.ceil(keep * len(ordered) - 1e-9))) - 1])


def subset_outputs(trained: checkpoints.TrainedModel, cache, runtime, subset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, embeddings, labels) of a subset of the split (train, val, test or unseen), in its order,
    averaged over the orientations TTA asks for."""
    return trained.outputs(subset, cache, runtime)


def reference_from_model(trained, cache, runtime, cfg) -> Reference:
    """The training images' Reference as the settings ask (OPEN_SET_K, OPEN_SET_KNN_METRIC,
    OPEN_SET_TRAIN_SAMPLES, SEED); says when the kNN reference is a sample."""
    _, embeddings, labels = subset_outputs(trained, cache, runtime, "train")
    if labels.ndim == 2:  # multi-label: the class means are those of each image's rarest label (as embed.py),
        # numbered 0, 1, ... over the labels that are some image's rarest (a label may be none's)
        labels = np.unique(labelsets.rarest_labels(labels, labels.sum(0)), return_inverse=True)[1]
    if len(embeddings) > cfg.OPEN_SET_TRAIN_SAMPLES:
        print(f"note: the kNN score compares with {cfg.OPEN_SET_TRAIN_SAMPLES} random training embeddings of "
              f"{len(embeddings)} (OPEN_SET_TRAIN_SAMPLES); class means and covariance use them all")
    return fit_reference(embeddings, labels, cfg.OPEN_SET_K, cfg.OPEN_SET_KNN_METRIC, cfg.OPEN_SET_TRAIN_SAMPLES,
                         cfg.SEED or 0)


# ---- when the unknown flag rests on too little ---------------------------------------------------

FEW_VALIDATION = 20  # an unknown threshold set on fewer validation images than this is flagged
WEAK_AUROC = 0.6  # an open-set AUROC below this (0.5 = chance) is flagged


def recorded_auroc(paths, score: str) -> float | None:
    """The AUROC of `score` in open_set.py's open_set_scores.csv, when that file is there and its
    provenance record vouches for it (made from the current checkpoint and split); else None."""
    table_path = paths.out / "open_set_scores.csv"
    try:
        if not table_path.is_file() or provenance.stale_outputs(paths, "open_set"):
            return None
        table = fileio.read_csv(table_path)
        value = float(table.set_index("score").auroc[score])
    except (PipelineError, OSError, ValueError, KeyError):
        return None
    return value if np.isfinite(value) else None


def small_data_warning(val_images: int, auroc: float | None, score: str) -> str:
    """One line when the unknown flag rests on too little: a threshold set on fewer than
    FEW_VALIDATION validation images, or an open-set AUROC (seen test vs unseen images) below
    WEAK_AUROC; "" otherwise."""
    reasons = []
    if val_images < FEW_VALIDATION:
        reasons.append(f"the unknown threshold rests on only {val_images} validation images (fewer than "
                       f"{FEW_VALIDATION})")
    if auroc is not None and auroc < WEAK_AUROC:
        reasons.append(f"the {score} score's open-set AUROC is {auroc:.2f} (0.5 = chance, open_set_scores.csv)")
    if not reasons:
        return ""
    return "the unknown flag is not to be trusted: " + " and ".join(reasons)
