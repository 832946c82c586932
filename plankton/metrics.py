"""Per-class and overall test metrics of a single-label classifier, one table (METRICS): a new metric
is one entry."""
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
)


def average_precisions(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """One-vs-rest average precision of each class on its softmax score; NaN for a class without
    test images (no positives: AP is undefined)."""
    return np.array([average_precision_score(labels == c, scores[:, c]) if (labels == c).any() else np.nan
                     for c in range(k)])


def _per_class(metric, y, p, k) -> tuple[np.ndarray, float]:
    """sklearn's per-class values and macro mean. Precision (and so F1) of a class never predicted
    counts as 0, sklearn's default in classification_report; recall of a class without test images
    is NaN and left out of the mean."""
    zero = np.nan if metric is recall_score else 0.0
    return (metric(y, p, labels=range(k), average=None, zero_division=zero),
            metric(y, p, labels=range(k), average="macro", zero_division=zero))


# Each metric: (per-class values, overall value) from true and predicted label indices and the
# softmax scores. Overall: accuracy over all images; macro means for precision, recall and F1; mAP
# (the mean of the classes' AP); balanced accuracy has no per-class value. One entry per metric.
METRICS = {
    "accuracy": lambda y, p, s, k: (recall_score(y, p, labels=range(k), average=None, zero_division=np.nan),
                                    accuracy_score(y, p)),
    "precision": lambda y, p, s, k: _per_class(precision_score, y, p, k),
    "recall": lambda y, p, s, k: _per_class(recall_score, y, p, k),
    "f1": lambda y, p, s, k: _per_class(f1_score, y, p, k),
    "average_precision": lambda y, p, s, k: (average_precisions(y, s, k), np.nanmean(average_precisions(y, s, k))),
    "balanced_accuracy": lambda y, p, s, k: (np.full(k, np.nan), balanced_accuracy_score(y, p)),
}


def metrics_table(labels: np.ndarray, predictions: np.ndarray, scores: np.ndarray,
                  class_names: list[str]) -> pd.DataFrame:
    """One row per class and an "overall" row: test images, correct predictions, every metric."""
    k = len(class_names)
    counts = np.bincount(labels, minlength=k)
    hits = np.bincount(labels[predictions == labels], minlength=k)
    table = pd.DataFrame(dict(class_name=class_names + ["overall"], n_test=list(counts) + [len(labels)],
                              correct=list(hits) + [int(hits.sum())]))
    for name, metric in METRICS.items():
        per_class, overall = metric(labels, predictions, scores, k)
        table[name] = list(np.asarray(per_class, dtype=float)) + [float(overall)]
    return table
