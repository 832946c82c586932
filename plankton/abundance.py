"""Abundance per sample: how many images of each seen class a sample of new images holds, corrected
for the classifier's mistakes (quantification). The estimators are one table, ESTIMATORS:

    cc    classify and count: the share of the sample's images predicted as each class (raw)
    acc   adjusted classify and count (Forman 2008): the shares p solving q = M p on the simplex,
          q the cc shares, M[i, j] = P(predicted i | true j) counted on held-out images
    pacc  probabilistic ACC (Bella et al. 2010): the same with q the mean probability vector of the
          sample and M[i, j] the mean probability of class i over held-out images of class j
    em    EM prior adjustment (Saerens, Latinne & Decaestecker 2002; "SLD"): each image's
          probabilities are reweighted by (new share / held-out share) and renormalised, the new
          shares being their mean, until the shares stop moving. EM needs probabilities calibrated
          class by class, so they are first recalibrated as softmax(a log p + b), a and the class
          biases b fitted on the held-out images ("bias-corrected temperature scaling", Alexandari,
          Kundaje & Shrikumar 2020): on the digits plain EM was worse than counting (docs/abundance.md)

Each maps (probabilities of a sample's images, Rates of the held-out images) to class shares that
sum to 1. They follow QuaPy's ACC, PACC and EMQ (least squares on the simplex; EMQ_BCTS for em),
written here in numpy because QuaPy works through a classifier object of its own and its SLSQP
solver is slow for bootstraps; on the same inputs they agree with QuaPy 0.2.3 (docs/abundance.md).

Intervals: a percentile bootstrap that redraws the sample's images and, within each class, the
held-out images (so the interval also carries the uncertainty of M; em's recalibration is fitted
once, on all held-out images). predict.py writes, per
sample (SAMPLE_BY), predictions/abundance.csv, abundance_ecotaxa.tsv and abundance.png
(save_abundance); tools/abundance_simulation.py measures the estimators on resampled test images.
"""
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import pandas as pd
from scipy.optimize import minimize, nnls
from scipy.special import log_softmax

from plankton import calibrate, ecotaxa, fileio, plots
from plankton.errors import PipelineError

INTERVAL = 0.95  # the bootstrap's percentile interval
EM_TOLERANCE = 1e-6  # EM stops when no share moves by more than this
EM_MAX_ITERATIONS = 1000
HEADLINE = "pacc"  # the estimator abundance_ecotaxa.tsv's `count` column gives (docs/abundance.md says why)
OUTPUTS = ("abundance.csv", "abundance_ecotaxa.tsv", "abundance.png")  # in predictions/
FIGURE_SAMPLES = 12  # abundance.png shows at most this many samples (those with the most images)


# ---- the estimators ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    """What the corrections learn from held-out images of known class."""
    crisp: np.ndarray  # [i, j] = share of held-out images of class j predicted as i (columns sum to 1)
    soft: np.ndarray  # [i, j] = mean probability of class i over held-out images of class j
    prior: np.ndarray  # the held-out images' class shares: what the recalibrated probabilities are for
    recalibration: np.ndarray  # (a, b_1 ... b_k) of softmax(a log p + b), fitted on the held-out images


def log_probabilities(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(probs, dtype=np.float64), 1e-300))


def recalibrated(probs: np.ndarray, recalibration: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(recalibration[0] * log_probabilities(probs) + recalibration[1:], axis=1))


