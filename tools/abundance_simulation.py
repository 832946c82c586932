"""Do the abundance corrections beat counting? A simulation on a finished run's held-out test images.

    python tools/abundance_simulation.py --OUTPUT_DIR=outputs --CHECKPOINT_DIR=checkpoints
    python tools/abundance_simulation.py --repeats=10 --mixes=30 --size=500 --draws=100 --figure=sim.png

Reads:  OUTPUT_DIR/test_scores.npz (evaluate.py's test logits and true classes, refused unless made by
        the current CHECKPOINT_DIR/best.pth); any --KEY=VALUE setting, as for the scripts.
Writes: nothing but the figure given by --figure (default: none); prints the table.

Each repeat splits every class's test images at random into two halves. The first half stands for
predict.py's held-out images: it gives the confusion rates and the temperature (fitted on it, as
calibrate.validation_temperature fits on the validation images). The second half is resampled into
--mixes samples of --size images each, whose class mix is drawn from a Dirichlet distribution, a
third each of three kinds:
    near  Dirichlet(100 x training shares): close to the mix the classifier was trained on
    flat  Dirichlet(1, ..., 1): any mix, uniformly
    far   Dirichlet(0.2, ..., 0.2): a few classes dominate, the rest nearly absent
Every estimator of plankton/abundance.ESTIMATORS, and EM on probabilities not recalibrated
(em_plain, for comparison), estimates each sample's class shares; the error is
the mean absolute difference from the sample's true shares (its drawn images' classes), averaged over
the classes. The table gives its mean over the mixes of each kind (and its standard error), and the
share of the true values inside the 95 % bootstrap interval (--draws bootstrap draws; 0 = none).
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plankton import abundance, calibrate, locations, plots, runner, saved_predictions  # noqa: E402
from plankton.errors import PipelineError  # noqa: E402

KINDS = {"near": lambda prior, k: 100 * prior, "flat": lambda prior, k: np.ones(k),
         "far": lambda prior, k: np.full(k, 0.2)}  # the Dirichlet parameters of each kind of mix
OWN_FLAGS = {"--repeats": 10, "--mixes": 30, "--size": 500, "--draws": 100, "--figure": ""}
# measured beside the pipeline's estimators: EM on the temperature-scaled probabilities, not recalibrated
ESTIMATORS = dict(abundance.ESTIMATORS, em_plain=abundance.Estimator(
    "EM, not recalibrated", lambda probs, rates: abundance.em_prior_adjustment(probs, rates, recalibrate=False)))


def split_halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(held-out half, pool half) of the test indices, each class split in two at random."""
    held, pool = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        held.append(rows[:len(rows) // 2])
        pool.append(rows[len(rows) // 2:])
    return np.concatenate(held), np.concatenate(pool)


def simulate(logits: np.ndarray, labels: np.ndarray, repeats: int, mixes: int, size: int, draws: int,
             seed: int = 0) -> list[dict]:
    """One row per simulated sample: its kind, its distance from the training mix, and per estimator
    the mean absolute error of its shares and the share of classes whose interval holds the truth."""
    rng = np.random.default_rng(seed)
    k = logits.shape[1]
    prior = np.bincount(labels, minlength=k) / len(labels)  # the split is stratified: the training shares
    rows = []
    for _ in range(repeats):
        held_rows, pool_rows = split_halves(labels, rng)
        temperature, _ = calibrate.validation_temperature(logits[held_rows], labels[held_rows])
        held = abundance.HeldOut(calibrate.probabilities(logits[held_rows], temperature), labels[held_rows])
        rates, rate_draws = held.rates(), abundance.rate_draws(held, draws, rng)
        probs, pool_labels = calibrate.probabilities(logits[pool_rows], temperature), labels[pool_rows]
        by_class = [np.flatnonzero(pool_labels == c) for c in range(k)]
        for m in range(mixes):
            kind = list(KINDS)[m % len(KINDS)]
            mix = rng.dirichlet(KINDS[kind](prior, k))
            counts = rng.multinomial(size, mix)
            pick = np.concatenate([rng.choice(by_class[c], n) for c, n in enumerate(counts) if n])
            truth = counts / size
            found = abundance.estimate_with_interval(probs[pick], rates, rate_draws, rng, ESTIMATORS)
            row = dict(kind=kind, distance=0.5 * np.abs(truth - prior).sum(), temperature=temperature)
            for name, values in found.items():
                row[f"{name}_mae"] = float(np.abs(values[:, 0] - truth).mean())
                row[f"{name}_covered"] = float(((values[:, 1] <= truth + 1e-9) & (truth <= values[:, 2] + 1e-9)).mean())
            rows.append(row)
    return rows


def summary_table(rows: list[dict], draws: int) -> str:
    """A Markdown table: mean absolute error (standard error) per mix kind and estimator, and coverage."""
    names = list(ESTIMATORS)
    lines = ["| mixes | samples | mean distance from the training mix | " + " | ".join(
             f"{name} MAE" for name in names) + " |", "|---" * (3 + len(names)) + "|"]
    for kind in list(KINDS) + ["all"]:
        part = [r for r in rows if kind in ("all", r["kind"])]
        cells = []
        for name in names:
            errors = np.array([r[f"{name}_mae"] for r in part])
            cells.append(f"{errors.mean():.4f} ({errors.std(ddof=1) / np.sqrt(len(errors)):.4f})")
        distance = np.mean([r["distance"] for r in part])
        lines.append(f"| {kind} | {len(part)} | {distance:.2f} | " + " | ".join(cells) + " |")
    if draws:
        covered = " | ".join(f"{np.mean([r[f'{n}_covered'] for r in rows]):.1%}" for n in names)
        lines.append(f"| 95 % interval holds the true share | {len(rows)} | | {covered} |")
    return "\n".join(lines)


def plot_simulation(rows: list[dict], title: str, path) -> None:
    """Left: mean absolute error per mix kind and estimator (bars, standard errors); right: each
    sample's error against its distance from the training mix, per estimator."""
    plt = plots.pyplot()
    names = list(ESTIMATORS)
    colours = {"cc": "grey", "acc": "tab:orange", "pacc": "tab:blue", "em": "tab:green", "em_plain": "tab:olive"}
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.6))
    x = np.arange(len(KINDS) + 1)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means, errors = [], []
        for kind in list(KINDS) + ["all"]:
            values = np.array([r[f"{name}_mae"] for r in rows if kind in ("all", r["kind"])])
            means.append(values.mean())
            errors.append(values.std(ddof=1) / np.sqrt(len(values)))
        axes[0].bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=errors, capsize=2,
                    color=colours.get(name), label=ESTIMATORS[name].label)
        axes[1].scatter([r["distance"] for r in rows], [r[f"{name}_mae"] for r in rows], s=8, alpha=0.6,
                        color=colours.get(name), label=ESTIMATORS[name].label)
    axes[0].set_xticks(x, [f"{k}\n({sum(r['kind'] == k for r in rows)} samples)" for k in KINDS]
                       + [f"all\n({len(rows)})"])
    axes[0].set_ylabel("mean absolute error of the class shares")
    axes[0].set_title("Error by kind of mix (bars: mean, whiskers: standard error)", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("distance of the sample's mix from the training mix (total variation, 0 to 1)")
    axes[1].set_ylabel("mean absolute error of the class shares")
    axes[1].set_title("Each simulated sample", fontsize=10)
    axes[1].legend(fontsize=8, markerscale=2)
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    plots.save_figure(fig, path)


def own_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """This tool's --repeats/--mixes/--size/--draws/--figure values, and the arguments left for the settings."""
    values, rest = dict(OWN_FLAGS), []
    for arg in argv:
        name, _, value = arg.partition("=")
        if name not in OWN_FLAGS:
            rest.append(arg)
            continue
        try:
            values[name] = value if name == "--figure" else int(value)
        except ValueError:
            raise PipelineError(f"{arg}: {name} takes a whole number") from None
        if name != "--figure" and values[name] < (0 if name == "--draws" else 1):
            raise PipelineError(f"{arg}: {name} must be at least {0 if name == '--draws' else 1}")
    return values, rest


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, rest = own_flags(argv)
    except PipelineError as err:
        sys.exit(f"error: {err}")

    def simulation(cfg) -> None:
        predictions = saved_predictions.open_predictions(locations.Paths.from_settings(cfg))
        if predictions.task != "multiclass":
            raise PipelineError("the abundance simulation needs a single-label run (TASK='multiclass')")
        started = time.perf_counter()
        rows = simulate(predictions.logits, predictions.labels, flags["--repeats"], flags["--mixes"],
                        flags["--size"], flags["--draws"], cfg.SEED or 0)
        accuracy = float((predictions.logits.argmax(1) == predictions.labels).mean())
        print(f"{len(predictions.labels)} test images of {len(predictions.class_names)} classes (accuracy "
              f"{accuracy:.2%}) in {cfg.OUTPUT_DIR}; {flags['--repeats']} random halvings x {flags['--mixes']} mixes "
              f"of {flags['--size']} images; {flags['--draws']} bootstrap draws; {time.perf_counter() - started:.0f} s")
        print(summary_table(rows, flags["--draws"]))
        if flags["--figure"]:
            plot_simulation(rows, f"Abundance estimators on resampled test images: {len(predictions.labels)} images, "
                                  f"{len(predictions.class_names)} classes, test accuracy {accuracy:.2%} "
                                  f"({cfg.OUTPUT_DIR})", flags["--figure"])
            print(f"-> {flags['--figure']}")

    runner.run_script(simulation, rest, lock_folders=False)


if __name__ == "__main__":
    main()
