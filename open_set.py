"""Open-set detection: can the trained classifier tell images of the unseen classes from the seen
classes' test images? Four scores, each higher for "more likely unknown":

    max_softmax   1 - the largest softmax probability (Hendrycks & Gimpel 2017)
    energy        -logsumexp of the logits (Liu et al. 2020)
    knn           distance to the OPEN_SET_K-th nearest training embedding; OPEN_SET_KNN_METRIC
                  "cosine" (1 - cos, the default, as Sun et al. 2022) or "euclidean"
    mahalanobis   Mahalanobis distance to the nearest class mean of the training embeddings, with one
                  covariance shared by the classes: scikit-learn's LedoitWolf (shrunk; 128 dimensions
                  from a few hundred images) on the embeddings minus their class's mean

    python open_set.py

Reads:  checkpoints/best.pth, outputs/split.csv, the train, val, test and unseen images (through the
        trunk cache; logits and embeddings come from the head, training.head_outputs).
Writes: outputs/open_set_scores.csv (per score: AUROC and FPR at 95% TPR with the seen test images
        as the positive "known" class, the threshold that keeps PREDICT_KEEP of the validation images,
        and at it the share of seen test images kept and of unseen images flagged),
        outputs/open_set_image_scores.csv (every val, test and unseen image's four scores),
        outputs/open_set_roc.png (the four ROC curves), and last outputs/provenance_open_set.json.
"""
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score, roc_curve

import artifacts
import common
import dataloader
import tasks
import training

TPR_LEVEL = 0.95  # FPR is read where this share of the seen images is kept as known
BLOCK_BYTES = 16 << 20  # one block of the kNN distance matrix (query rows x training rows, float64) at most

TASKS = ("multiclass",)  # single-label only: softmax-based scores of one class per image (run_all.py skips it)


@dataclass
class Reference:
    """What the embedding-based scores compare an image with: the training embeddings."""
    train_embeddings: np.ndarray  # float64, at most OPEN_SET_TRAIN_SAMPLES of them; unit rows when metric is "cosine"
    class_means: np.ndarray  # classes x dimensions
    precision: np.ndarray  # inverse of the shared covariance (LedoitWolf)
    k: int
    metric: str


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
    if samples is not None and len(x) > samples:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), samples, replace=False))]
    stored = unit_rows(x) if metric == "cosine" else x
    return Reference(stored, means, precision, min(int(k), len(x)), metric)


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


def all_scores(logits: np.ndarray, embeddings: np.ndarray, reference: Reference) -> dict[str, np.ndarray]:
    return {name: score(logits, embeddings, reference) for name, score in SCORES.items()}


# ---- how well a score separates seen from unseen -------------------------------------------------

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


# ---- head outputs of the split's subsets ---------------------------------------------------------

def subset_outputs(trained: artifacts.TrainedModel, cache, runtime, subset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits, embeddings, labels) of a subset of the split (train, val, test or unseen), in its order."""
    source = trained.source(subset, cache)
    logits, embeddings = training.head_outputs(trained.model, source, runtime)
    return logits, embeddings, source.labels.numpy()


def reference_from_model(trained, cache, runtime, cfg) -> Reference:
    """The training images' Reference as the settings ask (OPEN_SET_K, OPEN_SET_KNN_METRIC,
    OPEN_SET_TRAIN_SAMPLES, SEED); says when the kNN reference is a sample."""
    _, embeddings, labels = subset_outputs(trained, cache, runtime, "train")
    if len(embeddings) > cfg.OPEN_SET_TRAIN_SAMPLES:
        print(f"note: the kNN score compares with {cfg.OPEN_SET_TRAIN_SAMPLES} random training embeddings of "
              f"{len(embeddings)} (OPEN_SET_TRAIN_SAMPLES); class means and covariance use them all")
    return fit_reference(embeddings, labels, cfg.OPEN_SET_K, cfg.OPEN_SET_KNN_METRIC, cfg.OPEN_SET_TRAIN_SAMPLES,
                         cfg.SEED or 0)


# ---- the stage -----------------------------------------------------------------------------------

def results_table(scores: dict[str, dict[str, np.ndarray]], keep: float) -> tuple[pd.DataFrame, dict]:
    """One row per score (see the module docstring); and each score's ROC curve."""
    rows, curves = [], {}
    for name in SCORES:
        found = detection_metrics(scores["test"][name], scores["unseen"][name])
        curves[name] = found.pop("roc")
        threshold = keep_threshold(scores["val"][name], keep)
        rows.append(dict(score=name, **found, val_keep=keep, threshold=threshold,
                         test_seen_kept=float((scores["test"][name] <= threshold).mean()),
                         unseen_flagged=float((scores["unseen"][name] > threshold).mean())))
    return pd.DataFrame(rows), curves


