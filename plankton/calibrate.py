"""Calibration: reliability bins, expected calibration error, Brier score, and temperature scaling
fitted on the validation images (calibration.py reports them, predict.py applies the temperature).
A fitted temperature is applied only when it does not make the test images' ECE worse
(choose_temperature): fitted on a handful of validation images it can."""
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram


LOG_T_BOUNDS = (-5.0, 5.0)  # the fitted temperature lies in [e^-5, e^5] = [0.0067, 148]


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true class) of softmax(logits / temperature), in nats."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the squared distance to the one-hot label."""
    one_hot = np.eye(probs.shape[1])[labels]
    return float(((probs - one_hot) ** 2).sum(1).mean())


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """Per equal-width bin (lo, hi] of the top score: images, accuracy, mean confidence (NaN if empty)."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        rows.append(dict(bin_low=b / bins, bin_high=(b + 1) / bins, images=int(inside.sum()),
                         accuracy=float((predicted[inside] == labels[inside]).mean()) if inside.any() else np.nan,
                         confidence=float(confidence[inside].mean()) if inside.any() else np.nan))
    return pd.DataFrame(rows)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    table = reliability_bins(probs, labels, bins)
    used = table[table.images > 0]
    return float((used.images / len(labels) * (used.accuracy - used.confidence).abs()).sum())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T): a bounded scalar search over log T."""
    found = minimize_scalar(lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
                            bounds=LOG_T_BOUNDS, method="bounded", options=dict(xatol=1e-6))
    return float(np.exp(found.x))


def validation_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str]:
    """(T, "" when fitted, or why T stays 1). When every validation image is predicted right, the NLL
    falls without end as T -> 0 (each true class is already the top one): no finite T minimises it,
    and the search would return its lower bound, a model that claims certainty on every image."""
    if (np.asarray(logits).argmax(1) == labels).all():
        return 1.0, (f"not fitted: all {len(labels)} validation images are predicted correctly, so the NLL has no "
                     f"minimum (it falls as T -> 0); T = 1 kept")
    return fit_temperature(logits, labels), ""


