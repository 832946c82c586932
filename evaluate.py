"""Test-set accuracy of the trained classifier, per class and overall, and a confusion matrix.

    python evaluate.py

Reads:  checkpoints/best.pth, outputs/split.csv, the test images (through the trunk cache).
Writes: outputs/test_metrics.csv (per class and overall), outputs/test_metrics.json,
        outputs/confusion_matrix.png, and last outputs/provenance_evaluate.json (see artifacts.py).
"""
import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score

import artifacts
import common
import dataloader
import training
import trunk_cache

FEW = 20  # a per-class figure resting on fewer test images than this is flagged

# Each metric: (per-class values, overall value) from true and predicted label indices. Adding a
# metric to the table is one entry here.
METRICS = {
    "accuracy": lambda y, p, k: (recall_score(y, p, labels=range(k), average=None, zero_division=np.nan),
                                 accuracy_score(y, p)),
}


def metrics_table(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    """One row per class and an "overall" row: test images, correct predictions, every metric."""
    k = len(class_names)
    counts = np.bincount(labels, minlength=k)
    hits = np.bincount(labels[predictions == labels], minlength=k)
    table = pd.DataFrame(dict(class_name=class_names + ["overall"], n_test=list(counts) + [len(labels)],
                              correct=list(hits) + [int(hits.sum())]))
    for name, metric in METRICS.items():
        per_class, overall = metric(labels, predictions, k)
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
    print("Test accuracy for each class:")
    for row in table.itertuples():
        flag = f"  (only {row.n_test} test images: a rough figure)" if row.n_test < FEW else ""
        label = "Total test accuracy" if row.class_name == "overall" else f"  {row.class_name}"
        print(f"{label}: {100 * row.accuracy:.2f}% ({row.correct}/{row.n_test}){flag}")


def run(cfg) -> None:
    paths = artifacts.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = artifacts.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = artifacts.start_stage(paths, "evaluate", [paths.best, paths.split])
    checkpoint = trained.checkpoint
    print(f"evaluate.py  {paths.best} (epoch {checkpoint['epoch']:.2f}, trunk: {checkpoint['weights_source']})")
    cache = trunk_cache.from_settings(cfg, paths.cache, trained.model.trunk, checkpoint["trunk_sha256"],
                                      trained.preprocess, runtime)
    source = trained.source("test", cache)
    logits, _ = training.head_outputs(trained.model, source, runtime)
    labels, predictions = source.labels.numpy(), logits.argmax(1)
    names = list(checkpoint["class_names"])
    table = metrics_table(labels, predictions, names)
    print_table(table)
    outputs = [paths.out / name for name in ("test_metrics.csv", "test_metrics.json", "confusion_matrix.png")]
    common.save_csv(table, outputs[0], index=False)
    common.save_json(dict(checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256,
                          weights_source=checkpoint["weights_source"], per_class=table.to_dict("records")),
                     outputs[1])
    plot_confusion(confusion_matrix(labels, predictions, labels=range(len(names))), names,
                   float(table.accuracy.iloc[-1]), outputs[2])
    artifacts.save_provenance(paths, "evaluate", inputs, outputs)
    print(f"-> {paths.out / 'test_metrics.csv'}, {paths.out / 'confusion_matrix.png'}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
