"""Does picking what to annotate beat picking at random? A simulation on held-out labelled images
(a measurement, not a test: it prints figures and draws one).

    python tools/annotation_simulation.py                         # lite0 trunk, built-in digits, 10 draws
    python tools/annotation_simulation.py --draws=3 --rounds=5    # quicker
    python tools/annotation_simulation.py --batch=50 --rounds=6 --figure=/tmp/b50.png
    python tools/annotation_simulation.py --config=my_settings.py # your DATA_DIR and classes; any --KEY=VALUE too

Features: the frozen trunk's feature maps averaged over space, of every image of SEEN_CLASSES and
UNSEEN_CLASSES in DATA_DIR (default: the built-in digits, all ten classes, 1,797 images), at
IMAGE_SIZE, with TRUNK = "efficientnet_lite0" and its ImageNet weights unless a setting says
otherwise; computed once and kept in CACHE_DIR/annotation_simulation/ (keyed by trunk, weights,
image size, resize mode, folder and image list). Every image must be readable. TRUNK and WEIGHTS
come from the command line (--TRUNK=resnet18) or these defaults, never from a settings file.

Each draw: a stratified 30 % of the images are the test set, the rest the pool; `start` labels are
drawn at random from the pool (the same for every strategy in a draw); then `rounds` times, a
logistic regression on the standardised features of the labels so far (the "head") gives the pool's
class probabilities, the strategy (plankton/annotation.py's STRATEGIES, as annotate_next.py uses
them) picks `batch` more images of the pool, their labels are added, and the head, retrained, is
scored on the test set (accuracy and balanced accuracy). The strategies see the head's
probabilities and, as embeddings (kNN novelty, diversity), the standardised trunk features.

Writes: --csv (default OUTPUT_DIR/annotation_simulation.csv: draw, strategy, labels, accuracy,
balanced_accuracy) and --figure (default OUTPUT_DIR/annotation_simulation.png: mean and the spread
over draws of both metrics against the number of labels, one line per strategy).
Prints: per strategy, the mean ± standard deviation over draws at a few label counts, and the mean
gain over random across the whole curve with the number of draws where it was ahead. --replot
prints and draws again from --csv without simulating.
"""
import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the scripts and the plankton package
import dataloader  # noqa: E402
from plankton import annotation, fileio, images, plots, settings, training  # noqa: E402

TEST_FRACTION = 0.3
COLOURS = {"random": "black", "margin": "tab:blue", "entropy": "tab:green", "knn": "tab:purple",
           "diverse": "tab:red"}
DEFAULTS = ["--TRUNK=efficientnet_lite0", "--WEIGHTS=imagenet"]  # the real pretrained trunk, offline


# ---- the features, computed once -----------------------------------------------------------------

def image_features(cfg) -> tuple[np.ndarray, np.ndarray, list[str], Path]:
    """(pooled trunk features, labels, class names, folder) of every image of SEEN_CLASSES and
    UNSEEN_CLASSES in DATA_DIR (the built-in digits: all ten), from the cache file once computed."""
    root = images.data_dir(cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR)
    found = images.list_class_images(root)
    classes = [name for name in cfg.SEEN_CLASSES + cfg.UNSEEN_CLASSES if name in found]
    relpaths = [p for name in classes for p in found[name]]
    labels = np.array([i for i, name in enumerate(classes) for _ in found[name]])
    key = hashlib.sha256("|".join([cfg.TRUNK, str(cfg.WEIGHTS), str(cfg.IMAGE_SIZE), cfg.RESIZE_MODE, str(root),
                                   *relpaths]).encode())
    path = Path(cfg.CACHE_DIR) / "annotation_simulation" / f"{cfg.TRUNK}_{key.hexdigest()[:12]}.npz"
    if path.is_file():
        return np.load(path)["features"], labels, classes, root
    model, _, weights = training.new_model(cfg, len(classes))
    print(f"trunk {cfg.TRUNK} ({weights}): features of {len(relpaths)} images at {cfg.IMAGE_SIZE} px ...")
    runtime = dataloader.runtime_from_settings(cfg)
    trunk = model.trunk.to(runtime.device).eval()
    preprocess = dataloader.Preprocess.for_trunk(cfg.TRUNK, cfg.IMAGE_SIZE, cfg.RESIZE_MODE)
    maps = dataloader.compute_trunk_features(trunk, root, relpaths, preprocess, runtime)
    features = maps.mean(axis=(2, 3)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with fileio.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=features)
    return features, labels, classes, root