def calibration_row(logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    probs = probabilities(logits, temperature)
    return dict(temperature=temperature, images=len(labels), accuracy=float((probs.argmax(1) == labels).mean()),
                ece=expected_calibration_error(probs, labels), nll=negative_log_likelihood(logits, labels, temperature),
                brier=brier_score(probs, labels))


@dataclass(frozen=True)
class TemperatureChoice:
    """The temperature applied, and why: fitted on the validation images, kept only if the ECE of the
    held-out (test) images at it is no worse than at T = 1."""
    temperature: float  # the one applied
    fitted: float | None  # fitted on the validation images; None when not fitted
    applied: bool  # the fitted one is the one applied
    held_out_images: int
    held_out_ece_at_1: float | None
    held_out_ece_fitted: float | None
    note: str  # one line: what was fitted, on what, and whether it was applied

    def record(self) -> dict:
        return dict(asdict(self), decided_on="test")


def choose_temperature(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray,
                       test_labels: np.ndarray) -> TemperatureChoice:
    """T fitted on the validation images (validation_temperature), applied only if the test images'
    ECE at T is no worse than at 1. The test split decides because a handful of validation images
    cannot check their own fit; a two-way choice on it biases the reported test ECE very little."""
    t, not_fitted = validation_temperature(val_logits, val_labels)
    if not_fitted:
        return TemperatureChoice(1.0, None, False, len(test_labels), None, None, not_fitted)
    fitted = f"T = {t:.3g} fitted on {len(val_labels)} validation images"
    if not len(test_labels):
        return TemperatureChoice(t, t, True, 0, None, None, f"{fitted}; applied (no test images to check it on)")
    at_1 = expected_calibration_error(probabilities(test_logits), test_labels)
    at_t = expected_calibration_error(probabilities(test_logits, t), test_labels)
    change = f"the ECE of {len(test_labels)} test images goes {at_1:.4f} -> {at_t:.4f}"
    if at_t <= at_1:
        return TemperatureChoice(t, t, True, len(test_labels), at_1, at_t, f"{fitted}; applied ({change})")
    return TemperatureChoice(1.0, t, False, len(test_labels), at_1, at_t,
                             f"{fitted} NOT applied: {change}, worse; T = 1 kept")


# ---- multi-label: one sigmoid per label ----------------------------------------------------------

def sigmoid_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return expit(np.asarray(logits, dtype=np.float64) / temperature)


def binary_negative_log_likelihood(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over images and labels of the binary cross-entropy of sigmoid(logits / temperature), in
    nats, computed from the logits (stable where a sigmoid is 0 or 1)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return float(np.where(np.asarray(targets) > 0, np.logaddexp(0.0, -z), np.logaddexp(0.0, z)).mean())


def validation_label_temperature(logits: np.ndarray, targets: np.ndarray) -> tuple[float, str]:
    """One temperature shared by every label, minimising the validation BCE; (1, why) when every
    validation decision at 0.5 is right (the BCE then falls without end as T -> 0)."""
    if ((np.asarray(logits) >= 0) == (np.asarray(targets) > 0)).all():
        return 1.0, (f"not fitted: every label of all {len(targets)} validation images is decided right at 0.5, so "
                     f"the BCE has no minimum (it falls as T -> 0); T = 1 kept")
    found = minimize_scalar(lambda log_t: binary_negative_log_likelihood(logits, targets, float(np.exp(log_t))),
                            bounds=LOG_T_BOUNDS, method="bounded", options=dict(xatol=1e-6))
    return float(np.exp(found.x)), ""


def label_reliability_bins(scores: np.ndarray, targets: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """One label's reliability: per equal-width bin (lo, hi] of its score (the first bin [0, hi]),
    the images, the share of them carrying the label (fraction_positive) and their mean score;
    NaN for an empty bin. The bins are scikit-learn's calibration_curve(strategy="uniform")."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    which = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], scores)  # as calibration_curve
    rows = []
    for b in range(bins):
        inside = which == b
        rows.append(dict(bin_low=b / bins, bin_high=(b + 1) / bins, images=int(inside.sum()),
                         fraction_positive=float(targets[inside].mean()) if inside.any() else np.nan,
                         confidence=float(scores[inside].mean()) if inside.any() else np.nan))
    return pd.DataFrame(rows)


def label_calibration_rows(logits: np.ndarray, targets: np.ndarray, names: list[str], temperature: float) -> list[dict]:
    """Per label: images, positives, ECE (over its reliability bins), NLL and Brier (scikit-learn's
    log_loss and brier_score_loss of its sigmoid score), AP and AUROC (NaN without both kinds);
    then a "mean" row (the mean over the labels)."""
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score
    probs = sigmoid_probabilities(logits, temperature)
    rows = []
    for i, name in enumerate(names):
        y, p = np.asarray(targets)[:, i], probs[:, i]
        both = 0 < y.sum() < len(y)
        used = label_reliability_bins(p, y).query("images > 0")
        rows.append(dict(label=name, temperature=temperature, images=len(y), positives=int(y.sum()),
                         ece=float((used.images / len(y) * (used.fraction_positive - used.confidence).abs()).sum()),
                         nll=binary_negative_log_likelihood(np.asarray(logits)[:, [i]], y[:, None], temperature),
                         brier=float(brier_score_loss(y, p)),
                         ap=float(average_precision_score(y, p)) if y.any() else np.nan,
                         auroc=float(roc_auc_score(y, p)) if both else np.nan))
    mean = pd.DataFrame(rows)[["ece", "nll", "brier", "ap", "auroc"]].mean()
    rows.append(dict(label="mean", temperature=temperature, images=len(targets), positives=int(np.sum(targets)),
                     **mean.to_dict()))
    return rows
