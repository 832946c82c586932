"""Head losses compared: the head trained once per loss in HEAD_COMPARE_LOSSES (cross-entropy,
supervised contrastive, triplet, ArcFace, cross-entropy + one of them) on ONE split from ONE trunk, and
for each: seen test accuracy and macro F1, few-shot accuracy on the unseen classes at 1, 5 and 10
images per class (nearest class mean on the embeddings, 95% t-interval), open-set AUROC, silhouette of
the unseen classes and training time.

    python compare_heads.py
    python compare_heads.py --HEAD_COMPARE_LOSSES='["ce", "triplet"]' --HEAD_COMPARE_EPOCHS=10

Reads:  outputs/split.csv (drawn as train.py draws it if there is none yet), the images (through the
        trunk cache).
Writes: outputs/compare_heads/initial_trunk.pth (the trunk every loss starts from), outputs/compare_heads/
        <loss>/ (a copy of split.csv, best.pth, last.pth, training_history.csv and its plots,
        train_log.txt), outputs/compare_heads.csv (one row per loss), outputs/compare_heads.png, and last
        outputs/provenance_compare_heads.json. The main checkpoints/best.pth is never touched.

Every loss trains with the same settings, seed and initial trunk (train.py in a process of its own,
HEAD_LOSS set, MAX_EPOCHS = HEAD_COMPARE_EPOCHS or MAX_EPOCHS); only the loss differs. Few-shot: the
unseen classes' embeddings split as in transfer_learning.py (TRANSFER_TEST_FRACTION), FEWSHOT_DRAWS
draws of exactly k training images per class, nearest class mean (Euclidean), balanced accuracy; a k
the smallest unseen class cannot give is left empty. Open set: the four scores of open_set.py, seen test
images against every unseen image. Silhouette: scikit-learn's, cosine distance (the heads' embeddings
differ in scale), on at most QUALITY_SAMPLES unseen images. A loss whose training finished with the same
settings is not trained again; after changing a training setting run with --RESUME=False.
"""
import contextlib
import io
import time
import types

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import silhouette_score

import dataloader
from plankton import (
    checkpoints,
    fileio,
    heads,
    locations,
    metrics,
    openset,
    plots,
    probes,
    provenance,
    registry,
    runner,
    splits,
    variant_runs,
)
from plankton.errors import PipelineError

SHOTS = (1, 5, 10)  # unseen training images per class of the few-shot columns
FEWSHOT_PROBE = "NCM"  # probes.PROBES' nearest class mean: the prototype a few images give


def check_losses(cfg) -> list[str]:
    """HEAD_COMPARE_LOSSES, each a HEAD_LOSS that can train with these settings, or one error line."""
    for name in cfg.HEAD_COMPARE_LOSSES:
        if name not in heads.LOSS_NAMES:
            raise PipelineError(f"HEAD_COMPARE_LOSSES={cfg.HEAD_COMPARE_LOSSES!r}: {name!r} is not a head loss; "
                                f"choose from {', '.join(map(repr, heads.LOSS_NAMES))}")
        heads.check_loss(name, cfg.TASK, cfg.LABEL_SMOOTHING)
    if not cfg.HEAD_COMPARE_LOSSES:
        raise PipelineError("HEAD_COMPARE_LOSSES=[]: name at least one head loss to train")
    return list(cfg.HEAD_COMPARE_LOSSES)


def head_settings(cfg, loss: str, folder, trunk_path: str) -> types.SimpleNamespace:
    """One loss's run: its own folder for outputs and checkpoints, the shared trunk, the capped epochs."""
    return types.SimpleNamespace(**{**vars(cfg), "HEAD_LOSS": loss, "OUTPUT_DIR": str(folder),
                                    "CHECKPOINT_DIR": str(folder), "WEIGHTS": trunk_path,
                                    "MAX_EPOCHS": cfg.HEAD_COMPARE_EPOCHS or cfg.MAX_EPOCHS})


def fewshot_columns(embeddings: np.ndarray, labels: np.ndarray, cfg) -> dict:
    """fewshot_<k>, fewshot_<k>_low, fewshot_<k>_high: mean balanced accuracy of FEWSHOT_PROBE over
    FEWSHOT_DRAWS draws of k images per class and its 95% t-interval (NaN where k is too many)."""
    runs = probes.fewshot_runs(embeddings, labels, cfg.TRANSFER_TEST_FRACTION, cfg.FEWSHOT_DRAWS,
                               probes.ProbeSettings.from_settings(cfg), cfg.SEED, shots=SHOTS, methods=[FEWSHOT_PROBE])
    summary = probes.fewshot_summary(runs).set_index("shots") if len(runs) else pd.DataFrame()
    columns = {}
    for k in SHOTS:
        found = k in summary.index
        for suffix, key in (("", "mean"), ("_low", "ci95_low"), ("_high", "ci95_high")):
            columns[f"fewshot_{k}{suffix}"] = float(summary.loc[k, key]) if found else np.nan
    return columns


