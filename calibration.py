"""Calibration: do the softmax scores mean what they say? Expected calibration error (15 equal-width
confidence bins), negative log-likelihood and the multi-class Brier score on the validation and test
images, before and after temperature scaling (Guo et al. 2017): one temperature T, fitted on the
validation set by minimising its NLL, divides every logit.

    python calibration.py

Reads:  checkpoints/best.pth, outputs/split.csv, outputs/test_scores.npz (evaluate.py's test logits),
        the validation images (through the trunk cache).
Also the per-class operating thresholds (plankton/routing.py): for each class the lowest calibrated
score at which the validation images predicted as it still reach ROUTE_PRECISION; on the test
images, each class's coverage (share of its predictions routed as "confident") and the precision
of that part. predict.py routes new images with the same thresholds.

Writes: outputs/calibration.csv (subset val/test x before/after: temperature, images, accuracy, ECE,
        NLL, Brier), outputs/calibration_bins.csv (the reliability diagram's bins: subset, when, bin
        edges, images, accuracy, mean confidence), outputs/calibration.json (the temperature and the
        table), outputs/reliability_diagram.png (test images, before and after), outputs/class_thresholds.csv
        and class_thresholds.png (the per-class thresholds, test coverage and precision), and last
        outputs/provenance_calibration.json.

ECE = sum over bins of (images in bin / images) x |accuracy - mean confidence|, a bin (lo, hi] of
the top softmax score; Brier = mean over images of sum over classes of (p - one-hot)^2 (0 to 2).
Temperature scaling never changes a prediction, only how confident it is. When every validation
image is predicted right the NLL has no minimum (it falls as T -> 0): T stays 1 and the stage says so.
A fitted T is applied (thresholds here, scores in predict.py) only when the test images' ECE at T is
no worse than at 1 (calibrate.choose_temperature); the "after" rows show the fitted T either way,
and calibration.json records the choice and both ECEs.

Multi-label runs (TASK="multilabel") calibrate each label's sigmoid score, one-vs-rest: one
temperature shared by the labels, fitted on the validation images by minimising the mean binary
cross-entropy (not fitted when every validation label is decided right at 0.5). They write
outputs/calibration_labels.csv (subset val/test x before/after x label, then a "mean" row: images,
positives, ECE over 15 equal-width bins of the label's score, NLL and Brier of the label's score,
AP, AUROC), outputs/calibration_label_bins.csv (per subset, before/after and label: the bins' images,
share carrying the label, mean score; the images of a label's bins sum to the subset's images),
outputs/calibration.json, outputs/reliability_diagram_labels.png (one panel per label, test images,
before and after) and outputs/label_thresholds.csv (per label, the lowest calibrated score whose
validation images at or above it carry the label with ROUTE_PRECISION; on the test images the
images above it, their precision and the recall: plankton/routing.py's label_thresholds).
"""
import sys

import numpy as np
import pandas as pd

import dataloader
from plankton import (
    calibrate,
    checkpoints,
    fileio,
    locations,
    openset,
    plots,
    provenance,
    registry,
    routing,
    runner,
    saved_predictions,
)


def calibration_tables(subsets: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float):
    """(one row per subset and before/after, the reliability bins of each) for {subset: (logits, labels)}."""
    rows, bins = [], []
    for subset, (logits, labels) in subsets.items():
        for when, t in (("before", 1.0), ("after", temperature)):
            rows.append(dict(subset=subset, when=when, **calibrate.calibration_row(logits, labels, t)))
            bins.append(calibrate.reliability_bins(calibrate.probabilities(logits, t), labels).assign(subset=subset, when=when))
    bins = pd.concat(bins, ignore_index=True)
    return pd.DataFrame(rows), bins[["subset", "when"] + [c for c in bins.columns if c not in ("subset", "when")]]


def save_tables(outputs: list, table: pd.DataFrame, bins: pd.DataFrame, temperature: float, not_fitted: str,
                **record) -> None:
    """Both tasks' first three outputs: the figures per subset (CSV), per bin (CSV), and calibration.json
    (the temperature, how it was fitted, the task's own `record` entries and the table)."""
    fileio.save_csv(table, outputs[0], index=False)
    fileio.save_csv(bins, outputs[1], index=False)
    fileio.save_json(dict(temperature=temperature, fitted_on="val", not_fitted=not_fitted, bins=calibrate.BINS,
                          **record, table=table.to_dict("records")), outputs[2])


