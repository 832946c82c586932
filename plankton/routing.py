"""Per-class operating thresholds: which predictions a lab can route straight through and which it
should review. For each class, the lowest score at which the validation images predicted as that
class still reach a target precision; on new images a prediction is "confident" when its score
reaches its class's threshold, else "to review"."""
import numpy as np
import pandas as pd

CONFIDENT, REVIEW = "confident", "to review"


def class_thresholds(probs: np.ndarray, labels: np.ndarray, class_names: list[str],
                     target_precision: float) -> pd.DataFrame:
    """One row per class: the threshold on the predicted class's score (inf: nothing of this class is
    confident), with the validation images behind it. Among the validation images predicted as the
    class, ordered by score, the threshold keeps the longest top run whose precision reaches the
    target, so coverage is as large as the target allows."""
    predicted, top = probs.argmax(1), probs.max(1)
    rows = []
    for c, name in enumerate(class_names):
        mine = np.flatnonzero(predicted == c)
        order = mine[np.argsort(-top[mine], kind="stable")]
        precision_at = np.cumsum(labels[order] == c) / np.arange(1, len(order) + 1)
        reached = np.flatnonzero(precision_at >= target_precision)
        if len(order) == 0:
            threshold, why = np.inf, "no validation image is predicted as this class"
        elif len(reached) == 0:
            threshold, why = np.inf, f"precision {target_precision:g} is not reached on the validation images"
        else:
            threshold, why = float(top[order[reached[-1]]]), ""
        kept = order[top[order] >= threshold]
        rows.append(dict(class_name=name, threshold=threshold, val_predicted=len(order), val_confident=len(kept),
                         val_precision=float((labels[kept] == c).mean()) if len(kept) else np.nan, note=why))
    return pd.DataFrame(rows)


def route(probs: np.ndarray, thresholds: pd.DataFrame) -> np.ndarray:
    """CONFIDENT or REVIEW for each image: its predicted class's score against that class's threshold."""
    predicted = probs.argmax(1)
    confident = probs.max(1) >= thresholds.threshold.to_numpy()[predicted]
    return np.where(confident, CONFIDENT, REVIEW)


def routing_table(probs: np.ndarray, labels: np.ndarray, thresholds: pd.DataFrame) -> pd.DataFrame:
    """The thresholds with what they do on labelled images (the test set): per class, the images
    predicted as it, the share routed as confident (coverage) and the precision of that part; a last
    row "all" for every image."""
    predicted, routed = probs.argmax(1), route(probs, thresholds) == CONFIDENT
    table = thresholds.copy()

    def part(mask):
        kept = mask & routed
        return (int(mask.sum()), float(kept.sum() / mask.sum()) if mask.any() else np.nan,
                float((predicted[kept] == labels[kept]).mean()) if kept.any() else np.nan)
    figures = [part(predicted == c) for c in range(len(thresholds))]
    table["test_predicted"], table["test_coverage"], table["test_precision"] = zip(*figures) if figures else ((), (), ())
    overall = part(np.ones(len(labels), dtype=bool))
    return pd.concat([table, pd.DataFrame([dict(class_name="all", test_predicted=overall[0], test_coverage=overall[1],
                                                test_precision=overall[2])])], ignore_index=True)


# ---- multi-label: one threshold per label --------------------------------------------------------

def label_thresholds(scores: np.ndarray, targets: np.ndarray, names: list[str], target_precision: float) -> pd.DataFrame:
    """One row per label: the lowest score at which the validation images scored at least that high
    for the label still carry it with the target precision (the longest top run of the images
    ordered by the label's score, as class_thresholds; inf: no such run). An image's label set is
    then every label whose score reaches its threshold (label_sets)."""
    rows = []
    for i, name in enumerate(names):
        order = np.argsort(-scores[:, i], kind="stable")
        precision_at = np.cumsum(targets[order, i] > 0) / np.arange(1, len(order) + 1)
        reached = np.flatnonzero(precision_at >= target_precision)
        threshold = float(scores[order[reached[-1]], i]) if len(reached) else np.inf
        above = scores[:, i] >= threshold
        rows.append(dict(label=name, threshold=threshold, val_carrying=int((targets[:, i] > 0).sum()),
                         val_above=int(above.sum()),
                         val_precision=float((targets[above, i] > 0).mean()) if above.any() else np.nan,
                         note="" if len(reached) else f"precision {target_precision:g} is not reached on the "
                                                       f"validation images"))
    return pd.DataFrame(rows)


def label_sets(scores: np.ndarray, thresholds: pd.DataFrame) -> np.ndarray:
    """Images x labels, True where the label's score reaches its threshold."""
    return np.asarray(scores) >= thresholds.threshold.to_numpy()[None, :]


def label_routing_table(scores: np.ndarray, targets: np.ndarray, thresholds: pd.DataFrame) -> pd.DataFrame:
    """The label thresholds with what they do on labelled images (the test set): per label, the images
    at or above its threshold, their precision and the share of the label's images they find (recall);
    a last row "all" over every image-label pair."""
    chosen, truth = label_sets(scores, thresholds), np.asarray(targets) > 0

    def part(picked, carried):
        return (int(picked.sum()), float((picked & carried).sum() / picked.sum()) if picked.any() else np.nan,
                float((picked & carried).sum() / carried.sum()) if carried.any() else np.nan)
    figures = [part(chosen[:, i], truth[:, i]) for i in range(chosen.shape[1])]
    table = thresholds.copy()
    table["test_above"], table["test_precision"], table["test_recall"] = zip(*figures) if figures else ((), (), ())
    overall = part(chosen, truth)
    return pd.concat([table, pd.DataFrame([dict(label="all", test_above=overall[0], test_precision=overall[1],
                                                test_recall=overall[2])])], ignore_index=True)
