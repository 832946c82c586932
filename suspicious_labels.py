"""Suspicious labels: the training images whose given class is most likely wrong, ranked, so that a
person can look at the few worth checking instead of every image.

    python suspicious_labels.py            (run_all.py runs it after leaks.py; seconds)

Reads:  checkpoints/best.pth (its trunk), outputs/split.csv (the training images and their classes),
        the training images' trunk features (through the trunk cache, as evaluate.py reads them),
        the images shown.
Writes: outputs/suspicious_labels.csv (every training image, most suspicious first: rank, path,
        given_class, suggested_class, p_given, p_suggested, score), outputs/suspicious_labels.png
        (thumbnails of the SUSPECT_COUNT most suspicious, captioned "given -> suggested (p)"), and
        last outputs/provenance_suspicious_labels.json.

How (the simple form of confident learning): every training image gets out-of-fold class
probabilities from scikit-learn's cross_val_predict(LogisticRegression, method="predict_proba") over
SUSPECT_FOLDS stratified folds, so no image's own label took part in the model that scores it. The
suggested class is the most probable class other than the given one, and
    score = p(suggested) - p(given), from -1 to 1;
above 0 the out-of-fold model prefers another class to the given one. The images are ranked by score,
highest first (ties in split order). This ranks like self-confidence, p(given), where the model is
sure of one class, and in addition tells a clear vote for one other class from a spread-out one.

Features: the frozen trunk's feature maps averaged over space (one number per channel), standardised
inside each fold. Not the 128-d embeddings of embed.py: the head that makes them was trained on these
very labels, wrong ones included, so it has pulled each mislabelled image towards its given class and
would hide it; the frozen trunk never saw the labels. (With FINETUNE_BLOCKS > 0 its last blocks did.)
cleanlab implements the full method but is AGPL-3.0, so it is not used here.
Single-label only: with label sets there is no one given class to doubt.
"""
import textwrap

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import dataloader
from plankton import checkpoints, fileio, locations, plots, provenance, registry, runner
from plankton.errors import PipelineError

COLUMNS = ["rank", "path", "given_class", "suggested_class", "p_given", "p_suggested", "score"]
SHEET_COLUMNS = 6  # thumbnails per row of the contact sheet


def pooled_trunk_features(source: dataloader.FeatureSource, trunk, runtime) -> np.ndarray:
    """Each item's trunk feature map averaged over space: one float32 per channel."""
    rows = dataloader.Rows(len(source), np.float32)
    batches = dataloader.in_order(len(source), runtime.batch_size)
    with torch.inference_mode():
        for features, _ in dataloader.feature_batches(source, batches, trunk, runtime):
            rows.add(features.float().mean(dim=(2, 3)))
    return rows.result()


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, n_classes: int, folds: int,
                              seed: int) -> np.ndarray:
    """(images, n_classes) class probabilities, each row from a logistic regression that did not see
    that image: stratified folds, standardised inside each fold."""
    counts = np.bincount(labels, minlength=n_classes)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise PipelineError(f"a class has {smallest} training image: the out-of-fold probabilities need at "
                            f"least 2 per class")
    if smallest < folds:
        print(f"note: the smallest class has {smallest} training images: {smallest} folds, not SUSPECT_FOLDS={folds}")
        folds = smallest
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    # BLAS on one thread: two of them on 2 cores beside torch's OpenMP pool spun against each other, and
    # the fits on 22,538 x 64 features took 362 s instead of 11 s (docs/speed.md)
    with threadpool_limits(limits=1, user_api="blas"):
        present = cross_val_predict(model, features, labels, cv=splitter, method="predict_proba")
    probabilities = np.zeros((len(labels), n_classes))  # classes without a training image stay at 0
    probabilities[:, np.flatnonzero(counts)] = present
    return probabilities


def rank_suspects(probabilities: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """Per image: suggested (the most probable class other than the given one), p_given, p_suggested,
    score = p_suggested - p_given, and rank (1 = most suspicious; ties in row order). Rows stay in
    input order; sort by rank to list the suspects."""
    rows = np.arange(len(labels))
    others = probabilities.copy()
    others[rows, labels] = -np.inf
    suggested = others.argmax(1)
    p_given, p_suggested = probabilities[rows, labels], probabilities[rows, suggested]
    score = p_suggested - p_given
    order = np.argsort(-score, kind="stable")
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(1, len(labels) + 1)
    return pd.DataFrame(dict(given=labels, suggested=suggested, p_given=p_given, p_suggested=p_suggested,
                             score=score, rank=rank))


def suspects_table(ranked: pd.DataFrame, relpaths: list[str], class_names: list[str]) -> pd.DataFrame:
    table = ranked.assign(path=relpaths, given_class=[class_names[i] for i in ranked.given],
                          suggested_class=[class_names[i] for i in ranked.suggested])
    return table.sort_values("rank")[COLUMNS].reset_index(drop=True)


def plot_suspects(table: pd.DataFrame, root, count: int, path) -> None:
    """Thumbnails of the `count` most suspicious training images, captioned "given → suggested (p)"."""
    shown = table.head(count)
    fig, axes = plots.thumbnail_sheet(root, list(shown.path), SHEET_COLUMNS, (1.9, 2.2), 0.9)
    for ax, row in zip(axes, shown.itertuples()):
        caption = textwrap.wrap(f"{row.given_class} → {row.suggested_class}", 20)[:2]
        ax.set_title("\n".join(caption) + f" ({row.p_suggested:.2f})\n#{row.rank}, given {row.p_given:.2f}",
                     fontsize=8)
    fig.suptitle(f"Suspicious labels: the {len(shown)} most suspicious of {len(table)} training images\n"
                 f"caption: given class → suggested class (its out-of-fold probability);\n"
                 f"#rank, the given class's out-of-fold probability",
                 fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, path)


def run(cfg) -> None:
    registry.require_task("suspicious_labels", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "suspicious_labels", [paths.best, paths.split])
    cache = trained.trunk_cache(cfg, paths, runtime)
    source = trained.source("train", cache)
    features = pooled_trunk_features(source, trained.model.trunk, runtime)
    relpaths, labels = trained.split.subset("train")  # in the order of the features
    names = list(trained.split.seen_classes)
    probabilities = out_of_fold_probabilities(features, labels, len(names), cfg.SUSPECT_FOLDS, cfg.SEED)
    table = suspects_table(rank_suspects(probabilities, labels), relpaths, names)
    outputs = [paths.out / "suspicious_labels.csv", paths.out / "suspicious_labels.png"]
    fileio.save_csv(table, outputs[0], index=False)
    plot_suspects(table, trained.split.root, cfg.SUSPECT_COUNT, outputs[1])
    doubted = int((table.score > 0).sum())
    print(f"{doubted} of {len(table)} training images: another class is more probable out of fold than the given one")
    provenance.save_provenance(paths, "suspicious_labels", inputs, outputs, cfg)
    print(f"-> {outputs[0]}, {outputs[1]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
