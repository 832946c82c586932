"""Does a new campaign look like the images the model was tested on? predict.py's drift check.

The reference is the test split of the seen classes: held out from training, and, unlike the
validation images, not used to set the unknown threshold or the temperature. At most DRIFT_SAMPLES
new images and as many test images (a seeded random sample of each) are compared in three ways:

- their embeddings, by a two-sample test of TWO_SAMPLE_TESTS (one table: a second test is one entry);
  the default is a classifier two-sample test, which also scores each new image (higher = less like
  the reference: the most atypical images of the figure);
- simple image statistics (STATISTICS: size, brightness, contrast, sharpness), each by a
  Kolmogorov-Smirnov test; the images are decoded once more for this, only those sampled;
- the share of images beyond the unknown threshold, new vs test, by Fisher's exact test (one-sided:
  more unknowns is what a warning is for).

Each test's p-value is compared with DRIFT_ALPHA / the number of tests (Bonferroni), so a campaign
drawn from the reference's distribution is flagged with probability at most DRIFT_ALPHA. The verdict
is one line: "no drift detected" or "DRIFT: " and what differs. A difference in the embeddings can
also be a different mix of classes (another season's taxa), not only other-looking images: the
verdict says which way to look, not why."""
import math
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import fisher_exact, ks_2samp, mannwhitneyu
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import dataloader
from plankton import images, openset, orientations, plots, training

MIN_IMAGES = 10  # fewer new (or reference) images than this: nothing is tested
FIGURE = "drift.png"  # in the predictions folder
ATYPICAL = 8  # new images shown in the figure, most atypical first
REFERENCE_NAME = "held-out test images"


# ---- two-sample tests on the embeddings ----------------------------------------------------------

@dataclass
class TwoSample:
    """A two-sample test's outcome: its statistic, p-value and a score per image (higher = less like
    the reference), for the new images and the reference images."""
    statistic: float
    p_value: float
    new_scores: np.ndarray
    reference_scores: np.ndarray


@dataclass(frozen=True)
class TwoSampleTest:
    label: str  # what the figure and the JSON call it
    statistic: str  # the statistic's name (AUROC, MMD, ...)
    run: Callable[[np.ndarray, np.ndarray, int], TwoSample]  # (reference rows, new rows, seed)


CLASSIFIER_C = 0.01  # inverse L2 strength of the logistic regression on standardised embeddings


def classifier_two_sample(reference: np.ndarray, new: np.ndarray, seed: int) -> TwoSample:
    """A classifier two-sample test (Lopez-Paz & Oquab, 2017): logistic regression (balanced class
    weights) tells new from reference rows, cross-fitted in 2 stratified folds. Each fold's held-out
    scores come from one model fitted on the other fold, so their Mann-Whitney test (new scored
    higher) is exact; p is twice the smaller of the two (Bonferroni). The statistic is the AUROC of
    all held-out scores (0.5: indistinguishable, 1: apart)."""
    x = np.r_[reference, new].astype(np.float64)
    y = np.r_[np.zeros(len(reference)), np.ones(len(new))]
    scores, p_values = np.empty(len(y)), []
    for train, held_out in StratifiedKFold(2, shuffle=True, random_state=seed).split(x, y):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=CLASSIFIER_C, class_weight="balanced",
                                                                   max_iter=1000))
        scores[held_out] = model.fit(x[train], y[train]).decision_function(x[held_out])
        is_new = y[held_out] == 1
        p_values.append(mannwhitneyu(scores[held_out][is_new], scores[held_out][~is_new],
                                     alternative="greater").pvalue)
    auroc = mannwhitneyu(scores[y == 1], scores[y == 0]).statistic / (len(new) * len(reference))
    return TwoSample(float(auroc), float(min(1.0, 2 * min(p_values))), scores[y == 1], scores[y == 0])


# name -> test; DEFAULT_TEST is the one predict.py runs
TWO_SAMPLE_TESTS = {
    "classifier": TwoSampleTest("classifier two-sample test (logistic regression, 2-fold cross-fitted)", "AUROC",
                                classifier_two_sample),
}
DEFAULT_TEST = "classifier"


# ---- image statistics ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageStatistic:
    label: str  # with its unit, for the figure
    measure: Callable[[Image.Image, np.ndarray], float]  # (decoded image, grey levels as the model sees it)