def fit_recalibration(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(a, b) minimising the held-out NLL of softmax(a log p + b): bias-corrected temperature scaling
    (L-BFGS with its gradient; a in [0.01, 100], each b in [-30, 30], b of a class without images 0)."""
    log_p, k = log_probabilities(probs), probs.shape[1]
    one_hot = np.eye(k)[labels]

    def nll(theta):
        log_q = log_softmax(theta[0] * log_p + theta[1:], axis=1)
        gap = np.exp(log_q) - one_hot  # d NLL / d logits, per image
        return -(log_q * one_hot).sum() / len(labels), np.r_[(gap * log_p).sum(), gap.sum(0)] / len(labels)
    present = np.bincount(labels, minlength=k) > 0
    bounds = [(0.01, 100.0)] + [(-30.0, 30.0) if here else (0.0, 0.0) for here in present]
    found = minimize(nll, np.r_[1.0, np.zeros(k)], jac=True, method="L-BFGS-B", bounds=bounds)
    return found.x


def held_out_rates(probs: np.ndarray, labels: np.ndarray, recalibration: np.ndarray | None = None) -> Rates:
    """Rates from held-out probabilities (images x classes) and their true classes (the recalibration
    fitted on them unless given). A class without held-out images gets the identity column: it is
    assumed always recognised (as QuaPy does)."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k).astype(float)
    crisp = np.bincount(probs.argmax(1) * k + labels, minlength=k * k).reshape(k, k).astype(float)
    order = np.argsort(labels, kind="stable")  # per-class sums of the probability rows, in one pass
    running = np.vstack([np.zeros((1, k)), np.cumsum(np.asarray(probs, dtype=np.float64)[order], axis=0)])
    edges = np.searchsorted(labels[order], np.arange(k + 1))
    soft = (running[edges[1:]] - running[edges[:-1]]).T  # [i, j] = sum of p_i over the class-j images
    missing = counts == 0
    crisp[:, missing] = soft[:, missing] = np.eye(k)[:, missing]
    divide = np.where(missing, 1.0, counts)
    if recalibration is None:
        recalibration = fit_recalibration(probs, labels)
    return Rates(crisp / divide, soft / divide, counts / counts.sum(), recalibration)


def simplex_least_squares(matrix: np.ndarray, target: np.ndarray, weight: float = 1e3) -> np.ndarray:
    """argmin ||matrix p - target|| over p >= 0 with sum p = 1: non-negative least squares with the
    sum as one more, heavily weighted, equation; renormalised."""
    k = matrix.shape[1]
    shares, _ = nnls(np.vstack([matrix, weight * np.ones((1, k))]), np.r_[target, weight], maxiter=50 * k)
    total = shares.sum()
    return shares / total if total > 0 else np.full(k, 1.0 / k)


def classify_and_count(probs: np.ndarray, rates: Rates) -> np.ndarray:
    return np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)


def adjusted_count(probs: np.ndarray, rates: Rates) -> np.ndarray:
    return simplex_least_squares(rates.crisp, classify_and_count(probs, rates))


def probabilistic_adjusted_count(probs: np.ndarray, rates: Rates) -> np.ndarray:
    return simplex_least_squares(rates.soft, probs.mean(0))


def em_prior_adjustment(probs: np.ndarray, rates: Rates, recalibrate: bool = True) -> np.ndarray:
    """EM (SLD) from the held-out class shares, on the probabilities recalibrated as the held-out
    images ask (recalibrate=False: on the probabilities as given, plain SLD)."""
    prior = np.maximum(rates.prior, 1e-12)  # a class without held-out images would divide by 0
    prior = prior / prior.sum()
    shares = prior
    probs = recalibrated(probs, rates.recalibration) if recalibrate else np.asarray(probs, dtype=np.float64)
    for _ in range(EM_MAX_ITERATIONS):
        # E and M steps at once: image i's reweighted probability of class j is p_ij w_j / sum_l p_il w_l
        # (w = shares / prior), and the new shares are their means: two matrix-vector products
        weights = shares / prior
        moved, shares = shares, weights * (probs.T @ (1.0 / np.maximum(probs @ weights, 1e-300))) / len(probs)
        if np.abs(shares - moved).max() < EM_TOLERANCE:
            break
    return shares / shares.sum()


@dataclass(frozen=True)
class Estimator:
    label: str  # what the figure and the docs call it
    estimate: Callable[[np.ndarray, Rates], np.ndarray]


ESTIMATORS: dict[str, Estimator] = {
    "cc": Estimator("classify and count (raw)", classify_and_count),
    "acc": Estimator("adjusted count (ACC)", adjusted_count),
    "pacc": Estimator("probabilistic adjusted (PACC)", probabilistic_adjusted_count),
    "em": Estimator("EM prior adjustment (SLD, recalibrated)", em_prior_adjustment),
}


