"""The learning task, one object per TASK setting: what the model's outputs mean (softmax over
classes, or one sigmoid per label), the training loss, what counts as a hit, the class-wise
figures of a validation pass, which figure picks the best model, and tail accuracy.

    task = tasks.for_name(cfg.TASK)     # tasks.MULTICLASS or tasks.MULTILABEL

Targets are int64 tensors/arrays: class indices (images,) for "multiclass", a multi-hot matrix
(images x labels) for "multilabel". Which stages handle which task is plankton/registry.py's
table (a Stage's `tasks`); registry.require_task stops a stage run by hand for another task.
"""
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score

ALL_TASKS = ("multiclass", "multilabel")  # TASK's values; TASK_OBJECTS below maps each to its object


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, computed in float64 and returned as float32."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """One sigmoid per label, computed in float64 (stable for large |logit|) and returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    return np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x)))
                    ).astype(np.float32)


def average_precisions(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """scikit-learn's average precision of each column of `scores` against the 0/1 column of
    `targets`; NaN for a column without positives (AP is undefined there)."""
    targets = np.asarray(targets)
    present = targets.sum(0) > 0
    ap = np.full(targets.shape[1], np.nan)
    if present.any():
        # one call for every label (an indicator matrix): a call per label costs ~7 ms of checks each
        ap[present] = np.atleast_1d(average_precision_score(targets[:, present], scores[:, present], average=None))
    return ap


def one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k, dtype=np.int64)[np.asarray(labels, dtype=np.int64)]


# ---- tail accuracy -------------------------------------------------------------------------------

def tail_thresholds(scores: np.ndarray, steps: int) -> np.ndarray:
    """`steps` thresholds evenly from 0.5 to the highest score (as companion study 003)."""
    return np.linspace(0.5, max(0.5, float(np.max(scores, initial=0.5))), steps)


def tail_accuracy(targets: np.ndarray, scores: np.ndarray, class_names: list[str],
                  thresholds: np.ndarray) -> pd.DataFrame:
    """For each class and threshold t: the images whose score for the class is >= t (n_above, and
    coverage = their share of all images) and the share of them that truly carry the class
    (tail_accuracy: the precision above t). NaN where no image is left above t, never a fake 0.
    A last "mean" row per threshold: the mean over the classes that have an image above t,
    n_above summed over classes, coverage averaged over classes."""
    targets, scores = np.asarray(targets), np.asarray(scores)
    rows = []
    for t in thresholds:
        above = scores >= t
        n_above = above.sum(0)
        hits = (above & (targets > 0)).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(n_above > 0, hits / np.maximum(n_above, 1), np.nan)
        coverage = n_above / max(len(scores), 1)
        rows += [dict(label=name, threshold=float(t), n_above=int(n), coverage=float(c), tail_accuracy=float(a))
                 for name, n, c, a in zip(class_names, n_above, coverage, accuracy)]
        mean = float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan")
        rows.append(dict(label="mean", threshold=float(t), n_above=int(n_above.sum()), coverage=float(coverage.mean()),
                         tail_accuracy=mean))
    return pd.DataFrame(rows)