def plot_roc(table: pd.DataFrame, curves: dict, n_seen: int, n_unseen: int, k: int, metric: str, path) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    labels = {"max_softmax": "max softmax", "energy": "energy", "knn": f"kNN ({metric}, k={k})",
              "mahalanobis": "Mahalanobis (Ledoit-Wolf)"}
    for row in table.itertuples():
        fpr, tpr = curves[row.score]
        ax.plot(fpr, tpr, lw=1.8, label=f"{labels[row.score]}: AUROC {row.auroc:.3f}, FPR95 {row.fpr_at_95_tpr:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.axhline(TPR_LEVEL, color="black", lw=0.8, ls="--")
    ax.text(0.99, TPR_LEVEL - 0.01, "95% of seen images kept", ha="right", va="top", fontsize=8)
    ax.set_xlabel("unseen-class images accepted as known (FPR)")
    ax.set_ylabel("seen-class test images kept as known (TPR)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"Open-set detection: {n_seen} seen test images vs {n_unseen} unseen-class images")
    ax.legend(loc="lower right", fontsize=8)
    common.save_figure(fig, path)


def image_table(trained, scores: dict) -> pd.DataFrame:
    frames = []
    for subset in ("val", "test", "unseen"):
        relpaths, labels = trained.split.subset(subset)
        names = trained.split.classes(subset)
        frame = pd.DataFrame(dict(subset=subset, path=relpaths, class_name=[names[i] for i in labels]))
        for name in SCORES:
            frame[name] = scores[subset][name]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def run(cfg) -> None:
    tasks.require(cfg.TASK, TASKS, "open_set.py")
    paths = artifacts.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = artifacts.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = artifacts.start_stage(paths, "open_set", [paths.best, paths.split])
    cache = trained.trunk_cache(cfg, paths, runtime)
    reference = reference_from_model(trained, cache, runtime, cfg)
    scores = {}
    for subset in ("val", "test", "unseen"):
        logits, embeddings, _ = subset_outputs(trained, cache, runtime, subset)
        scores[subset] = all_scores(logits, embeddings, reference)
    table, curves = results_table(scores, cfg.PREDICT_KEEP)
    print(f"open-set detection, {len(scores['test']['knn'])} seen test vs {len(scores['unseen']['knn'])} unseen images "
          f"(threshold keeps {cfg.PREDICT_KEEP:.0%} of {len(scores['val']['knn'])} validation images):")
    for row in table.itertuples():
        print(f"  {row.score:>12}: AUROC {row.auroc:.4f}  FPR95 {row.fpr_at_95_tpr:.4f}  at the val threshold: "
              f"{row.test_seen_kept:.1%} of seen test kept, {row.unseen_flagged:.1%} of unseen flagged")
    outputs = [paths.out / name for name in artifacts.STAGE_OUTPUTS["open_set"]]
    common.save_csv(table, outputs[0], index=False)
    common.save_csv(image_table(trained, scores), outputs[1], index=False)
    plot_roc(table, curves, len(scores["test"]["knn"]), len(scores["unseen"]["knn"]), reference.k,
             cfg.OPEN_SET_KNN_METRIC, outputs[2])
    artifacts.save_provenance(paths, "open_set", inputs, outputs)
    print(f"-> {outputs[0]}, {outputs[2]}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