# ---- the bootstrap -------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeldOut:
    """Held-out images of known class, as the classifier scores new images: the probabilities (at the
    applied temperature) of those kept as known by the open-set threshold, and their classes."""
    probs: np.ndarray
    labels: np.ndarray

    def rates(self) -> Rates:
        return held_out_rates(self.probs, self.labels)


def rate_draws(held: HeldOut, draws: int, rng: np.random.Generator) -> list[Rates]:
    """Rates of `draws` bootstrap copies of the held-out images, each class redrawn within itself;
    the recalibration is the one fitted on them all (refitting it per draw would cost the most)."""
    by_class = [np.flatnonzero(held.labels == c) for c in range(held.probs.shape[1])]
    recalibration = fit_recalibration(held.probs, held.labels) if draws else None
    out = []
    for _ in range(draws):
        pick = np.concatenate([rng.choice(rows, len(rows)) for rows in by_class if len(rows)])
        out.append(held_out_rates(held.probs[pick], held.labels[pick], recalibration))
    return out


def estimate_with_interval(probs: np.ndarray, rates: Rates, draws: list[Rates], rng: np.random.Generator,
                           estimators: dict[str, Estimator] = ESTIMATORS) -> dict[str, np.ndarray]:
    """{estimator: classes x 3 (share, low, high)}; low and high NaN without draws or images."""
    k = probs.shape[1]
    if not len(probs):
        return {name: np.full((k, 3), np.nan) for name in estimators}
    found = {name: np.full((k, 3), np.nan) for name in estimators}
    boot = {name: np.empty((len(draws), k)) for name in estimators}
    for b, drawn in enumerate(draws):
        pick = rng.integers(0, len(probs), len(probs))
        for name, estimator in estimators.items():
            boot[name][b] = estimator.estimate(probs[pick], drawn)
    tail = 100 * (1 - INTERVAL) / 2
    for name, estimator in estimators.items():
        found[name][:, 0] = estimator.estimate(probs, rates)
        if draws:
            found[name][:, 1:] = np.percentile(boot[name], [tail, 100 - tail], axis=0).T
    return found


# ---- samples -------------------------------------------------------------------------------------

def folder_sample(path: str, root: Path) -> str:
    """An image's folder relative to PREDICT_DIR ("/" as "_"), PREDICT_DIR's own name at its top: the
    sample_id ecotaxa.import_table gives an image no EcoTaxa TSV lists."""
    folder = PurePosixPath(path).parent.as_posix().replace("/", "_")
    return Path(root).name if folder == "." else folder


def samples_of(sample_by: str, root: Path, paths: list[str]) -> list[str | None]:
    """Each image's sample (None: in no sample) by SAMPLE_BY: "folder", "sample_id" (the EcoTaxa
    TSVs in PREDICT_DIR; images they do not list get their folder) or a CSV with columns image (path
    relative to PREDICT_DIR) and sample (images it does not list are in no sample)."""
    if sample_by == "folder":
        return [folder_sample(p, root) for p in paths]
    if sample_by == "sample_id":
        listed = ecotaxa.source_objects(root)
        if not any(p in listed for p in paths):
            raise PipelineError(f"SAMPLE_BY='sample_id': no EcoTaxa TSV in {root} lists these images; put the "
                                f"export's .tsv beside them, or use SAMPLE_BY='folder' or a CSV (image,sample)")
        unlisted = sum(p not in listed for p in paths)
        if unlisted:
            print(f"note: SAMPLE_BY='sample_id': {unlisted} image(s) in no EcoTaxa TSV; their folder is their sample",
                  file=sys.stderr)
        return [listed[p][1] if p in listed else folder_sample(p, root) for p in paths]
    return samples_from_csv(Path(sample_by), paths)