def unseen_silhouette(embeddings: np.ndarray, labels: np.ndarray, samples: int, seed: int) -> float:
    """scikit-learn's silhouette (cosine distance) of the unseen classes, on at most `samples` images."""
    if len(embeddings) > samples:
        keep = np.sort(np.random.default_rng(seed).choice(len(embeddings), samples, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
    if not 2 <= len(np.unique(labels)) < len(labels):
        return float("nan")
    return float(silhouette_score(embeddings, labels, metric="cosine"))


def evaluate_head(head_cfg, runtime) -> dict:
    """The comparison's figures of one loss's best.pth (see the module docstring)."""
    head_paths = locations.Paths.from_settings(head_cfg)
    with contextlib.redirect_stdout(io.StringIO()):  # the split's checks print what train.py printed
        trained = checkpoints.open_trained_model(head_cfg, head_paths, runtime.device, runtime.channels_last)
        cache = trained.trunk_cache(head_cfg, head_paths, runtime)
        reference = openset.reference_from_model(trained, cache, runtime, head_cfg)
    test_logits, test_embeddings, test_labels = openset.subset_outputs(trained, cache, runtime, "test")
    unseen_logits, unseen_embeddings, unseen_labels = openset.subset_outputs(trained, cache, runtime, "unseen")
    scores = torch.softmax(torch.from_numpy(test_logits).double(), dim=1).numpy()
    table = metrics.metrics_table(test_labels, test_logits.argmax(1), scores, trained.class_names)
    row = dict(loss=head_cfg.HEAD_LOSS, label=heads.label(head_cfg.HEAD_LOSS),
               test_accuracy=float(table.accuracy.iloc[-1]), test_macro_f1=float(table.f1.iloc[-1]))
    row.update(fewshot_columns(unseen_embeddings, unseen_labels, head_cfg))
    seen_scores = openset.all_scores(test_logits, test_embeddings, reference)
    unseen_scores = openset.all_scores(unseen_logits, unseen_embeddings, reference)
    row.update({f"auroc_{name}": openset.detection_metrics(seen_scores[name], unseen_scores[name])["auroc"]
                for name in openset.SCORES})
    row["silhouette_unseen"] = unseen_silhouette(unseen_embeddings, unseen_labels, head_cfg.QUALITY_SAMPLES,
                                                 head_cfg.SEED)
    row.update(best_epoch=trained.checkpoint.epoch, best_val_loss=trained.checkpoint.val_loss)
    return row


# ---- the figure ----------------------------------------------------------------------------------

def bar_panel(ax, table: pd.DataFrame, columns: dict[str, str], colours, title: str, ylabel: str) -> None:
    """Grouped bars: one group per loss (named below it), one bar per column (named in the legend)."""
    width = 0.8 / len(columns)
    x = np.arange(len(table))
    for i, (column, name) in enumerate(columns.items()):
        offset = (i - (len(columns) - 1) / 2) * width
        if len(columns) == 1:
            ax.bar(x, table[column], 0.6, color=colours)
        else:
            ax.bar(x + offset, table[column], width, label=name, color=plots_colour(i))
    ax.set_xticks(x, table.loss, rotation=30, ha="right")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    if len(columns) > 1:  # in the room above 1 that top_room leaves, clear of the bars
        ax.legend(fontsize=7, loc="upper center", ncol=len(columns), handlelength=1.2, columnspacing=0.8)


def top_room(ax, low: float) -> None:
    """Y from `low` (0 for every panel now) to 1, with room above 1 for the legend; no tick above 1."""
    bottom = max(0.0, low)
    ax.set_ylim(bottom, 1.0 + 0.2 * (1.0 - bottom))
    ax.set_yticks([tick for tick in ax.get_yticks() if bottom - 1e-9 <= tick <= 1.0 + 1e-9])


def plots_colour(i: int) -> str:
    return ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")[i % 5]


def plot_comparison(table: pd.DataFrame, cfg, weights_source: str, path) -> None:
    plt = plots.pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6), layout="constrained")
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(len(table))]
    bar_panel(axes[0, 0], table, {"test_accuracy": "accuracy", "test_macro_f1": "macro F1"}, colours,
              "Seen classes: test accuracy and macro F1", "on the seen test images")
    top_room(axes[0, 0], 0.0)  # the whole range: a zoomed axis made small differences look large
    ax = axes[0, 1]
    for i, row in enumerate(table.itertuples()):
        means = np.array([getattr(row, f"fewshot_{k}") for k in SHOTS])
        errors = np.array([[m - getattr(row, f"fewshot_{k}_low") for k, m in zip(SHOTS, means)],
                           [getattr(row, f"fewshot_{k}_high") - m for k, m in zip(SHOTS, means)]])
        shift = (i - (len(table) - 1) / 2) * 0.06  # side by side, so the interval bars do not hide each other
        ax.errorbar(np.array(SHOTS) * np.exp(shift), means, yerr=np.nan_to_num(errors), fmt="o-", capsize=3,
                    color=colours[i], label=row.loss)
    ax.set_xscale("log")
    ax.set_xticks(SHOTS, [str(k) for k in SHOTS])
    ax.minorticks_off()
    ax.set_xlabel("training images per unseen class, k")
    ax.set_ylabel("balanced accuracy (nearest class mean)")
    ax.set_ylim(0, 1.0)  # the same 0-1 range as the seen accuracy beside it
    ax.set_title(f"Unseen classes, few-shot: mean and 95% t-interval\nover {cfg.FEWSHOT_DRAWS} draws", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="HEAD_LOSS", title_fontsize=8, loc="lower right")
    bar_panel(axes[0, 2], table, {f"auroc_{name}": name.replace("_", " ") for name in openset.SCORES}, colours,
              "Open set: AUROC, seen test vs unseen images", "AUROC")
    top_room(axes[0, 2], 0.0)
    bar_panel(axes[1, 0], table, {"silhouette_unseen": "silhouette"}, colours,
              "Unseen classes: silhouette (cosine)", "silhouette (-1 to 1)")
    axes[1, 0].axhline(0, color="grey", lw=0.8)
    bar_panel(axes[1, 1], table, {"train_seconds": "seconds"}, colours, "Training time (train.py, own process)",
              "seconds")
    ax = axes[1, 2]
    ax.axis("off")
    lines = [f"{row.loss}: {row.label}" for row in table.itertuples()]
    ax.text(0.0, 1.0, "HEAD_LOSS\n" + "\n".join(lines) + f"\n\ntrunk: {cfg.TRUNK}\nweights: {weights_source}"
            f"\nepochs at most: {cfg.HEAD_COMPARE_EPOCHS or cfg.MAX_EPOCHS}, seed {cfg.SEED}",
            va="top", ha="left", fontsize=9, wrap=True, transform=ax.transAxes)
    fig.suptitle("Head losses compared on one split and one trunk")
    plots.save_figure(fig, path)