def plot_reliability(table: pd.DataFrame, bins: pd.DataFrame, subset: str, path, not_fitted: str = "",
                     choice: calibrate.TemperatureChoice | None = None) -> None:
    """Two panels (before, after): accuracy per confidence bin against the diagonal, each bin's mean
    confidence a red diamond joined to its bar (the gap), images per bin written above each bar.
    A bar's shade grows with its images (a bin of 2 images is pale, one of 200 full blue), and under
    each panel a histogram of the images per bin (log scale) shows how much each bar weighs."""
    plt = plots.pyplot()
    fig, grid = plt.subplots(2, 2, figsize=(11, 6.6), sharex=True, gridspec_kw=dict(height_ratios=(3.2, 1)))
    axes, counts_axes = grid[0], grid[1]
    axes[1].sharey(axes[0])
    most = max(int(bins[bins.subset == subset].images.max()), 1)
    for ax, count_ax, when in zip(axes, counts_axes, ("before", "after")):
        part = bins[(bins.subset == subset) & (bins.when == when)]
        row = table[(table.subset == subset) & (table.when == when)].iloc[0]
        used = part[part.images > 0]
        width = 1.0 / calibrate.BINS
        shades = [(0.12, 0.47, 0.71, 0.15 + 0.85 * np.sqrt(n / most)) for n in used.images]
        ax.bar(used.bin_low, used.accuracy, width=width, align="edge", color=shades, edgecolor="black",
               lw=0.5, label="accuracy in bin (paler: fewer images)")
        count_ax.bar(used.bin_low, used.images, width=width, align="edge", color="grey", edgecolor="black", lw=0.5)
        count_ax.set_yscale("log")
        count_ax.set_ylim(0.7, most * 3)
        count_ax.set_ylabel("images\n(log)", fontsize=8)
        count_ax.set_xlabel("confidence (top softmax score)")
        count_ax.grid(alpha=0.3, axis="y")
        centres = used.bin_low + width / 2
        ax.vlines(centres, used.accuracy, used.confidence, color="tab:red", lw=1.5)
        ax.plot(centres, used.confidence, "D", color="tab:red", ms=4, label="mean confidence in bin (red line: gap)")
        for b in used.itertuples():
            ax.text(b.bin_low + width / 2, min(max(b.accuracy, b.confidence) + 0.02, 1.04), str(b.images),
                    ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.1)
        name = "before temperature scaling (T = 1)" if when == "before" else f"after temperature scaling (T = {row.temperature:.3f})"
        if when == "after" and not_fitted:
            name = "after: T not fitted, kept at 1\n(every validation image right: the NLL has no minimum)"
        elif when == "after" and choice is not None and not choice.applied:
            name = f"fitted T = {row.temperature:.3f}, NOT applied:\nit makes the test ECE worse (T = 1 kept)"
        ax.set_title(f"{name}\nECE {row.ece:.4f}, NLL {row.nll:.4f}, Brier {row.brier:.4f}", fontsize=10)
    axes[0].set_ylabel("accuracy")
    # the key under both panels: inside one, bars of any height and the counts above them have no free corner
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle(f"Reliability diagram, {subset} images ({int(table[table.subset == subset].images.iloc[0])}), "
                 f"{calibrate.BINS} equal-width bins; numbers = images per bin; T fitted on the validation set", fontsize=11)
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    plots.save_figure(fig, path)


def plot_thresholds(routed: pd.DataFrame, target: float, val_images: int, path) -> None:
    """Per class: its threshold, and on the test images the share of its predictions routed as
    confident (coverage) and their precision; all on one 0-1 axis, the target precision marked."""
    plt = plots.pyplot()
    classes = routed[routed.class_name != "all"]
    y = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(8, 2.6 + 0.42 * len(classes)))
    threshold = classes.threshold.replace(np.inf, np.nan)
    ax.barh(y - 0.2, classes.test_coverage.fillna(0), height=0.4, color="tab:blue", label="test coverage (confident)")
    ax.barh(y + 0.2, classes.test_precision.fillna(0), height=0.4, color="tab:green", label="test precision (confident)")
    ax.scatter(threshold, y, marker="|", s=300, color="black", zorder=3, label="threshold (calibrated score)")
    for i, (t, note) in enumerate(zip(classes.threshold, classes.note)):
        if not np.isfinite(t):
            ax.text(0.01, i, "no threshold: all to review", va="center", fontsize=8, color="tab:red")
    ax.axvline(target, color="grey", linestyle="--", linewidth=1, label=f"target precision {target:g}")
    ax.set_yticks(y, list(classes.class_name))
    ax.set_xlim(0, 1.02)
    ax.invert_yaxis()
    ax.set_xlabel("share / score (0 to 1)")
    overall = routed.iloc[-1]
    ax.set_title(f"Per-class thresholds (chosen on {val_images} validation images)\non the test set: "
                 f"{overall.test_coverage:.1%} routed as confident, precision {overall.test_precision:.3f}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.6 / (1 + 0.42 * len(classes))),
              ncol=2, frameon=False)  # below the axis: never over a bar
    fig.tight_layout()
    plots.save_figure(fig, path)