def samples_from_csv(csv: Path, paths: list[str]) -> list[str | None]:
    if not csv.is_file():
        raise PipelineError(f"SAMPLE_BY={str(csv)!r}: not 'folder', 'sample_id' or a CSV file (columns image, sample)")
    try:
        table = fileio.read_csv(csv, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"SAMPLE_BY={str(csv)!r}: cannot be read as a CSV ({str(err).strip().splitlines()[0]})")
    if not {"image", "sample"} <= set(table.columns):
        raise PipelineError(f"SAMPLE_BY={str(csv)!r}: needs columns 'image' (path relative to PREDICT_DIR) and "
                            f"'sample'; it has {', '.join(map(repr, table.columns[:8]))}")
    table = table[table["sample"].str.strip() != ""]
    mapping = dict(zip(table["image"].str.strip(), table["sample"].str.strip()))
    found = [mapping.get(p) for p in paths]
    if not any(s is not None for s in found):
        raise PipelineError(f"SAMPLE_BY={str(csv)!r}: none of the {len(paths)} images is listed in its 'image' column "
                            f"(paths relative to PREDICT_DIR, e.g. {paths[0]!r})")
    if None in found:
        print(f"warning: SAMPLE_BY={str(csv)!r} lists no sample for {found.count(None)} image(s); they are left out "
              f"of the abundance tables", file=sys.stderr)
    return found


# ---- the tables and the figure -------------------------------------------------------------------

def abundance_table(probs: np.ndarray, known: np.ndarray, samples: list[str | None], class_names: list[str],
                    held: HeldOut | None, bootstraps: int, seed: int) -> pd.DataFrame:
    """One row per sample, estimator and class: images kept as known, flagged_unknown, count,
    proportion (of the known images), its interval low-high, and count_low-count_high. Without
    held-out images (a model bundle carries none) only cc, raw counting, can be given."""
    rng = np.random.default_rng(seed)
    if held is None:
        estimators, rates, draws = {"cc": ESTIMATORS["cc"]}, None, [None] * bootstraps
    else:
        estimators, draws = ESTIMATORS, rate_draws(held, bootstraps, rng)
        rates = held_out_rates(held.probs, held.labels, draws[0].recalibration if draws else None)
    samples = np.array([s if s is not None else "" for s in samples], dtype=object)
    rows = []
    for sample in sorted(set(samples) - {""}):
        inside = samples == sample
        mine = probs[inside & known]
        found = estimate_with_interval(mine, rates, draws, rng, estimators)
        for name, values in found.items():
            rows += [dict(sample=sample, taxon=taxon, estimator=name, images=len(mine),
                          flagged_unknown=int((inside & ~known).sum()), count=share * len(mine), proportion=share,
                          low=low, high=high, count_low=low * len(mine), count_high=high * len(mine))
                     for taxon, (share, low, high) in zip(class_names, values)]
    return pd.DataFrame(rows)


def ecotaxa_table(table: pd.DataFrame) -> pd.DataFrame:
    """One row per sample and taxon, keyed as EcoTaxa names them (sample_id, object_annotation_category):
    the HEADLINE estimator's count and interval, then every estimator's count."""
    wide = table.pivot_table(index=["sample", "taxon"], columns="estimator", values="count", sort=False,
                             dropna=False)
    headline = HEADLINE if HEADLINE in set(table.estimator) else "cc"
    head = table[table.estimator == headline].set_index(["sample", "taxon"])
    out = pd.DataFrame(dict(count=head["count"], count_low=head.count_low, count_high=head.count_high,
                            proportion=head.proportion, estimator=headline))
    for name in ESTIMATORS:
        out[f"count_{name}"] = wide[name] if name in wide else np.nan
    out["images_known"] = head.images
    out["flagged_unknown"] = head.flagged_unknown
    out = out.reset_index().rename(columns=dict(sample="sample_id", taxon="object_annotation_category"))
    return out.round(3)


