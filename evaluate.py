"""Test-set metrics of the trained classifier, per class and overall, every test image's prediction,
a confusion matrix and the misclassified images, and tail accuracy against a score threshold.

    python evaluate.py

Reads:  checkpoints/best.pth, outputs/split.csv, the test images (through the trunk cache; the
        misclassified ones are also decoded for the gallery).
Writes: outputs/test_metrics.csv (per class and overall: accuracy, precision, recall, F1, average
        precision, balanced accuracy), outputs/test_metrics.json,
        outputs/test_predictions.csv (path, true_class, predicted_class, score_<class> per class; and .parquet),
        outputs/test_scores.npz (logits and softmax scores, float32, for exact reuse; plankton/saved_predictions.py),
        outputs/confusion_matrix.png, outputs/misclassified_test_images.png,
        outputs/tail_accuracy.csv / .png (per class and threshold t from 0.5 to the highest score, in
        TAIL_THRESHOLDS steps: images whose score for the class is >= t, their share, and the share
        of them truly of the class; NaN where none is left),
        and last outputs/provenance_evaluate.json (see plankton/provenance.py).
TASK="multilabel": test_metrics per label (images carrying it, AP of its sigmoid score, precision,
recall and F1 at 0.5; overall: mAP, macro and micro precision/recall, exact-match accuracy),
test_predictions.csv with true_labels/predicted_labels, outputs/test_label_metrics.png (per-label
AP, precision and recall) instead of the confusion matrix and the misclassified gallery.
"""
import textwrap