def run(cfg) -> None:
    registry.require_task("compare_heads", cfg.TASK)
    losses = check_losses(cfg)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    inputs = provenance.start_stage(paths, "compare_heads", [paths.split])
    folder = paths.out / "compare_heads"
    trunk_path, weights_source, _ = variant_runs.save_initial_trunk(cfg, folder, split)
    rows, started = [], time.time()
    for loss in losses:
        head_cfg = head_settings(cfg, loss, folder / loss, trunk_path)
        seconds = variant_runs.train_variant(head_cfg, paths.split, f"HEAD_LOSS={loss!r}")
        rows.append(dict(evaluate_head(head_cfg, runtime), train_seconds=seconds))
        row = rows[-1]
        print(f"{loss}: test accuracy {row['test_accuracy']:.4f}, macro F1 {row['test_macro_f1']:.4f}, few-shot "
              + ", ".join(f"k={k} {row[f'fewshot_{k}']:.3f}" for k in SHOTS)
              + f", kNN AUROC {row['auroc_knn']:.3f}, unseen silhouette {row['silhouette_unseen']:.3f} ({seconds:.1f} s)")
    table = pd.DataFrame(rows).assign(trunk=cfg.TRUNK, trunk_weights=weights_source)
    outputs = [paths.out / name for name in registry.stage("compare_heads").outputs]
    fileio.save_csv(table, outputs[0], index=False)
    plots.note_trunk_weights(weights_source)  # the trunk every loss started from, not its saved copy's path
    plot_comparison(table, cfg, weights_source, outputs[1])
    provenance.save_provenance(paths, "compare_heads", inputs, outputs, cfg)
    print(f"{len(losses)} head losses in {time.time() - started:.1f} s -> {outputs[0]}, {outputs[1]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
