"""What the data holds before anything is trained: images per class and subset, and a few of each class.

    python dataset_overview.py

Runs first in run_all.py. The split is plankton/splits.py's: if train.py has not drawn it yet, it is drawn
here, from the same settings and in the same way (then train.py reads it instead of drawing it).

Reads:  the image folder (DATA_DIR, or the built-in digits), outputs/split.csv.
Writes: outputs/class_counts.csv (one row per class: kind, train, val, test, unseen, total; a last
        row "(all classes)"), outputs/class_counts.png (stacked bars, seen and unseen apart),
        outputs/sample_images.png (OVERVIEW_SAMPLES random images of each class, one row per class),
        and last outputs/provenance_dataset_overview.json (see plankton/provenance.py).

Multi-label runs (TASK="multilabel") write, instead of the class counts:
        outputs/label_counts.csv (one row per label: kind, images carrying it in train, val, test,
        unseen, total; an image counts once in each of its labels; a last row "(all images)" counts
        the images), outputs/label_counts.png (the same as stacked bars),
        outputs/label_cooccurrence.csv and .png (labels x labels: images carrying both, over every
        image; the diagonal: images carrying the label), and outputs/sample_images.png with one row
        per label (images carrying it, each captioned with its subset and label set).
"""
import numpy as np
import pandas as pd

from plankton import fileio, images, labelsets, locations, plots, provenance, registry, runner, splits

COUNT_COLUMNS = ["train", "val", "test", "unseen"]
ALL_CLASSES = "(all classes)"
COLOURS = {"train": "#1f77b4", "val": "#9ecae1", "test": "#08519c", "unseen": "#e6550d"}
KIND_COLOURS = {"seen": "#08519c", "unseen": "#e6550d"}
CHAR_WIDTH = 0.011  # one digit's width in the counts chart, as a share of the longest bar


def class_counts(table: pd.DataFrame, seen: list[str], unseen: list[str]) -> pd.DataFrame:
    """Images of each class in each subset, seen classes first, and a last row summing them."""
    counts = pd.crosstab(table.class_name, table.subset).reindex(index=seen + unseen, columns=COUNT_COLUMNS,
                                                                 fill_value=0)
    counts = counts.fillna(0).astype(int)
    counts["total"] = counts.sum(axis=1)
    counts.insert(0, "kind", ["seen"] * len(seen) + ["unseen"] * len(unseen))
    counts.loc[ALL_CLASSES] = ["all"] + counts[COUNT_COLUMNS + ["total"]].sum().tolist()
    return counts.rename_axis("class_name").reset_index()


def plot_class_counts(counts: pd.DataFrame, path, multilabel: bool = False) -> None:
    """Horizontal stacked bars, one per class (seen above, unseen below a line): each part's count
    inside it where it fits, the class total at the bar's end. Multi-label: one bar per label
    (label_counts' table), the images carrying it."""
    plt = plots.pyplot()
    name_column, all_row = ("label", labelsets.ALL_IMAGES) if multilabel else ("class_name", ALL_CLASSES)
    rows = counts[counts[name_column] != all_row].reset_index(drop=True)
    k, widest = len(rows), max(1, int(rows.total.max()))
    fig, ax = plt.subplots(figsize=(9, 0.45 * k + 1.8))
    y = np.arange(k)
    left = np.zeros(k)
    for column in COUNT_COLUMNS:
        values = rows[column].to_numpy()
        ax.barh(y, values, left=left, color=COLOURS[column], label=column,
                hatch="//" if column == "unseen" else None, edgecolor="white", linewidth=0.5)
        for i in range(k) if column != "unseen" else ():  # an unseen bar's count is its total, at its end
            if values[i] < CHAR_WIDTH * widest * (len(str(values[i])) + 1):
                continue  # too narrow for its number: the CSV has it
            ax.text(left[i] + values[i] / 2, i, str(values[i]), ha="center", va="center", fontsize=8,
                    color="black" if column == "val" else "white")
        left += values
    for i, total in enumerate(rows.total):
        ax.text(total + 0.01 * widest, i, f"{total}", ha="left", va="center", fontsize=9)
    ax.set_yticks(y, [f"{name}  ({kind})" for name, kind in zip(rows[name_column], rows.kind)])
    for label, kind in zip(ax.get_yticklabels(), rows.kind):
        label.set_color(KIND_COLOURS[kind])
    n_seen = int((rows.kind == "seen").sum())
    if 0 < n_seen < k:
        ax.axhline(n_seen - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlim(0, widest * 1.12)
    ax.set_xlabel("images")
    total = counts[counts[name_column] == all_row].iloc[0]
    images_in_all = (f"{total.total} in all: train {total.train}, val {total.val}, test {total.test}, "
                     f"unseen {total.unseen}")
    if multilabel:
        ax.set_title(f"Images carrying each label, per subset ({images_in_all} images; an image counts in each of "
                     f"its labels)\nimages with an unseen label (orange, hatched) are held out, their seen labels "
                     f"included", fontsize=10)
    else:
        ax.set_title(f"Images per class and subset ({images_in_all})\nseen classes (blue) are split for training; "
                     f"unseen classes (orange, hatched) are held out")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="subset", title_fontsize=8)
    plots.save_figure(fig, path)