# ---- one draw ------------------------------------------------------------------------------------

def fit_head(features: np.ndarray, labels: np.ndarray, seed: int) -> LogisticRegression:
    return LogisticRegression(max_iter=1000, random_state=seed).fit(features, labels)


def pool_probabilities(head: LogisticRegression, features: np.ndarray, classes: int) -> np.ndarray:
    """predict_proba over every class (a class with no label yet gets probability 0)."""
    probabilities = np.zeros((len(features), classes))
    probabilities[:, head.classes_] = head.predict_proba(features)
    return probabilities


def one_draw(features, labels, draw: int, start: int, batch: int, rounds: int, k: int, metric: str) -> list[dict]:
    """Rows (draw, strategy, labels, accuracy, balanced_accuracy) of every strategy on one draw."""
    pool, test = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels,
                                  random_state=draw)
    first = np.random.default_rng(draw).choice(pool, start, replace=False)
    rows = []
    for name in annotation.STRATEGIES:
        labelled = list(first)
        for step in range(rounds + 1):
            head = fit_head(features[labelled], labels[labelled], draw)
            predicted = head.predict(features[test])
            rows.append(dict(draw=draw, strategy=name, labels=len(labelled),
                             accuracy=accuracy_score(labels[test], predicted),
                             balanced_accuracy=balanced_accuracy_score(labels[test], predicted)))
            if step == rounds:
                break
            rest = np.setdiff1d(pool, labelled)
            candidates = annotation.Candidates(pool_probabilities(head, features[rest], labels.max() + 1),
                                               features[rest],
                                               annotation.labelled_reference(features[labelled], k, metric))
            picked, _ = annotation.select(name, candidates, batch, seed=draw * 1000 + step)
            labelled += list(rest[picked])
    return rows


# ---- what it prints and draws --------------------------------------------------------------------

def summary_table(results: pd.DataFrame, metric: str, at: list[int]) -> pd.DataFrame:
    """Mean ± sd over draws of `metric` per strategy (rows) at the label counts `at` (columns)."""
    grouped = results[results["labels"].isin(at)].groupby(["strategy", "labels"])[metric]
    cells = grouped.agg(lambda v: f"{v.mean():.3f} ± {v.std(ddof=1):.3f}").unstack("labels")
    return cells.loc[list(annotation.STRATEGIES)]


def gain_over_random(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per strategy: the mean over the curve (every label count after the start) of metric minus
    random's in the same draw; its sd over draws; the draws where that mean gain is > 0."""
    later = results[results["labels"] > results["labels"].min()]
    curve = later.groupby(["strategy", "draw"])[metric].mean().unstack("strategy")
    gain = curve.sub(curve["random"], axis=0)
    return pd.DataFrame(dict(mean_gain=gain.mean(), sd=gain.std(ddof=1), draws_ahead=(gain > 0).sum(),
                             draws=len(gain))).loc[list(annotation.STRATEGIES)]


def paired_gain(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per strategy (columns) and label count (rows): mean and sd over draws of metric minus
    random's in the same draw (the draws share their test set and starting labels)."""
    table = results.pivot_table(index=["draw", "labels"], columns="strategy", values=metric)
    gain = table.sub(table["random"], axis=0)
    return gain.groupby("labels").agg(["mean", "std"])


def plot_curves(results: pd.DataFrame, title: str, path: Path) -> None:
    """Accuracy and balanced accuracy against labels (mean, band ± 1 sd over draws), and the
    accuracy gain over random in the same draw."""
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.4))
    for ax, metric in zip(axes, ("accuracy", "balanced_accuracy")):
        for name in annotation.STRATEGIES:
            curve = results[results.strategy == name].groupby("labels")[metric]
            mean, sd = curve.mean(), curve.std(ddof=1).fillna(0)
            style = dict(color=COLOURS.get(name), lw=1.8, ls="--" if name == "random" else "-")
            ax.plot(mean.index, mean, marker="o", ms=3, label=f"{name}: {annotation.STRATEGIES[name].label}", **style)
            ax.fill_between(mean.index, mean - sd, mean + sd, color=COLOURS.get(name), alpha=0.12, lw=0)
        ax.set_xlabel("labelled images")
        ax.set_ylabel(f"test {metric.replace('_', ' ')}")
        ax.set_title(f"test {metric.replace('_', ' ')} (mean, band ± 1 sd over draws)", fontsize=9)
        ax.grid(alpha=0.3)
    gain = paired_gain(results, "accuracy")
    for name in annotation.STRATEGIES:
        mean, sd = gain[(name, "mean")], gain[(name, "std")].fillna(0)
        axes[2].plot(mean.index, mean, marker="o", ms=3, color=COLOURS.get(name), lw=1.8,
                     ls="--" if name == "random" else "-")
        if name != "random":
            axes[2].fill_between(mean.index, mean - sd, mean + sd, color=COLOURS.get(name), alpha=0.12, lw=0)
    axes[2].set_xlabel("labelled images")
    axes[2].set_ylabel("test accuracy − random's")
    axes[2].set_title("gain over random in the same draw (mean, band ± 1 sd)", fontsize=9)
    axes[2].grid(alpha=0.3)
    axes[0].legend(fontsize=7.5, loc="lower right")
    fig.suptitle(title, fontsize=9.5)
    fig.tight_layout()
    plots.save_figure(fig, path)