MULTICLASS_OUTPUTS = ("calibration.csv", "calibration_bins.csv", "calibration.json", "reliability_diagram.png",
                      "class_thresholds.csv", "class_thresholds.png")
MULTILABEL_OUTPUTS = ("calibration_labels.csv", "calibration_label_bins.csv", "calibration.json",
                      "reliability_diagram_labels.png", "label_thresholds.csv")


# ---- multi-label: per label, one-vs-rest ---------------------------------------------------------

def label_calibration_tables(subsets: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str], temperature: float):
    """(one row per subset, before/after and label (and a mean row), the reliability bins of each
    label) for {subset: (logits, multi-hot targets)}."""
    rows, bins = [], []
    for subset, (logits, targets) in subsets.items():
        for when, t in (("before", 1.0), ("after", temperature)):
            rows += [dict(subset=subset, when=when, **row)
                     for row in calibrate.label_calibration_rows(logits, targets, names, t)]
            probs = calibrate.sigmoid_probabilities(logits, t)
            bins += [calibrate.label_reliability_bins(probs[:, i], targets[:, i]).assign(subset=subset, when=when,
                                                                                         label=name)
                     for i, name in enumerate(names)]
    bins = pd.concat(bins, ignore_index=True)
    front = ["subset", "when", "label"]
    return pd.DataFrame(rows), bins[front + [c for c in bins.columns if c not in front]]