def pick_samples(table: pd.DataFrame, classes: list[str], per_class: int, seed: int) -> dict[str, pd.DataFrame]:
    """Up to per_class random rows of each class (any subset), drawn with the seed, in file order;
    for a multi-label split (a `labels` column), of the images carrying each label."""
    rng = np.random.default_rng(seed)
    carried = labelsets.multi_hot(table.labels, classes) > 0 if "labels" in table.columns else None
    picked = {}
    for i, name in enumerate(classes):
        rows = table[table.class_name == name] if carried is None else table[carried[:, i]]
        chosen = np.sort(rng.choice(len(rows), size=min(per_class, len(rows)), replace=False))
        picked[name] = rows.iloc[chosen]
    return picked


def plot_samples(root, picked: dict[str, pd.DataFrame], unseen: list[str], per_class: int, path) -> None:
    """One row per class, its name (and seen/unseen) as the row label; each image's subset under it."""
    plt = plots.pyplot()
    k = len(picked)
    fig, axes = plt.subplots(k, per_class, figsize=(1.25 * per_class + 1.6, 1.4 * k + 0.9), squeeze=False)
    for r, (name, rows) in enumerate(picked.items()):
        kind = "unseen" if name in unseen else "seen"
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(rows):
                ax.axis("off")
                continue
            pixels = images.thumbnail(root / rows.relpath.iloc[c])
            small = max(pixels.shape[:2]) < 64  # e.g. the 8 x 8 digits: show the pixels, not a blur
            ax.imshow(pixels, interpolation="nearest" if small else "antialiased")
            caption = rows.subset.iloc[c]
            if "labels" in rows.columns:  # multi-label: the image's whole label set
                caption += "\n" + labelsets.describe(rows.labels.iloc[c])
            ax.set_xlabel(caption, fontsize=7, labelpad=1)
            for spine in ax.spines.values():
                spine.set_edgecolor(KIND_COLOURS[kind])
                spine.set_linewidth(2.5 if kind == "unseen" else 1)
        axes[r][0].set_ylabel(f"{name}\n({kind})", rotation=0, ha="right", va="center", fontsize=9,
                              color=KIND_COLOURS[kind])
    if any("labels" in rows.columns for rows in picked.values()):
        fig.suptitle(f"Up to {per_class} random images carrying each label (subset and label set under each image); "
                     f"seen labels in blue, unseen in orange (thick frame)", fontsize=10, y=1.0)
    else:
        fig.suptitle(f"Up to {per_class} random images of each class (subset under each image); "
                     f"seen classes in blue, unseen in orange (thick frame)", fontsize=10, y=1.0)
    fig.tight_layout()  # leaves room for the suptitle
    plots.save_figure(fig, path)


def plot_cooccurrence(matrix: pd.DataFrame, seen: list[str], n_images: int, path) -> None:
    """The labels x labels counts as a heatmap, each cell's count written in it; unseen labels' names
    in orange."""
    plt = plots.pyplot()
    names = list(matrix.index)
    k = len(names)
    fig, ax = plt.subplots(figsize=(0.55 * k + 3.2, 0.5 * k + 2.4))
    values = matrix.to_numpy()
    shown = ax.imshow(values, cmap="Blues", vmin=0)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(values[i, j]), ha="center", va="center", fontsize=8 if k <= 12 else 6,
                    color="white" if values[i, j] > 0.6 * values.max() else "black")
    plots.class_ticks(ax, names)
    for label in ax.get_xticklabels() + ax.get_yticklabels():
        label.set_color(KIND_COLOURS["seen" if label.get_text() in seen else "unseen"])
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="images")
    ax.set_title(f"Label co-occurrence over all {n_images} images:\nimages carrying both labels "
                 f"(diagonal: images carrying the label; unseen labels in orange)", fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, path)


def write_counts(split, out) -> list:
    """The class counts (or, multi-label, the label counts and co-occurrence): their files, written."""
    seen, unseen = split.seen_classes, split.unseen_classes
    if split.task == "multiclass":
        outputs = [out / "class_counts.csv", out / "class_counts.png"]
        counts = class_counts(split.table, seen, unseen)
        fileio.save_csv(counts, outputs[0], index=False)
        plot_class_counts(counts, outputs[1])
        return outputs
    outputs = [out / name for name in ("label_counts.csv", "label_counts.png", "label_cooccurrence.csv",
                                       "label_cooccurrence.png")]
    counts = labelsets.label_counts(split.table, seen, unseen)
    fileio.save_csv(counts, outputs[0], index=False)
    plot_class_counts(counts, outputs[1], multilabel=True)
    matrix = labelsets.cooccurrence(split.table.labels, seen + unseen)
    fileio.save_csv(matrix, outputs[2])
    plot_cooccurrence(matrix, seen, len(split.table), outputs[3])
    return outputs


def run(cfg) -> None:
    registry.require_task("dataset_overview", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    split = splits.split_from_settings(cfg, paths, create=True)
    inputs = provenance.start_stage(paths, "dataset_overview", [paths.split])
    outputs = write_counts(split, paths.out) + [paths.out / "sample_images.png"]
    picked = pick_samples(split.table, split.seen_classes + split.unseen_classes, cfg.OVERVIEW_SAMPLES, cfg.SEED)
    plot_samples(split.root, picked, split.unseen_classes, cfg.OVERVIEW_SAMPLES, outputs[-1])
    provenance.save_provenance(paths, "dataset_overview", inputs, outputs, cfg)
    print("-> " + ", ".join(map(str, outputs)))


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
