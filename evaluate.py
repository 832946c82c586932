"""Test-set accuracy of the trained classifier, per class and overall, and a confusion matrix.

    python evaluate.py

Reads:  checkpoints/best.pth, outputs/split.csv, the test images (through the trunk cache).
Writes: outputs/test_metrics.csv (per class and overall), outputs/test_metrics.json,
        outputs/confusion_matrix.png.
"""
import numpy as np
import pandas as pd

import common
import dataloader

FEW = 20  # a per-class figure resting on fewer test images than this is flagged


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, class_names: list[str]) -> pd.DataFrame:
    rows = []
    for i, name in enumerate(class_names):
        mask = labels == i
        n = int(mask.sum())
        rows.append(dict(class_name=name, n_test=n, correct=int((predictions[mask] == i).sum()),
                         accuracy=float((predictions[mask] == i).mean()) if n else float("nan")))
    rows.append(dict(class_name="overall", n_test=len(labels), correct=int((predictions == labels).sum()),
                     accuracy=float((predictions == labels).mean())))
    return pd.DataFrame(rows)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, k: int) -> np.ndarray:
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


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


def run(cfg) -> None:
    paths = common.make_output_dirs(cfg)
    device = common.pick_device(cfg.DEVICE)
    checkpoint, split, model = dataloader.open_trained_model(cfg, paths, device)
    print(f"evaluate.py  {paths.best} (epoch {checkpoint['epoch']:.2f}, trunk: {checkpoint['weights_source']})")

    source = dataloader.feature_source(split, "test", model.trunk, checkpoint["trunk_sha256"], cfg, paths.cache,
                                       device, use_cache=bool(cfg.CACHE_TRUNK))
    logits, _ = dataloader.head_outputs(model, source, device, cfg)
    labels, predictions = source.labels.numpy(), logits.argmax(1)
    names = list(checkpoint["class_names"])
    table = per_class_accuracy(labels, predictions, names)

    print("Test accuracy for each class:")
    for row in table.itertuples():
        flag = f"  (only {row.n_test} test images: a rough figure)" if row.n_test < FEW else ""
        label = "Total test accuracy" if row.class_name == "overall" else f"  {row.class_name}"
        print(f"{label}: {100 * row.accuracy:.2f}% ({row.correct}/{row.n_test}){flag}")
    common.save_csv(table, paths.out / "test_metrics.csv", index=False)
    common.save_json(dict(checkpoint_sha256=common.sha256_file(paths.best), split_sha256=split.sha256,
                          weights_source=checkpoint["weights_source"], per_class=table.to_dict("records")),
                     paths.out / "test_metrics.json")
    plot_confusion(confusion_matrix(labels, predictions, len(names)), names, float(table.accuracy.iloc[-1]),
                   paths.out / "confusion_matrix.png")
    print(f"-> {paths.out / 'test_metrics.csv'}, {paths.out / 'confusion_matrix.png'}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
