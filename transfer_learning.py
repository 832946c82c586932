"""How well can the unseen classes be learned from the embeddings? The unseen classes' embeddings
are split into a training part and a fixed test part (stratified); for growing training-set sizes
each probe (SVC, logistic regression, kNN, cosine-weighted kNN, nearest class mean) is fitted and
scored by balanced accuracy. Then the few-shot curves: training sets of exactly k images per class.

    python transfer_learning.py

Reads:  outputs/embeddings_unseen.pkl (checked against checkpoints/best.pth).
Writes: outputs/transfer_learning.csv (every fit), outputs/accuracy_<probe>.png for each probe of
        probes.PROBES (the study's SVC, Linear and kNN plots among them), outputs/accuracy_all.png,
        outputs/fewshot.csv (every few-shot fit: probe, shots, draw, balanced accuracy, accuracy per class),
        outputs/fewshot_summary.csv (per probe and shots: mean, sd, 95% t-interval over the draws),
        outputs/fewshot_all.png (every probe, accuracy against k with its interval band),
        outputs/fewshot_per_class.png (per-class accuracy at the largest k),
        and last outputs/provenance_transfer_learning.json.

Study curves: each training subset is stratified and drawn TRANSFER_REPEATS times per size with
different seeds; the plots show the mean and the spread (min to max) over those draws. SVC (RBF
kernel) and the linear classifier (logistic regression) see standardised embeddings; kNN measures
plain Euclidean distances in the embedding space, as the distance analysis does, with k = KNN_K or,
for the smallest training sets, the size of the smallest class (recorded in the CSV's k column).
The cosine-weighted kNN is DINO's evaluation of features: the KNN_K training images of highest
cosine similarity (all of them when fewer) vote for their class with weight exp(cos / T),
T = FEWSHOT_TEMPERATURE; the class with the largest sum wins. Nearest class mean predicts the class
whose mean training embedding is closest (Euclidean).

Few-shot: on the same fixed test part, training sets of exactly k images per class (k = 1, 2, 5,
10, 20, 50, ... while the smallest class's training part has k images and k x classes stays within
TRANSFER_MAX_TRAIN), FEWSHOT_DRAWS random draws for each k. The mean over draws comes with a 95%
Student-t confidence interval: mean +- t(0.975, draws - 1) x sd / sqrt(draws), sd the sample
standard deviation over draws. It says how well the mean is known for this test part; it does not
cover the choice of test part. The draws and the interval are plankton/probes.py's (fewshot_runs, t_interval),
shared with compare_heads.py.

Multi-label runs (TASK="multilabel"): each unseen label one-vs-rest, over the held-out images (every
one carries an unseen label, so "rest" is the images carrying the other unseen labels): the same
probes, curves and few-shot draws on the two groups "carries the label" / "does not" (k images of
each), balanced accuracy of the two (chance 0.5). A label needs 2 images on each side. Writes
outputs/transfer_learning_labels.csv and fewshot_labels.csv (the tables above with a label column;
fewshot's acc_with / acc_without: recall of each side), fewshot_labels_summary.csv,
outputs/transfer_learning_labels.png and fewshot_labels.png (one panel per label, every probe).
"""
import numpy as np
import pandas as pd

from plankton import embedding_files, fileio, labelsets, locations, plots, probes, provenance, registry, runner
from plankton.errors import PipelineError