def plot_label_reliability(table: pd.DataFrame, bins: pd.DataFrame, names: list[str], subset: str, path,
                           not_fitted: str = "") -> None:
    """One panel per label: the share of the images in each score bin that carry the label, before
    temperature scaling (bars, images per bin above them) and after (orange line), against the diagonal."""
    plt = plots.pyplot()
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.9 * rows + 0.6), squeeze=False)
    width = 1.0 / calibrate.BINS
    temperature = float(table.temperature[table.when == "after"].iloc[0])
    for ax, name in zip(axes.flat, names):
        part = bins[(bins.subset == subset) & (bins.label == name)]
        before, after = (part[(part.when == w) & (part.images > 0)] for w in ("before", "after"))
        ax.bar(before.bin_low, before.fraction_positive, width=width, align="edge", color="tab:blue",
               edgecolor="black", lw=0.5, label="before (T = 1)")
        for b in before.itertuples():
            ax.text(b.bin_low + width / 2, min(b.fraction_positive + 0.02, 1.04), str(b.images), ha="center",
                    va="bottom", fontsize=6)
        if not not_fitted:
            ax.plot(after.confidence, after.fraction_positive, "o-", color="tab:orange", ms=3, lw=1.2,
                    label=f"after (T = {temperature:.3f}), at mean score")
        ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
        ece = table[(table.subset == subset) & (table.label == name)].set_index("when").ece
        row = table[(table.subset == subset) & (table.label == name) & (table.when == "before")].iloc[0]
        ax.set_title(f"label {name}: {row.positives} of {row.images} images carry it\n"
                     f"ECE {ece['before']:.3f} before, {ece['after']:.3f} after", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel(f"sigmoid score for {name}", fontsize=8)
        ax.set_ylabel("share carrying it", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_axis_off()
    fitted = not_fitted or f"T fitted on the validation images (T = {temperature:.3f})"
    fig.suptitle(f"Reliability per label, {subset} images, {calibrate.BINS} equal-width score bins "
                 f"(numbers: images per bin before)\n{fitted}", fontsize=10)
    # below the bottom-left panel's x label: never over a curve
    fig.tight_layout()  # before the legend, which would shrink the first column; the saved canvas grows for it
    axes[-1, 0].legend(*axes[0, 0].get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(0, -0.2), ncol=3,
                       fontsize=8, frameon=False)
    plots.save_figure(fig, path)


def run_multilabel(cfg, paths, trained, test, val_logits: np.ndarray, val_targets: np.ndarray) -> list:
    """The multi-label calibration: tables, diagram and label thresholds; returns the files written."""
    names = trained.class_names
    temperature, not_fitted = calibrate.validation_label_temperature(val_logits, val_targets)
    if not_fitted:
        print(f"warning: temperature {not_fitted}", file=sys.stderr)
    else:
        print(f"temperature fitted on {len(val_targets)} validation images (BCE, every label): T = {temperature:.4f}")
    table, bins = label_calibration_tables({"val": (val_logits, val_targets), "test": (test.logits, test.labels)},
                                           names, temperature)
    for row in table[table.label == "mean"].itertuples():
        print(f"  {row.subset:>4} {row.when:>6}, mean over labels: ECE {row.ece:.4f}  NLL {row.nll:.4f}  "
              f"Brier {row.brier:.4f}  AP {row.ap:.4f}")
    outputs = [paths.out / name for name in MULTILABEL_OUTPUTS]
    save_tables(outputs, table, bins, temperature, not_fitted, task="multilabel", checkpoint_sha256=trained.sha256)
    plot_label_reliability(table, bins, names, "test", outputs[3], not_fitted)
    thresholds = routing.label_thresholds(calibrate.sigmoid_probabilities(val_logits, temperature), val_targets,
                                          names, cfg.ROUTE_PRECISION)
    routed = routing.label_routing_table(calibrate.sigmoid_probabilities(test.logits, temperature), test.labels,
                                         thresholds)
    fileio.save_csv(routed, outputs[4], index=False)
    overall = routed.iloc[-1]
    print(f"per-label thresholds for precision {cfg.ROUTE_PRECISION:g} (validation): on the test images precision "
          f"{overall.test_precision:.4f}, recall {overall.test_recall:.4f} over every image and label")
    return outputs


def run(cfg) -> None:
    registry.require_task("calibration", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    test = saved_predictions.open_predictions(paths)
    inputs = provenance.start_stage(paths, "calibration", [paths.best, paths.split, paths.scores])
    cache = trained.trunk_cache(cfg, paths, runtime)
    val_logits, _, val_labels = openset.subset_outputs(trained, cache, runtime, "val")
    if test.task == "multilabel":
        outputs = run_multilabel(cfg, paths, trained, test, val_logits, val_labels)
        provenance.save_provenance(paths, "calibration", inputs, outputs, cfg)
        print(f"-> {outputs[0]}, {outputs[3]}")
        return
    choice = calibrate.choose_temperature(val_logits, val_labels, test.logits, test.labels)
    temperature, not_fitted = choice.temperature, "" if choice.fitted is not None else choice.note
    table, bins = calibration_tables({"val": (val_logits, val_labels), "test": (test.logits, test.labels)},
                                     choice.fitted or 1.0)
    if not_fitted or not choice.applied:
        print(f"warning: temperature {choice.note}", file=sys.stderr)
    else:
        print(f"temperature {choice.note}")
    for row in table.itertuples():
        print(f"  {row.subset:>4} {row.when:>6}: accuracy {row.accuracy:.4f}  ECE {row.ece:.4f}  NLL {row.nll:.4f}  "
              f"Brier {row.brier:.4f}")
    outputs = [paths.out / name for name in MULTICLASS_OUTPUTS]
    save_tables(outputs, table, bins, temperature, not_fitted, temperature_choice=choice.record(),
                checkpoint_sha256=trained.sha256)
    plot_reliability(table, bins, "test", outputs[3], not_fitted, choice)
    thresholds = routing.class_thresholds(calibrate.probabilities(val_logits, temperature), val_labels,
                                          trained.class_names, cfg.ROUTE_PRECISION)
    routed = routing.routing_table(calibrate.probabilities(test.logits, temperature), test.labels, thresholds)
    fileio.save_csv(routed, outputs[4], index=False)
    plot_thresholds(routed, cfg.ROUTE_PRECISION, len(val_labels), outputs[5])
    overall = routed.iloc[-1]
    print(f"per-class thresholds for precision {cfg.ROUTE_PRECISION:g} (validation): on the test images "
          f"{overall.test_coverage:.1%} routed as confident, precision {overall.test_precision:.4f}")
    provenance.save_provenance(paths, "calibration", inputs, outputs, cfg)
    print(f"-> {outputs[0]}, {outputs[3]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
