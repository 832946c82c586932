"""Test-set metrics of the trained classifier, per class and overall, every test image's prediction,
a confusion matrix and the misclassified images.

    python evaluate.py

Reads:  checkpoints/best.pth, outputs/split.csv, the test images (through the trunk cache; the
        misclassified ones are also decoded for the gallery).
Writes: outputs/test_metrics.csv (per class and overall: accuracy, precision, recall, F1, average
        precision, balanced accuracy), outputs/test_metrics.json,
        outputs/test_predictions.csv (path, true_class, predicted_class, score_<class> per class; and .parquet),
        outputs/test_scores.npz (logits and softmax scores, float32, for exact reuse; artifacts.py),
        outputs/confusion_matrix.png, outputs/misclassified_test_images.png,
        and last outputs/provenance_evaluate.json (see artifacts.py).
"""
import textwrap

import numpy as np
import pandas as pd
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, confusion_matrix,
                             f1_score, precision_score, recall_score)

import artifacts
import common
import dataloader
import images
import training
import trunk_cache

FEW = 20  # a per-class figure resting on fewer test images than this is flagged
GALLERY_LIMIT = 40  # misclassified test images shown at most (the most confident mistakes first)


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


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over classes, computed in float64 and returned as float32."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(1, keepdims=True)).astype(np.float32)


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


def plot_confusion(matrix: np.ndarray, class_names: list[str], accuracy: float, path) -> None:
    plt = common.pyplot()
    k = len(class_names)
    side = max(4.5, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    row_share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9 if k <= 12 else 6,
                    color="white" if row_share[i, j] > 0.5 else "black")
    common.class_ticks(ax, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Test confusion matrix (counts; colour = share of the true class)\n"
                 f"overall accuracy {100 * accuracy:.2f}% on {matrix.sum()} images")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    common.save_figure(fig, path)


def print_table(table: pd.DataFrame) -> None:
    print("Test accuracy for each class (precision / recall / F1 / average precision):")
    for row in table.itertuples():
        flag = f"  (only {row.n_test} test images: a rough figure)" if row.n_test < FEW else ""
        label = "Total test accuracy" if row.class_name == "overall" else f"  {row.class_name}"
        print(f"{label}: {100 * row.accuracy:.2f}% ({row.correct}/{row.n_test})  "
              f"P {row.precision:.3f} R {row.recall:.3f} F1 {row.f1:.3f} AP {row.average_precision:.3f}{flag}")
    overall = table.iloc[-1]
    print(f"macro precision {overall.precision:.4f}, macro recall {overall.recall:.4f}, macro F1 {overall.f1:.4f}, "
          f"mAP {overall.average_precision:.4f}, balanced accuracy {overall.balanced_accuracy:.4f}")


def misclassified(predictions: artifacts.Predictions) -> np.ndarray:
    """Indices of the misclassified test images, the most confident mistakes first."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    confidence = predictions.scores[wrong, predictions.predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def plot_misclassified(predictions: artifacts.Predictions, root, path, limit: int = GALLERY_LIMIT) -> None:
    """Thumbnails of up to `limit` misclassified test images captioned "true → predicted, score"
    (the predicted class's softmax score); a panel saying so when there are none."""
    plt = common.pyplot()
    wrong, names, n = misclassified(predictions), predictions.class_names, len(predictions.labels)
    shown = wrong[:limit]
    if not len(shown):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, f"No misclassified images:\nall {n} test images are predicted correctly",
                ha="center", va="center", fontsize=13)
        ax.set_axis_off()
        ax.set_title("Misclassified test images")
        common.save_figure(fig, path)
        return
    columns = min(8, len(shown))
    rows = -(-len(shown) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows + 0.6), squeeze=False)
    for ax, i in zip(axes.flat, shown):
        ax.imshow(images.load_rgb(root / predictions.relpaths[i]), interpolation="nearest")
        caption = f"{names[predictions.labels[i]]} → {names[predictions.predicted[i]]}"
        score = predictions.scores[i, predictions.predicted[i]]
        ax.set_title("\n".join(textwrap.wrap(caption, 22)[:2]) + f"\nscore {score:.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    more = f", the {len(shown)} most confident shown" if len(wrong) > len(shown) else ""
    fig.suptitle(f"Misclassified test images: {len(wrong)} of {n}{more}\n"
                 f"(true class → predicted class, softmax score of the predicted class)", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, path)


def predict_test_set(trained: artifacts.TrainedModel, cache, runtime) -> artifacts.Predictions:
    """Logits and softmax scores of every test image (through `cache`, a trunk_cache.TrunkCache, or
    from the images when it is None), in the split's test order."""
    source = trained.source("test", cache)
    logits, _ = training.head_outputs(trained.model, source, runtime)
    relpaths, _ = trained.split.subset("test")
    return artifacts.Predictions(logits.astype(np.float32), softmax(logits), source.labels.numpy(), relpaths,
                                 list(trained.checkpoint["class_names"]), str(trained.split.root), trained.sha256)


def run(cfg) -> None:
    paths = artifacts.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = artifacts.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = artifacts.start_stage(paths, "evaluate", [paths.best, paths.split])
    checkpoint = trained.checkpoint
    print(f"evaluate.py  {paths.best} (epoch {checkpoint['epoch']:.2f}, trunk: {checkpoint['weights_source']})")
    cache = trunk_cache.from_settings(cfg, paths.cache, trained.model.trunk, checkpoint["trunk_sha256"],
                                      trained.preprocess, runtime)
    predictions = predict_test_set(trained, cache, runtime)
    labels, predicted, names = predictions.labels, predictions.predicted, predictions.class_names
    table = metrics_table(labels, predicted, predictions.scores, names)
    print_table(table)
    outputs = [paths.out / name for name in ("test_metrics.csv", "test_metrics.json", "confusion_matrix.png",
                                             "misclassified_test_images.png")]
    common.save_csv(table, outputs[0], index=False)
    common.save_json(dict(checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256,
                          weights_source=checkpoint["weights_source"], overall=table.iloc[-1].to_dict(),
                          per_class=table.to_dict("records")), outputs[1])
    plot_confusion(confusion_matrix(labels, predicted, labels=range(len(names))), names,
                   float(table.accuracy.iloc[-1]), outputs[2])
    plot_misclassified(predictions, trained.split.root, outputs[3])
    outputs += artifacts.save_predictions(paths, predictions)
    artifacts.save_provenance(paths, "evaluate", inputs, outputs)
    print(f"-> {outputs[0]}, {paths.predictions}, {outputs[2]}, {outputs[3]}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