def plot_abundance(table: pd.DataFrame, class_names: list[str], path, temperature: float) -> None:
    """One panel per sample (the FIGURE_SAMPLES with the most images): each class's share by each
    estimator, a dot with its bootstrap interval, the estimators side by side in each class's row;
    one share axis for all panels, up to the largest upper end."""
    plt = plots.pyplot()
    sizes = table.groupby("sample", sort=False).images.first().sort_values(ascending=False, kind="stable")
    shown = list(sizes.index[:FIGURE_SAMPLES])
    columns = min(len(shown), 4)
    rows_of_panels = -(-len(shown) // columns)
    k = len(class_names)
    fig, axes = plt.subplots(rows_of_panels, columns, squeeze=False, sharey=True, layout="constrained",
                             figsize=(3.2 * columns + 1.8, (0.19 * k + 1.0) * rows_of_panels + 1.3))
    colours = {"cc": "grey", "acc": "tab:orange", "pacc": "tab:blue", "em": "tab:green"}
    offsets = np.linspace(-0.3, 0.3, len(ESTIMATORS))
    y = np.arange(k)
    right = float(np.nanmax(table[["proportion", "high"]].to_numpy(dtype=float), initial=0.05))
    for ax, sample in zip(axes.flat, shown):
        part = table[table["sample"] == sample]
        for offset, (name, estimator) in zip(offsets, ESTIMATORS.items()):
            if name not in set(part.estimator):
                continue
            rows = part[part.estimator == name].set_index("taxon").reindex(class_names)
            spread = np.clip([rows.proportion - rows.low, rows.high - rows.proportion], 0, None)  # NaN: none
            ax.errorbar(rows.proportion, y + offset, xerr=np.nan_to_num(spread), fmt="o", ms=2.5, lw=0.9,
                        color=colours.get(name), label=estimator.label)
        first = part.iloc[0]
        ax.set_title(f"{sample}\n{first.images} known images, {first.flagged_unknown} flagged unknown", fontsize=8.5)
        ax.set_xlim(-0.01, min(1.0, 1.08 * right) + 0.01)
        ax.set_ylim(k - 0.5, -0.5)  # the first class at the top
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(shown):]:
        ax.set_axis_off()
    for ax in axes[:, 0]:
        ax.set_yticks(y, class_names, fontsize=7 if k <= 30 else 5.5)
    for ax in axes[-1]:
        ax.set_xlabel("share of the sample's known images", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    more = (f"; the {len(shown)} largest of {len(sizes)} samples (all in abundance.csv)"
            if len(sizes) > len(shown) else "")
    fig.suptitle(f"Composition of each sample: class shares by estimator with {INTERVAL:.0%} bootstrap intervals"
                 f"{more}\n(images flagged unknown left out; probabilities at temperature {temperature:.3g})",
                 fontsize=10)
    fig.legend(handles, labels, loc="outside lower center", ncol=len(ESTIMATORS), fontsize=8.5, frameon=False)
    plots.save_figure(fig, path)


def save_abundance(cfg, root: Path, predictions: pd.DataFrame, probs: np.ndarray, class_names: list[str],
                   held: HeldOut | None, temperature: float, folder: Path) -> list[Path]:
    """predict.py's abundance outputs in `folder` (OUTPUTS), from its table (path, unknown) and the
    probabilities of its images; returns the paths written."""
    samples = samples_of(cfg.SAMPLE_BY, root, list(predictions.path))
    table = abundance_table(probs, ~predictions.unknown.to_numpy(), samples, class_names, held,
                            cfg.ABUNDANCE_BOOTSTRAPS, cfg.SEED or 0)
    paths = [Path(folder) / name for name in OUTPUTS]
    fileio.save_csv(table, paths[0], index=False)
    fileio.save_csv(ecotaxa_table(table), paths[1], index=False, sep="\t")
    plot_abundance(table, class_names, paths[2], temperature)
    counts = table.groupby("sample").images.first()
    learnt = (f"corrections learnt from {len(held.labels)} held-out images" if held is not None else
              "no held-out images (a model bundle carries none): raw counts only")
    print(f"abundance: {len(counts)} sample(s) by SAMPLE_BY={cfg.SAMPLE_BY!r} ({counts.sum()} known images), "
          f"{cfg.ABUNDANCE_BOOTSTRAPS} bootstraps; {learnt}")
    return paths


def held_out_images(logits: np.ndarray, labels: np.ndarray, kept: np.ndarray, temperature: float) -> HeldOut:
    """HeldOut from the held-out images' logits and classes; only those kept as known count."""
    return HeldOut(calibrate.probabilities(logits[kept], temperature), np.asarray(labels)[kept])