def report(results: pd.DataFrame, setup: str, figure: Path) -> None:
    """The tables printed, and the figure."""
    counts = sorted(results["labels"].unique())
    at = sorted({counts[0], counts[len(counts) // 3], counts[2 * len(counts) // 3], counts[-1]})
    print(f"\n{setup}")
    for metric in ("accuracy", "balanced_accuracy"):
        print(f"\ntest {metric} (mean ± sd over draws) at these numbers of labels:")
        print(summary_table(results, metric, at).to_string())
        print(f"\n{metric}: gain over random, averaged over the curve after the start (sd over draws):")
        print(gain_over_random(results, metric).to_string(formatters=dict(mean_gain="{:+.4f}".format,
                                                                         sd="{:.4f}".format)))
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(results, f"What to annotate next, simulated: {setup}", figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=10, help="random test splits and starting labels")
    parser.add_argument("--start", type=int, default=20, help="labels drawn at random before the first round")
    parser.add_argument("--batch", type=int, default=10, help="labels added per round (B)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--figure", type=Path, default=None)
    parser.add_argument("--replot", action="store_true", help="print and draw the results already in --csv")
    args, rest = parser.parse_known_args()
    cfg = settings.load_settings(DEFAULTS + rest)
    out = Path(cfg.OUTPUT_DIR)
    csv_path, figure = args.csv or out / "annotation_simulation.csv", args.figure or out / "annotation_simulation.png"
    root = images.data_dir(cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR)
    found = images.list_class_images(root)
    classes = [name for name in cfg.SEEN_CLASSES + cfg.UNSEEN_CLASSES if name in found]
    data = (f"the {sum(len(found[c]) for c in classes):,} built-in digits" if cfg.DATA_DIR is None
            else f"the {sum(len(found[c]) for c in classes):,} images of {root.name}")
    if args.replot:
        results = pd.read_csv(csv_path)
        draws, counts = results.draw.nunique(), sorted(results["labels"].unique())
        args.start, args.batch, args.rounds = counts[0], counts[1] - counts[0], len(counts) - 1
    else:
        features, labels, _, _ = image_features(cfg)
        features = StandardScaler().fit_transform(features)  # label-free: every image's features are known
        began, rows = time.perf_counter(), []
        for draw in range(args.draws):
            rows += one_draw(features, labels, draw, args.start, args.batch, args.rounds, cfg.OPEN_SET_K,
                             cfg.OPEN_SET_KNN_METRIC)
            print(f"draw {draw + 1}/{args.draws} done ({time.perf_counter() - began:.0f} s)", flush=True)
        results, draws = pd.DataFrame(rows), args.draws
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        fileio.save_csv(results, csv_path, index=False)
    setup = (f"{cfg.TRUNK} features of {data} ({len(classes)} classes, {cfg.IMAGE_SIZE} px); {draws} draw{'s' if draws > 1 else ''}: "
             f"{TEST_FRACTION:.0%} test, {args.start} random labels, then {args.rounds} rounds of {args.batch}; "
             f"logistic regression head")
    report(results, setup, figure)
    print(f"\n-> {csv_path}, {figure}")


if __name__ == "__main__":
    main()