def plot_curves(results: pd.DataFrame, methods, chance: float, title: str, path) -> None:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(10.2, 5.0))
    n_classes = round(1 / chance)
    for method in methods:
        probe = probes.PROBES[method]
        stats = results[results.method == method].groupby("n_train").balanced_accuracy.agg(["mean", "min", "max"])
        name = probe.label
        line, = ax.plot(stats.index, stats["mean"], f"{probe.marker}-", color=probe.colour, label=f"{name} (mean)")
        ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15, color=line.get_color(),
                        label=f"{name} (min–max of draws)" if len(methods) == 1 else None)
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
    sizes = sorted(results.n_train.unique())
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s}\n({s / n_classes:.3g})" for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training samples in all (per class in brackets; log scale)")
    ax.set_ylabel("balanced accuracy on the test part")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: never on the chance line
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_fewshot(summary: pd.DataFrame, chance: float, title: str, path) -> None:
    """Every probe's mean balanced accuracy against k images per class, its 95% interval as a band."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(10.8, 5.2))
    for method, probe in probes.PROBES.items():
        part = summary[summary.method == method].sort_values("shots")
        line, = ax.plot(part.shots, part["mean"], f"{probe.marker}-", color=probe.colour, label=probe.label)
        ax.fill_between(part.shots, part.ci95_low, part.ci95_high, alpha=0.15, color=line.get_color())
    ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance ({chance:.2f})")
    shots = sorted(summary.shots.unique())
    ax.set_xscale("log")
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.minorticks_off()
    ax.set_xlabel("training images per class, k (log scale)")
    ax.set_ylabel("balanced accuracy on the test part")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="probe (band: 95% t-interval)",
              title_fontsize=8)  # beside the axes: never on the chance line or a curve
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_per_class(runs: pd.DataFrame, class_names: list[str], title: str, path) -> None:
    """Each class's accuracy at the largest k: one bar per probe, the mean over draws with its 95%
    t-interval as an error bar."""
    plt = plots.pyplot()
    largest = runs[runs.shots == runs.shots.max()]
    width = 0.8 / len(probes.PROBES)
    fig, ax = plt.subplots(figsize=(max(9.0, 1.3 * len(class_names) + 5), 4.8))
    for i, method in enumerate(probes.PROBES):
        part = largest[largest.method == method]
        cells = [probes.t_interval(part[f"acc_{name}"]) for name in class_names]
        means = np.array([c[0] for c in cells])
        errors = np.array([[c[0] - c[1] for c in cells], [c[2] - c[0] for c in cells]])
        ax.bar(np.arange(len(class_names)) + (i - (len(probes.PROBES) - 1) / 2) * width, means, width,
               yerr=np.nan_to_num(errors), capsize=2, color=probes.PROBES[method].colour, label=probes.PROBES[method].label)
    slant = max(map(len, class_names)) > 6
    ax.set_xticks(range(len(class_names)), class_names, rotation=30 if slant else 0, ha="right" if slant else "center")
    ax.set_xlabel("unseen class")
    ax.set_ylabel("accuracy on the class's test images")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes: never on a bar
    fig.tight_layout()
    plots.save_figure(fig, path)


def run_fewshot(cfg, x: np.ndarray, labels: np.ndarray, class_names: list[str], out) -> list:
    """The few-shot runs, their table and summary, and their two figures; returns the files written."""
    runs = probes.fewshot_runs(x, labels, cfg.TRANSFER_TEST_FRACTION, cfg.FEWSHOT_DRAWS, probes.ProbeSettings.from_settings(cfg),
                        cfg.SEED, max_train=cfg.TRANSFER_MAX_TRAIN)
    if runs.empty:
        print("note: few-shot curves skipped: no class has a training part")
        return []
    runs = runs.rename(columns={f"acc_{i}": f"acc_{name}" for i, name in enumerate(class_names)})
    summary = probes.fewshot_summary(runs)
    outputs = [out / "fewshot.csv", out / "fewshot_summary.csv", out / "fewshot_all.png", out / "fewshot_per_class.png"]
    fileio.save_csv(runs, outputs[0], index=False)
    fileio.save_csv(summary, outputs[1], index=False)
    table = summary.assign(cell=[f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in
                                 zip(summary["mean"], summary.ci95_low, summary.ci95_high)])
    print(f"Few-shot balanced accuracy, mean [95% t-interval] over {cfg.FEWSHOT_DRAWS} draws of exactly k images "
          f"per class:")
    print(table.pivot(index="shots", columns="method", values="cell")[list(probes.PROBES)].to_string())
    present = [class_names[c] for c in np.unique(labels)]
    where = (f"{len(present)} unseen classes, {int(runs.n_test.iloc[0])} test images, {cfg.FEWSHOT_DRAWS} draws per k; "
             f"cosine kNN: {cfg.KNN_K} neighbours, T = {cfg.FEWSHOT_TEMPERATURE}")
    plot_fewshot(summary, 1.0 / len(present), f"Few-shot transfer, every probe: mean and 95% t-interval\n{where}",
                 outputs[2])
    plot_per_class(runs, present, f"Per-class accuracy with k = {int(runs.shots.max())} training images per class "
                                   f"(mean and 95% t-interval over {cfg.FEWSHOT_DRAWS} draws)", outputs[3])
    return outputs


# ---- multi-label: each unseen label one-vs-rest --------------------------------------------------

def label_panels(tables: dict[str, pd.DataFrame], x: str, title: str, xlabel: str, path, band=("min", "max")) -> None:
    """One panel per label: every probe's mean balanced accuracy (column "mean") against `x`, with a
    band between the columns `band`; chance (0.5) dashed."""
    plt = plots.pyplot()
    columns = min(3, len(tables))
    rows = -(-len(tables) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows + 0.8), squeeze=False)
    for ax, (name, table) in zip(axes.flat, tables.items()):
        for method, probe in probes.PROBES.items():
            part = table[table.method == method].sort_values(x)
            line, = ax.plot(part[x], part["mean"], f"{probe.marker}-", color=probe.colour, ms=4, label=probe.label)
            ax.fill_between(part[x], part[band[0]], part[band[1]], alpha=0.12, color=line.get_color())
        ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance (0.5)")
        ticks = sorted(table[x].unique())
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"label {name}", fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("balanced accuracy", fontsize=8)
    spare = list(axes.flat)[len(tables):]
    for ax in spare:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()  # before the legend: the saved canvas grows to hold it
    handles = axes[0, 0].get_legend_handles_labels()
    if spare:  # in the first empty panel
        spare[0].legend(*handles, loc="center", fontsize=8, frameon=False, title="probe (band: spread of the draws)")
    else:  # below the bottom-left panel's x label
        axes[-1, 0].legend(*handles, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=3, fontsize=8, frameon=False)
    plots.save_figure(fig, path)


def run_multilabel(cfg, paths, frame: pd.DataFrame) -> tuple[dict, list]:
    """Curves and few-shot runs per unseen label, one-vs-rest: (inputs, files written)."""
    names = list(embedding_files.info(frame).class_names)
    carried = labelsets.multi_hot(frame["labels"], names)
    sides = np.stack([carried.sum(0), len(frame) - carried.sum(0)], 1)
    usable = [i for i, name in enumerate(names) if sides[i].min() >= 2]
    if len(usable) < len(names):
        print(f"note: labels {[names[i] for i in range(len(names)) if i not in usable]} have fewer than 2 held-out "
              f"images with or without them: left out")
    if not usable:
        raise PipelineError("transfer learning needs an unseen label with 2 or more held-out images carrying it and "
                            "2 or more without it")
    inputs = provenance.start_stage(paths, "transfer_learning", [paths.best, paths.embeddings("unseen")])
    x, settings = embedding_files.embedding_matrix(frame), probes.ProbeSettings.from_settings(cfg)
    curves, shots = [], []
    for i in usable:
        y = carried[:, i]
        curves.append(probes.transfer_curves(x, y, cfg.TRANSFER_TEST_FRACTION, cfg.TRANSFER_REPEATS, settings, cfg.SEED,
                                             max_train=cfg.TRANSFER_MAX_TRAIN).assign(label=names[i]))
        shots.append(probes.fewshot_runs(x, y, cfg.TRANSFER_TEST_FRACTION, cfg.FEWSHOT_DRAWS, settings, cfg.SEED,
                                         max_train=cfg.TRANSFER_MAX_TRAIN).assign(label=names[i])
                     .rename(columns={"acc_0": "acc_without", "acc_1": "acc_with"}))
    curves, shots = pd.concat(curves, ignore_index=True), pd.concat(shots, ignore_index=True)
    summary = pd.concat([probes.fewshot_summary(part).assign(label=name) for name, part in shots.groupby("label", sort=False)],
                        ignore_index=True)
    outputs = [paths.out / name for name in ("transfer_learning_labels.csv", "fewshot_labels.csv",
                                             "fewshot_labels_summary.csv", "transfer_learning_labels.png",
                                             "fewshot_labels.png")]
    for table, path in zip((curves, shots, summary), outputs):
        fileio.save_csv(table[["label"] + [c for c in table.columns if c != "label"]], path, index=False)
    print(f"Balanced accuracy per unseen label, one-vs-rest, on {len(frame)} held-out images, mean over draws at the "
          f"largest training set:")
    largest = curves[curves.n_train == curves.groupby("label").n_train.transform("max")]
    print(largest.groupby(["label", "method"]).balanced_accuracy.mean().unstack()[list(probes.PROBES)].round(4)
          .to_string())
    stats = {name: part.groupby(["method", "n_train"]).balanced_accuracy.agg(["mean", "min", "max"]).reset_index()
             for name, part in curves.groupby("label", sort=False)}
    label_panels(stats, "n_train", f"Each unseen label one-vs-rest on the embeddings of {len(frame)} held-out images: "
                 f"mean and min-max over {cfg.TRANSFER_REPEATS} draws", "training images in all (log scale)", outputs[3])
    if summary.empty:
        return inputs, outputs[:4]
    label_panels({name: part for name, part in summary.groupby("label", sort=False)}, "shots",
                 f"Few-shot, each unseen label one-vs-rest: k images with and k without it; mean and 95% t-interval over "
                 f"{cfg.FEWSHOT_DRAWS} draws", "k (log scale)", outputs[4], band=("ci95_low", "ci95_high"))
    return inputs, outputs


def run(cfg) -> None:
    registry.require_task("transfer_learning", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    frame = embedding_files.open_embeddings(paths, "unseen")
    if embedding_files.info(frame).task == "multilabel":
        inputs, outputs = run_multilabel(cfg, paths, frame)
        provenance.save_provenance(paths, "transfer_learning", inputs, outputs, cfg)
        print(f"-> {outputs[0]}, {outputs[3]}")
        return
    names = list(embedding_files.info(frame).class_names)
    counts = frame.class_name.value_counts()
    too_few = [c for c in names if counts.get(c, 0) < 2]
    if too_few:
        print(f"note: classes {too_few} have fewer than 2 images and cannot be both trained and tested: left out")
        frame = frame[~frame.class_name.isin(too_few)]
    if frame.class_name.nunique() < 2:
        raise PipelineError("transfer learning needs at least two unseen classes with 2 or more images each")
    inputs = provenance.start_stage(paths, "transfer_learning", [paths.best, paths.embeddings("unseen")])
    x, labels = embedding_files.embedding_matrix(frame), frame.label.to_numpy()
    results = probes.transfer_curves(x, labels, cfg.TRANSFER_TEST_FRACTION, cfg.TRANSFER_REPEATS,
                                     probes.ProbeSettings.from_settings(cfg), cfg.SEED, max_train=cfg.TRANSFER_MAX_TRAIN)
    available = len(labels) - int(results.n_test.iloc[0])
    if available > cfg.TRANSFER_MAX_TRAIN:
        print(f"note: training sets capped at TRANSFER_MAX_TRAIN={cfg.TRANSFER_MAX_TRAIN} of the {available} "
              f"training images (an RBF SVC's cost grows with the square of its training set or more)")
    outputs = [paths.out / "transfer_learning.csv"]
    fileio.save_csv(results, outputs[0], index=False)

    n_classes, n_test = frame.class_name.nunique(), int(results.n_test.iloc[0])
    summary = results.groupby(["n_train", "method"]).balanced_accuracy.mean().unstack()[list(probes.PROBES)]
    print(f"Balanced accuracy on {n_test} held-out unseen images ({n_classes} classes), mean over draws:")
    print(summary.round(4).to_string())
    if n_test < 10 * n_classes:
        print(f"note: the test part has only {n_test} images: each accuracy moves by {1 / n_test:.2f} per image")
    chance = 1.0 / n_classes
    where = f"{n_classes} unseen classes, {n_test} test images"
    for method in probes.PROBES:
        outputs.append(paths.out / f"accuracy_{method}.png")
        plot_curves(results, [method], chance, f"{probes.PROBES[method].label} on the embeddings: {where}", outputs[-1])
    outputs.append(paths.out / "accuracy_all.png")
    plot_curves(results, list(probes.PROBES), chance, f"All classifiers: {where}", outputs[-1])
    outputs += run_fewshot(cfg, x, labels, names, paths.out)
    provenance.save_provenance(paths, "transfer_learning", inputs, outputs, cfg)
    print(f"-> {paths.out / 'transfer_learning.csv'}, {paths.out}/accuracy_*.png")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