# ---- the two tasks -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Multiclass:
    """One class per image: softmax over the classes, cross-entropy, the best model by validation loss."""
    name: str = "multiclass"
    loss_words: str = "cross-entropy loss"
    score_words: str = "softmax score"
    hit_words: str = "accuracy"
    monitor: str = "val_loss"  # the history column that picks the best model
    monitor_sign: float = 1.0  # lower is better
    monitor_words: str = "lowest validation loss"
    acc_words: str = "accuracy"  # acc_<class> in the history: share of the class's images predicted as it

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy; with `weight` (CLASS_WEIGHTS) each image counts its class's weight ("mean"
        then divides by the batch's summed weights, as torch does)."""
        return F.cross_entropy(logits, targets, weight=weight, reduction=reduction, label_smoothing=label_smoothing)

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images whose arg-max class is the true one."""
        return (logits.argmax(1) == targets).sum()

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def indicator(self, targets: np.ndarray, k: int) -> np.ndarray:
        """Targets as an images x classes 0/1 matrix."""
        return one_hot(targets, k)

    def classwise_metrics(self, logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict:
        """acc_<class> (share of the class's images predicted as it), ap_<class> (one-vs-rest average
        precision of its softmax score, scikit-learn's), and map (their mean). NaN for a class absent
        from `labels`."""
        scores = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), 1).numpy()
        predictions = scores.argmax(1)
        present = np.bincount(labels, minlength=len(class_names)) > 0
        with warnings.catch_warnings():  # an absent class: "no positive class found", its NaN is set below
            warnings.simplefilter("ignore")
            ap = average_precision_score(np.eye(len(class_names), dtype=int)[labels], scores, average=None)
        row = {}
        for i, name in enumerate(class_names):
            row[f"acc_{name}"] = float((predictions[labels == i] == i).mean()) if present[i] else float("nan")
            row[f"ap_{name}"] = float(ap[i]) if present[i] else float("nan")
        row["map"] = float(np.nanmean([row[f"ap_{name}"] for name in class_names]))
        # what SELECT_BY can pick the best model by, over the classes present in `labels` (scikit-learn's;
        # quiet about predicted classes absent from `labels`)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["balanced_accuracy"] = float(balanced_accuracy_score(labels, predictions)) if len(labels) else np.nan
            row["macro_f1"] = float(f1_score(labels, predictions, labels=np.flatnonzero(present), average="macro",
                                             zero_division=0)) if len(labels) else np.nan
        return row


@dataclass(frozen=True)
class Multilabel:
    """A set of labels per image: one logit per label, sigmoid scores, binary cross-entropy
    (BCEWithLogitsLoss: the mean over images and labels), the best model by validation mAP."""
    name: str = "multilabel"
    loss_words: str = "binary cross-entropy loss"
    score_words: str = "sigmoid score"
    hit_words: str = "exact-match accuracy (every label right at 0.5)"
    monitor: str = "val_map"
    monitor_sign: float = -1.0  # higher is better
    monitor_words: str = "highest validation mAP"
    acc_words: str = "recall at 0.5"  # acc_<label>: share of the label's images scored >= 0.5

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             label_smoothing: float = 0.0, weight: None = None) -> torch.Tensor:
        """Each image's mean over its labels of the binary cross-entropy, then summed or averaged
        over images: "mean" is torch.nn.BCEWithLogitsLoss() exactly (every image has as many labels)."""
        per_image = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean(1)
        return per_image.sum() if reduction == "sum" else per_image.mean()

    def hits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images whose every label is decided right at score 0.5 (logit 0)."""
        return ((logits >= 0) == (targets > 0)).all(1).sum()

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(logits)

    def indicator(self, targets: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(targets, dtype=np.int64)

    def classwise_metrics(self, logits: np.ndarray, targets: np.ndarray, class_names: list[str]) -> dict:
        """acc_<label> (recall at 0.5: share of the images carrying the label scored >= 0.5),
        ap_<label> (scikit-learn's average precision of its sigmoid score), map (their mean).
        NaN for a label no image of `targets` carries."""
        logits, targets = np.asarray(logits), np.asarray(targets)
        ap = average_precisions(targets, sigmoid(logits))
        row = {}
        for i, name in enumerate(class_names):
            carrying = targets[:, i] > 0
            row[f"acc_{name}"] = float((logits[carrying, i] >= 0).mean()) if carrying.any() else float("nan")
            row[f"ap_{name}"] = float(ap[i])
        row["map"] = float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")
        return row


MULTICLASS, MULTILABEL = Multiclass(), Multilabel()
TASK_OBJECTS = {"multiclass": MULTICLASS, "multilabel": MULTILABEL}


def for_name(name: str):
    return TASK_OBJECTS[name]