def sharpness(grey: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels (grey levels): a blur lowers it."""
    return float((np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2)


# Each: one number per image. Size is the decoded image's; the others are measured on the image
# resized as the model gets it (IMAGE_SIZE, RESIZE_MODE), in grey levels 0-255.
STATISTICS = {
    "size": ImageStatistic("size (pixels, √(width × height))",
                           lambda image, grey: math.sqrt(image.width * image.height)),
    "brightness": ImageStatistic("brightness (mean grey level)", lambda image, grey: float(grey.mean())),
    "contrast": ImageStatistic("contrast (s.d. of grey levels)", lambda image, grey: float(grey.std())),
    "sharpness": ImageStatistic("sharpness (mean |neighbour diff.|)", lambda image, grey: sharpness(grey)),
}


def image_statistics(root: Path, relpaths: list[str], image_size: int, resize_mode: str) -> pd.DataFrame:
    """One row per image, one column per STATISTICS entry; NaN for an image that no longer decodes."""
    rows = []
    for rel in relpaths:
        try:
            image = images.load_rgb(Path(root) / rel)
        except Exception:  # changed or gone since it was scanned: left out of the tests
            rows.append({name: np.nan for name in STATISTICS})
            continue
        grey = np.asarray(images.resize(image, image_size, resize_mode).convert("L"), dtype=np.float64)
        rows.append({name: statistic.measure(image, grey) for name, statistic in STATISTICS.items()})
    return pd.DataFrame(rows, columns=list(STATISTICS), dtype=np.float64)


# ---- the check -----------------------------------------------------------------------------------

@dataclass
class Side:
    """One side of the comparison: the sampled images' embeddings, statistics, unknown flags, paths and
    open-set scores, in one order."""
    embeddings: np.ndarray
    statistics: pd.DataFrame
    unknown: np.ndarray  # bool, open-set score above the threshold
    relpaths: list[str]
    open_scores: np.ndarray


def compare(reference: Side, new: Side, alpha: float, test: str = DEFAULT_TEST, seed: int = 0) -> dict:
    """Every test, its p-value against alpha / number of tests, and the verdict line."""
    if min(len(new.embeddings), len(reference.embeddings)) < MIN_IMAGES:
        return dict(verdict=f"not tested: {len(new.embeddings)} new and {len(reference.embeddings)} "
                            f"{REFERENCE_NAME} (at least {MIN_IMAGES} of each needed)", drift=False, tests={})
    chosen = TWO_SAMPLE_TESTS[test]
    two_sample = chosen.run(reference.embeddings, new.embeddings, seed)
    tests = {"embeddings": dict(test=test, label=chosen.label, statistic=chosen.statistic, value=two_sample.statistic,
                                p_value=two_sample.p_value)}
    tests.update({name: statistic_test(new.statistics[name], reference.statistics[name]) for name in STATISTICS})
    tests["unknown_share"] = unknown_share_test(new.unknown, reference.unknown)
    level = alpha / len(tests)
    for entry in tests.values():
        entry["drift"] = bool(entry["p_value"] < level)
    drifted = [name for name, entry in tests.items() if entry["drift"]]
    return dict(verdict=verdict(tests, len(new.embeddings), len(reference.embeddings), alpha, level),
                drift=bool(drifted), drifted=drifted, alpha=alpha, per_test_alpha=level, tests=tests, scores=two_sample)


def statistic_test(new: pd.Series, reference: pd.Series) -> dict:
    """Kolmogorov-Smirnov (two-sided) on one image statistic, images that no longer decode left out."""
    a, b = new.dropna(), reference.dropna()
    if not (len(a) and len(b)):
        return dict(test="Kolmogorov-Smirnov", statistic="D", value=None, p_value=1.0, median_new=None,
                    median_reference=None)
    result = ks_2samp(a, b)
    return dict(test="Kolmogorov-Smirnov", statistic="D", value=float(result.statistic), p_value=float(result.pvalue),
                median_new=float(a.median()), median_reference=float(b.median()))


def unknown_share_test(new: np.ndarray, reference: np.ndarray) -> dict:
    """Fisher's exact test that the share flagged unknown is higher among the new images."""
    k_new, k_ref = int(new.sum()), int(reference.sum())
    result = fisher_exact([[k_new, len(new) - k_new], [k_ref, len(reference) - k_ref]], alternative="greater")
    return dict(test="Fisher exact (new share greater)", share_new=k_new / len(new),
                share_reference=k_ref / len(reference), p_value=float(result.pvalue))


def p_text(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-300 else "p < 1e-300"


def describe(name: str, entry: dict) -> str:
    if name == "embeddings":
        return f"embeddings ({entry['statistic']} {entry['value']:.2f}, {p_text(entry['p_value'])})"
    if name == "unknown_share":
        return (f"unknown share ({entry['share_new']:.0%} vs {entry['share_reference']:.0%}, "
                f"{p_text(entry['p_value'])})")
    return (f"{name} (median {entry['median_new']:.3g} vs {entry['median_reference']:.3g}, "
            f"{p_text(entry['p_value'])})")


def verdict(tests: dict, n_new: int, n_reference: int, alpha: float, level: float) -> str:
    drifted = [describe(name, entry) for name, entry in tests.items() if entry["drift"]]
    if drifted:
        return (f"DRIFT: {', '.join(drifted)} differ between {n_new} new images and {n_reference} {REFERENCE_NAME} "
                f"(p < {level:.2g} each)")
    return (f"no drift detected ({n_new} new vs {n_reference} {REFERENCE_NAME}; "
            f"{describe('embeddings', tests['embeddings'])}, unknown share "
            f"{tests['unknown_share']['share_new']:.0%} vs {tests['unknown_share']['share_reference']:.0%}; "
            f"no test at p < {level:.2g}, DRIFT_ALPHA = {alpha:g} over {len(tests)} tests)")


# ---- predict.py's call ---------------------------------------------------------------------------

def sample(n: int, limit: int, seed: int) -> np.ndarray:
    """All of 0..n-1, or a seeded random `limit` of them, in order."""
    return np.arange(n) if n <= limit else np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def reference_side(cfg, trained, cache, runtime, fitted: dict) -> Side:
    """The sampled test images of the seen classes: embeddings (through the trunk cache), open-set
    scores against predict's reference and threshold, image statistics."""
    relpaths, _ = trained.split.subset("test")
    picked = sample(len(relpaths), cfg.DRIFT_SAMPLES, cfg.SEED)
    logits, embeddings = orientations.averaged(  # as the new images' outputs: over TTA's orientations
        lambda o: training.head_outputs(trained.model, dataloader.select_rows(trained.source("test", cache, o), picked),
                                        runtime), trained.orientations)
    scores = openset.SCORES[cfg.PREDICT_SCORE](logits, embeddings, fitted["reference"])
    chosen = [relpaths[i] for i in picked]
    statistics = image_statistics(trained.split.root, chosen, trained.preprocess.image_size,
                                  trained.preprocess.resize_mode)
    return Side(embeddings, statistics, scores > fitted["threshold"], chosen, scores)


def check_campaign(cfg, trained, cache, runtime, root: Path, relpaths: list[str], embeddings: np.ndarray,
                   open_scores: np.ndarray, fitted: dict, figure: Path) -> dict:
    """The drift check of predict.py's new images (DRIFT_ALPHA None: none): prints the verdict, draws
    `figure` (removed when there is nothing to draw) and returns what predictions.json keeps."""
    if cfg.DRIFT_ALPHA is None:
        figure.unlink(missing_ok=True)
        return dict(verdict="not checked (DRIFT_ALPHA = None)", drift=False)
    if trained.split is None:  # a model bundle (PREDICT_BUNDLE) carries no held-out images to compare with
        figure.unlink(missing_ok=True)
        verdict = "not checked: the model bundle holds no held-out test images to compare with"
        print(f"drift check: {verdict}")
        return dict(verdict=verdict, drift=False)
    picked = sample(len(relpaths), cfg.DRIFT_SAMPLES, cfg.SEED)
    chosen = [relpaths[i] for i in picked]
    scores = np.asarray(open_scores)[picked]
    new = Side(np.asarray(embeddings)[picked], image_statistics(root, chosen, trained.preprocess.image_size,
                                                                trained.preprocess.resize_mode),
               scores > fitted["threshold"], chosen, scores)
    reference = reference_side(cfg, trained, cache, runtime, fitted)
    result = compare(reference, new, cfg.DRIFT_ALPHA, DEFAULT_TEST, cfg.SEED)
    if result["tests"]:
        plot_drift(root, trained.split.root, reference, new, result, fitted["threshold"], cfg.PREDICT_SCORE, figure)
    else:
        figure.unlink(missing_ok=True)
    if result["drift"]:
        print(f"warning: {result['verdict']}; see {figure}", file=sys.stderr)
    else:
        print(f"drift check: {result['verdict']}")
    return summary(result, new, reference, fitted["threshold"])


def summary(result: dict, new: Side, reference: Side, threshold: float) -> dict:
    """predictions.json's "drift": the verdict, every test's numbers and the most atypical images."""
    kept = {k: v for k, v in result.items() if k != "scores"}
    kept.update(reference="test split of the seen classes", new_images=len(new.embeddings),
                reference_images=len(reference.embeddings), unknown_threshold=threshold)
    if "scores" in result:
        order = np.argsort(-result["scores"].new_scores, kind="stable")[:ATYPICAL]
        kept["most_atypical"] = [dict(path=images.printable(new.relpaths[i]),
                                      score=float(result["scores"].new_scores[i])) for i in order]
    return kept


# ---- the figure ----------------------------------------------------------------------------------

def plot_drift(root: Path, reference_root: Path, reference: Side, new: Side, result: dict, threshold: float,
               score_name: str, path: Path) -> None:
    """Top: the most atypical new images and random held-out test images; below: each statistic's
    distribution, the two-sample scores and the open-set scores, new vs held-out."""
    plt = plots.pyplot()
    fig = plt.figure(figsize=(13, 8.6))
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.75])
    scores = result["scores"]
    atypical = np.argsort(-scores.new_scores, kind="stable")[:ATYPICAL]
    shown = np.random.default_rng(0).permutation(len(reference.relpaths))[:ATYPICAL]
    axes = top.subplots(2, ATYPICAL, squeeze=False)
    for row, (folder, names, picked, values, title) in enumerate([
            (root, new.relpaths, atypical, scores.new_scores, "most atypical\nnew images"),
            (reference_root, reference.relpaths, shown, scores.reference_scores, f"random\n{REFERENCE_NAME}")]):
        for c, ax in enumerate(axes[row]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(picked):
                ax.axis("off")
                continue
            pixels = images.thumbnail(Path(folder) / names[picked[c]])
            ax.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 64 else "antialiased")
            ax.set_xlabel(f"score {values[picked[c]]:.2f}", fontsize=7.5, labelpad=1)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red" if row == 0 else "tab:blue")
        axes[row][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
    top.suptitle(f"score: the {result['tests']['embeddings']['label']}'s held-out score (higher = less like the "
                 f"{REFERENCE_NAME})", fontsize=9)
    panels = bottom.subplots(2, 3)
    tests = result["tests"]
    for ax, name in zip(panels.flat, STATISTICS):
        entry = tests[name]
        _histograms(ax, new.statistics[name].dropna(), reference.statistics[name].dropna(), 30)
        ax.set_xlabel(STATISTICS[name].label, fontsize=8.5)
        statistic = f"D = {entry['value']:.2f}, " if entry["value"] is not None else ""
        ax.set_title(f"{name}: {statistic}{p_text(entry['p_value'])}", fontsize=9,
                     color="tab:red" if entry["drift"] else "black")
    ax = panels.flat[len(STATISTICS)]
    _histograms(ax, scores.new_scores, scores.reference_scores, 30)
    entry = tests["embeddings"]
    ax.set_xlabel("two-sample score of the embeddings", fontsize=8.5)
    ax.set_title(f"embeddings: {entry['statistic']} {entry['value']:.2f}, {p_text(entry['p_value'])}", fontsize=9,
                 color="tab:red" if entry["drift"] else "black")
    ax = panels.flat[len(STATISTICS) + 1]
    _histograms(ax, new.open_scores, reference.open_scores, 30)
    line = ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="unknown threshold")
    ax.legend(handles=[line], fontsize=7.5)
    entry = tests["unknown_share"]
    ax.set_xlabel(f"open-set score ({score_name})", fontsize=8.5)
    ax.set_title(f"unknown share {entry['share_new']:.0%} vs {entry['share_reference']:.0%}, "
                 f"{p_text(entry['p_value'])}", fontsize=9, color="tab:red" if entry["drift"] else "black")
    bottom.legend(*panels.flat[0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8.5,
                  bbox_to_anchor=(0.5, 1.0))
    for ax in panels.flat[len(STATISTICS) + 2:]:
        ax.axis("off")
    bottom.subplots_adjust(top=0.88, hspace=0.55, wspace=0.25)
    fig.suptitle("\n".join(textwrap.wrap(result["verdict"], 140)), fontsize=10, y=1.0, va="bottom",
                 color="tab:red" if result["drift"] else "black")
    plots.save_figure(fig, path)


def _histograms(ax, new: np.ndarray, reference: np.ndarray, bins) -> None:
    """Both distributions as density outlines, on shared bins."""
    edges = np.histogram_bin_edges(np.r_[np.asarray(new, float), np.asarray(reference, float)], bins=bins)
    ax.hist(reference, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color="tab:blue",
            label=f"{REFERENCE_NAME} ({len(reference)})")
    ax.hist(new, bins=edges, density=True, histtype="step", linewidth=1.6, color="tab:red",
            label=f"new images ({len(new)})")
    ax.tick_params(labelsize=7.5)
    ax.set_yticks([])