import numpy as np
import pandas as pd
from sklearn.metrics import (
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

import dataloader
from plankton import (
    checkpoints,
    fileio,
    images,
    locations,
    metrics,
    plots,
    provenance,
    runner,
    saved_predictions,
    tasks,
)

FEW = 20  # a per-class figure resting on fewer test images than this is flagged
GALLERY_LIMIT = 40  # misclassified test images shown at most (the most confident mistakes first)


softmax = tasks.softmax  # (tasks.py owns what a task's outputs mean)


def plot_confusion(matrix: np.ndarray, class_names: list[str], accuracy: float, path) -> None:
    plt = plots.pyplot()
    k = len(class_names)
    side = max(4.5, 0.6 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    row_share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9 if k <= 12 else 6,
                    color="white" if row_share[i, j] > 0.5 else "black")
    plots.class_ticks(ax, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Test confusion matrix (counts; colour = share of the true class)\n"
                 f"overall accuracy {100 * accuracy:.2f}% on {matrix.sum()} images")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    plots.save_figure(fig, path)


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


def misclassified(predictions: saved_predictions.Predictions) -> np.ndarray:
    """Indices of the misclassified test images, the most confident mistakes first."""
    wrong = np.flatnonzero(predictions.predicted != predictions.labels)
    confidence = predictions.scores[wrong, predictions.predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")]


def plot_misclassified(predictions: saved_predictions.Predictions, root, path, limit: int = GALLERY_LIMIT) -> None:
    """Thumbnails of up to `limit` misclassified test images captioned "true → predicted, score"
    (the predicted class's softmax score); a panel saying so when there are none."""
    plt = plots.pyplot()
    wrong, names, n = misclassified(predictions), predictions.class_names, len(predictions.labels)
    shown = wrong[:limit]
    if not len(shown):
        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.text(0.5, 0.5, f"No misclassified images:\nall {n} test images are predicted correctly",
                ha="center", va="center", fontsize=13)
        ax.set_axis_off()
        ax.set_title("Misclassified test images")
        plots.save_figure(fig, path)
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
        plots.axes_off(ax)
    more = f", the {len(shown)} most confident shown" if len(wrong) > len(shown) else ""
    fig.suptitle(f"Misclassified test images: {len(wrong)} of {n}{more}\n"
                 f"(true class → predicted class, softmax score of the predicted class)", fontsize=11)
    fig.tight_layout()
    plots.save_figure(fig, path)


# ---- tail accuracy (both tasks) ------------------------------------------------------------------

def plot_tail_accuracy(table: pd.DataFrame, class_names: list[str], score_words: str, n_images: int, path) -> None:
    """Left: tail accuracy against threshold, one line per class, the mean thick and black; right:
    how many test images score >= t for each class (the points the left panel rests on)."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for i, name in enumerate(class_names + ["mean"]):
        rows = table[table.label == name]
        style = dict(color="black", lw=3) if name == "mean" else dict(color=colours(i % colours.N), lw=1.2, alpha=0.9)
        label = "mean over classes" if name == "mean" else name
        axes[0].plot(rows.threshold, rows.tail_accuracy, "o-", ms=3, label=label, **style)
        if name != "mean":
            axes[1].plot(rows.threshold, rows.n_above, "o-", ms=3, label=label, **style)
    axes[0].set_title(f"Tail accuracy: share of images with {score_words} >= t\nthat truly carry the class "
                      f"(gaps: no image left above t)", fontsize=10)
    axes[0].set_ylabel("tail accuracy (precision above t)")
    axes[0].set_ylim(0, 1.01)  # the whole range: a zoomed axis made 0.95 look like failure
    axes[1].set_title(f"Test images with {score_words} >= t, per class (of {n_images})", fontsize=10)
    axes[1].set_ylabel("images above the threshold")
    axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xlabel(f"threshold t on the {score_words}")
        ax.grid(alpha=0.3)
    axes[1].legend(title="class", loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                   ncol=1 if len(class_names) <= 20 else 2)
    axes[0].legend(handles=axes[0].lines[-1:], loc="lower left", fontsize=9)
    fig.suptitle("Tail accuracy against threshold, test set (one colour per class, legend on the right; "
                 "the mean over classes in black)")
    plots.save_figure(fig, path)


def save_tail_accuracy(predictions: saved_predictions.Predictions, steps: int, out) -> list:
    """tail_accuracy.csv and .png from the saved test scores; returns the two paths."""
    task = tasks.for_name(predictions.task)
    names = list(predictions.class_names)
    targets = task.indicator(predictions.labels, len(names))
    table = tasks.tail_accuracy(targets, predictions.scores, names, tasks.tail_thresholds(predictions.scores, steps))
    paths = [out / "tail_accuracy.csv", out / "tail_accuracy.png"]
    fileio.save_csv(table, paths[0], index=False)
    plot_tail_accuracy(table, names, task.score_words, len(predictions.relpaths), paths[1])
    mean = table[table.label == "mean"]
    print("tail accuracy (mean over classes) at t = " + ", ".join(
        f"{r.threshold:.2f}: {r.tail_accuracy:.3f} ({r.n_above})" for r in mean.iloc[::max(1, len(mean) // 4)].itertuples()))
    return paths


# ---- the single-label evaluation -----------------------------------------------------------------

def evaluate_multiclass(trained: checkpoints.TrainedModel, predictions: saved_predictions.Predictions, out) -> list:
    """Metrics table, confusion matrix and misclassified gallery; returns the files written."""
    labels, predicted, names = predictions.labels, predictions.predicted, predictions.class_names
    table = metrics.metrics_table(labels, predicted, predictions.scores, names)
    print_table(table)
    outputs = [out / name for name in ("test_metrics.csv", "test_metrics.json", "confusion_matrix.png",
                                       "misclassified_test_images.png")]
    fileio.save_csv(table, outputs[0], index=False)
    fileio.save_json(dict(checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256,
                          weights_source=trained.checkpoint.weights_source, overall=table.iloc[-1].to_dict(),
                          per_class=table.to_dict("records")), outputs[1])
    plot_confusion(confusion_matrix(labels, predicted, labels=range(len(names))), names,
                   float(table.accuracy.iloc[-1]), outputs[2])
    plot_misclassified(predictions, trained.split.root, outputs[3])
    return outputs


# ---- the multi-label evaluation ------------------------------------------------------------------

def multilabel_metrics_table(targets: np.ndarray, scores: np.ndarray, label_names: list[str]) -> pd.DataFrame:
    """One row per label and an "overall" row: test images carrying the label, images scored >= 0.5,
    average precision of its sigmoid score (NaN if no test image carries it), precision, recall and
    F1 at 0.5 (precision 0 for a label never predicted, as for classes). Overall: all images, mAP,
    macro precision/recall/F1, micro precision and recall, exact-match accuracy (every label right)."""
    predicted = (scores >= 0.5).astype(np.int64)
    ap = tasks.average_precisions(targets, scores)
    per_label = {name: metric(targets, predicted, average=None, zero_division=zero)
                 for name, metric, zero in (("precision", precision_score, 0.0), ("recall", recall_score, np.nan),
                                            ("f1", f1_score, 0.0))}
    table = pd.DataFrame(dict(label=label_names + ["overall"], n_test=list(targets.sum(0)) + [len(targets)],
                              n_predicted=list(predicted.sum(0)) + [int(predicted.sum())],
                              average_precision=list(ap) + [np.nanmean(ap)]))
    for name, values in per_label.items():
        table[name] = list(np.asarray(values, dtype=float)) + [float(np.nanmean(values))]
    table["micro_precision"] = [np.nan] * len(label_names) + [precision_score(targets, predicted, average="micro",
                                                                              zero_division=0.0)]
    table["micro_recall"] = [np.nan] * len(label_names) + [recall_score(targets, predicted, average="micro",
                                                                        zero_division=np.nan)]
    table["exact_match"] = [np.nan] * len(label_names) + [float((predicted == targets).all(1).mean())]
    return table


def plot_label_metrics(table: pd.DataFrame, path) -> None:
    """Grouped bars per label: AP, precision and recall at 0.5; the mAP in the title."""
    plt = plots.pyplot()
    rows, overall = table.iloc[:-1], table.iloc[-1]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(rows) + 3), 4.6), layout="constrained")
    for offset, (column, words) in zip((-0.27, 0, 0.27), (("average_precision", "average precision"),
                                                           ("precision", "precision at 0.5"),
                                                           ("recall", "recall at 0.5"))):
        bars = ax.bar(x + offset, rows[column].fillna(0), width=0.26, label=words)
        ax.bar_label(bars, labels=[f"{v:.2f}" if np.isfinite(v) else "n/a" for v in rows[column]], fontsize=7,
                     padding=1)
    ax.set_xticks(x, [f"{name}\n({n} img.)" for name, n in zip(rows.label, rows.n_test)])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("score")
    ax.set_xlabel("label (test images carrying it)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, fontsize=9)
    ax.set_title(f"Test set, per label: mAP {overall.average_precision:.3f}, exact-match accuracy "
                 f"{overall.exact_match:.3f} on {int(overall.n_test)} images")
    plots.save_figure(fig, path)


def evaluate_multilabel(trained: checkpoints.TrainedModel, predictions: saved_predictions.Predictions, out) -> list:
    """Per-label metrics table and its bar chart; returns the files written."""
    table = multilabel_metrics_table(predictions.labels, predictions.scores, list(predictions.class_names))
    print("Test set, per label (images carrying it / AP / precision / recall / F1 at score 0.5):")
    for row in table.itertuples():
        print(f"  {row.label}: {row.n_test}  AP {row.average_precision:.3f}  P {row.precision:.3f}  "
              f"R {row.recall:.3f}  F1 {row.f1:.3f}")
    overall = table.iloc[-1]
    print(f"mAP {overall.average_precision:.4f}, macro P {overall.precision:.4f} R {overall.recall:.4f}, micro P "
          f"{overall.micro_precision:.4f} R {overall.micro_recall:.4f}, exact match {overall.exact_match:.4f}")
    outputs = [out / "test_metrics.csv", out / "test_metrics.json", out / "test_label_metrics.png"]
    fileio.save_csv(table, outputs[0], index=False)
    fileio.save_json(dict(checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256, task="multilabel",
                          weights_source=trained.checkpoint.weights_source, overall=overall.to_dict(),
                          per_label=table.to_dict("records")), outputs[1])
    plot_label_metrics(table, outputs[2])
    return outputs


EVALUATIONS = {"multiclass": evaluate_multiclass, "multilabel": evaluate_multilabel}  # one entry per task


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "evaluate", [paths.best, paths.split])
    checkpoint = trained.checkpoint
    print(f"evaluate.py  {paths.best} (epoch {checkpoint.epoch:.2f}, trunk: {checkpoint.weights_source})")
    cache = trained.trunk_cache(cfg, paths, runtime)
    predictions = saved_predictions.predict_test_set(trained, cache, runtime)
    outputs = EVALUATIONS[predictions.task](trained, predictions, paths.out)
    outputs += save_tail_accuracy(predictions, cfg.TAIL_THRESHOLDS, paths.out)
    outputs += saved_predictions.save_predictions(paths, predictions)
    provenance.save_provenance(paths, "evaluate", inputs, outputs, cfg)
    print(f"-> {', '.join(str(p) for p in outputs)}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
