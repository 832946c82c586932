"""Calibration: do the softmax scores mean what they say? Expected calibration error (15 equal-width
confidence bins), negative log-likelihood and the multi-class Brier score on the validation and test
images, before and after temperature scaling (Guo et al. 2017): one temperature T, fitted on the
validation set by minimising its NLL, divides every logit.

    python calibration.py

Reads:  checkpoints/best.pth, outputs/split.csv, outputs/test_scores.npz (evaluate.py's test logits),
        the validation images (through the trunk cache).
Writes: outputs/calibration.csv (subset val/test x before/after: temperature, images, accuracy, ECE,
        NLL, Brier), outputs/calibration_bins.csv (the reliability diagram's bins: subset, when, bin
        edges, images, accuracy, mean confidence), outputs/calibration.json (the temperature and the
        table), outputs/reliability_diagram.png (test images, before and after), and last
        outputs/provenance_calibration.json.

ECE = sum over bins of (images in bin / images) x |accuracy - mean confidence|, a bin (lo, hi] of
the top softmax score; Brier = mean over images of sum over classes of (p - one-hot)^2 (0 to 2).
Temperature scaling never changes a prediction, only how confident it is. When every validation
image is predicted right the NLL has no minimum (it falls as T -> 0): T stays 1 and the stage says so.
"""
import sys

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

import artifacts
import common
import dataloader
import open_set
import tasks

BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram
LOG_T_BOUNDS = (-5.0, 5.0)  # the fitted temperature lies in [e^-5, e^5] = [0.0067, 148]

TASKS = ("multiclass",)  # single-label only: calibration of the softmax's top class (run_all.py skips it)


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


def calibration_tables(subsets: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float):
    """(one row per subset and before/after, the reliability bins of each) for {subset: (logits, labels)}."""
    rows, bins = [], []
    for subset, (logits, labels) in subsets.items():
        for when, t in (("before", 1.0), ("after", temperature)):
            rows.append(dict(subset=subset, when=when, **calibration_row(logits, labels, t)))
            bins.append(reliability_bins(probabilities(logits, t), labels).assign(subset=subset, when=when))
    bins = pd.concat(bins, ignore_index=True)
    return pd.DataFrame(rows), bins[["subset", "when"] + [c for c in bins.columns if c not in ("subset", "when")]]


def plot_reliability(table: pd.DataFrame, bins: pd.DataFrame, subset: str, path, not_fitted: str = "") -> None:
    """Two panels (before, after): accuracy per confidence bin against the diagonal, each bin's mean
    confidence a red diamond joined to its bar (the gap), images per bin written above each bar."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    for ax, when in zip(axes, ("before", "after")):
        part = bins[(bins.subset == subset) & (bins.when == when)]
        row = table[(table.subset == subset) & (table.when == when)].iloc[0]
        used = part[part.images > 0]
        width = 1.0 / BINS
        ax.bar(used.bin_low, used.accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
               lw=0.5, label="accuracy in bin")
        centres = used.bin_low + width / 2
        ax.vlines(centres, used.accuracy, used.confidence, color="tab:red", lw=1.5)
        ax.plot(centres, used.confidence, "D", color="tab:red", ms=4, label="mean confidence in bin (red line: gap)")
        for b in used.itertuples():
            ax.text(b.bin_low + width / 2, min(max(b.accuracy, b.confidence) + 0.02, 1.04), str(b.images),
                    ha="center", va="bottom", fontsize=7)
        ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.1)
        ax.set_xlabel("confidence (top softmax score)")
        name = "before temperature scaling (T = 1)" if when == "before" else f"after temperature scaling (T = {row.temperature:.3f})"
        if when == "after" and not_fitted:
            name = "after: T not fitted, kept at 1\n(every validation image right: the NLL has no minimum)"
        ax.set_title(f"{name}\nECE {row.ece:.4f}, NLL {row.nll:.4f}, Brier {row.brier:.4f}", fontsize=10)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Reliability diagram, {subset} images ({int(table[table.subset == subset].images.iloc[0])}), "
                 f"{BINS} equal-width bins; numbers = images per bin; T fitted on the validation set", fontsize=11)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(cfg) -> None:
    tasks.require(cfg.TASK, TASKS, "calibration.py")
    paths = artifacts.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = artifacts.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    test = artifacts.open_predictions(paths)
    inputs = artifacts.start_stage(paths, "calibration", [paths.best, paths.split, paths.scores])
    cache = trained.trunk_cache(cfg, paths, runtime)
    val_logits, _, val_labels = open_set.subset_outputs(trained, cache, runtime, "val")
    temperature, not_fitted = validation_temperature(val_logits, val_labels)
    table, bins = calibration_tables({"val": (val_logits, val_labels), "test": (test.logits, test.labels)},
                                     temperature)
    if not_fitted:
        print(f"warning: temperature {not_fitted}", file=sys.stderr)
    else:
        print(f"temperature fitted on {len(val_labels)} validation images: T = {temperature:.4f}")
    for row in table.itertuples():
        print(f"  {row.subset:>4} {row.when:>6}: accuracy {row.accuracy:.4f}  ECE {row.ece:.4f}  NLL {row.nll:.4f}  "
              f"Brier {row.brier:.4f}")
    outputs = [paths.out / name for name in artifacts.STAGE_OUTPUTS["calibration"]]
    common.save_csv(table, outputs[0], index=False)
    common.save_csv(bins, outputs[1], index=False)
    common.save_json(dict(temperature=temperature, fitted_on="val", not_fitted=not_fitted, bins=BINS,
                          checkpoint_sha256=trained.sha256, table=table.to_dict("records")), outputs[2])
    plot_reliability(table, bins, "test", outputs[3], not_fitted)
    artifacts.save_provenance(paths, "calibration", inputs, outputs)
    print(f"-> {outputs[0]}, {outputs[3]}")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
