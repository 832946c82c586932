"""A 2-d picture of the embeddings (UMAP, or t-SNE or PCA: DIMRED), and for each seen class the
images closest to and furthest from its centre, with the closest images of other classes.

    python dimensionality_reduction.py
    python dimensionality_reduction.py --DIMRED=tsne

Reads:  outputs/embeddings_{train,test,unseen}.pkl (checked against checkpoints/best.pth), the images.
Writes: outputs/<DIMRED>_embeddings.png (train, test, unseen panels, coloured by class: umap_embeddings.png,
        tsne_embeddings.png or pca_embeddings.png), outputs/<DIMRED>_coordinates.csv (and .parquet),
        outputs/close_faraway_closeotherclass_class_<i>.png for each seen class i,
        outputs/close_far_images.csv (every image those figures show: figure, row, rank, class,
        distance to the centre, path), and last outputs/provenance_dimensionality_reduction.json.
        Another method's figure and coordinates from an earlier run are removed, so that only the
        plane of this run is there to be read.

The method (plankton/projection.py's METHODS) is fitted once, on all the points plotted (up to
UMAP_SAMPLES from each set, standardised together). Close/far distances are measured to the class
centre in the 128-d embedding space of the training images (CLOSE_FAR_SPACE="embedding"), or in the
2-d plane as the study did with UMAP ("umap"), where only the sampled training images have coordinates.
"""
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd

from plankton import embedding_files, fileio, images, labelsets, locations, plots, projection, provenance, runner
from plankton.errors import PipelineError

SUBSETS = ("train", "test", "unseen")


def sample_rows(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def plotted_points(frames: dict, limit: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The points UMAP is fitted on (up to `limit` random rows of each subset) and their
    label, class_name, path and subset, in the same order."""
    rng = np.random.default_rng(seed)
    picked = {s: sample_rows(len(frames[s]), limit, rng) for s in SUBSETS}
    points = np.concatenate([embedding_files.embedding_matrix(frames[s])[picked[s]] for s in SUBSETS])
    rows = pd.concat([frames[s].iloc[picked[s]][["label", "class_name", "path"]].assign(subset=s)
                      for s in SUBSETS], ignore_index=True)
    return points, rows


def plot_plane(coords: pd.DataFrame, colours: dict, unseen: list[str], path, multilabel: bool = False,
               method: str = "umap") -> None:
    """Train, test and unseen panels on one plane. Within a panel the points are drawn in a random
    order, so that no class is hidden under the one drawn after it. Multi-label: each image in the
    hue of its rarest label (embed.py's class_name). Legends sit below their panels, so that no
    legend hides points, whatever the class names' lengths."""
    from matplotlib.lines import Line2D
    label, axis = projection.METHODS[method].label, projection.METHODS[method].axis
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), sharex=True, sharey=True)  # one fit: one plane
    titles = dict(train="Training data (seen classes)", test="Test data (seen classes)", unseen="Unseen classes")
    if multilabel:
        titles = dict(train="Training images (seen labels only)", test="Test images (seen labels only)",
                      unseen="Held-out images (an unseen label)")
    rng = np.random.default_rng(0)
    for ax, subset in zip(axes, SUBSETS):
        part = coords[coords.subset == subset].iloc[rng.permutation((coords.subset == subset).sum())]
        marker = plots.UNSEEN_MARKER if subset == "unseen" else "o"
        ax.scatter(part.x, part.y, s=10 if len(part) > 500 else 24, alpha=0.75, linewidths=0, marker=marker,
                   c=[colours[name] for name in part.class_name])
        counts = part.class_name.value_counts()
        handles = [Line2D([], [], ls="", marker=marker, color=colours[name], label=f"{name} ({counts[name]})")
                   for name in colours if name in counts]
        ax.set_title(f"{titles[subset]}: {len(part)} points")
        ax.set_xlabel(f"{axis} 1")
        ax.set_ylabel(f"{axis} 2")
        ax.legend(handles=handles, title="rarest label (points)" if multilabel else "class (points)", fontsize=8,
                  loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2 if len(handles) > 6 else 1)
    hues = ("each image in the hue of its rarest label, unseen labels as triangles" if multilabel else
            "each class its own hue, unseen classes as triangles")
    fig.suptitle(f"{label} of the embeddings (one fit on all plotted points; {hues})\n"
                 f"{projection.METHODS[method].reading}")
    fig.tight_layout()
    plots.save_figure(fig, path)


def close_and_far(points: np.ndarray, member: np.ndarray, count: int):
    """Indices of the `count` members (rows where `member` is True) closest to and furthest from the
    members' centre, and of the `count` non-members closest to it."""
    members, others = np.flatnonzero(member), np.flatnonzero(~member)
    centre = points[members].mean(0)
    member_dist = np.linalg.norm(points[members] - centre, axis=1)
    other_dist = np.linalg.norm(points[others] - centre, axis=1)
    by_distance = np.argsort(member_dist, kind="stable")
    closest, furthest = members[by_distance[:count]], members[by_distance[::-1][:count]]
    closest_other = others[np.argsort(other_dist, kind="stable")[:count]]
    return closest, furthest, closest_other, centre


def plot_close_far(frame: pd.DataFrame, rows: list, pictures: dict, class_name: str, space: str, path,
                   count: int, noun: str = "class") -> None:
    """noun "label" (multi-label): the members are the images carrying the label, the third row the
    closest images without it, captioned with all their labels."""
    plt = plots.pyplot()
    row_titles = [f"closest to the centre of {class_name}", f"furthest from the centre of {class_name}",
                  "closest from other classes" if noun == "class" else "closest without this label"]
    fig, axes = plt.subplots(3, count, figsize=(2.1 * count + 1.6, 7.4), squeeze=False)
    for r, (indices, distances) in enumerate(rows):
        for c in range(count):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(indices):
                ax.axis("off")
                continue
            item = frame.iloc[indices[c]]
            ax.imshow(pictures[item.path], interpolation="nearest")
            caption = f"d={distances[c]:.2f}"
            if r == 2:
                caption = (f"class {item.class_name}" if noun == "class" else
                           "labels " + textwrap.shorten(str(item.labels), 22, placeholder="…")) + f"\n{caption}"
            ax.set_xlabel(caption, fontsize=9)
        axes[r, 0].set_ylabel(row_titles[r].replace(" from the", "\nfrom the").replace(" to the", "\nto the")
                              .replace(" from other", "\nfrom other").replace(" without", "\nwithout"), fontsize=9)
    whose = "training images" if noun == "class" else "training images carrying it"
    fig.suptitle(f"{noun.capitalize()} {class_name}: distances to its centre in the {space} space ({whose})")
    fig.tight_layout()
    plots.save_figure(fig, path)


def label_membership(train: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, str]:
    """Images x classes, True where the image belongs: its one class, or (multi-label tables, with a
    `labels` column) every label it carries; and the noun for them, "class" or "label"."""
    if "labels" in train.columns:
        return labelsets.multi_hot(list(train["labels"]), list(names)).astype(bool), "label"
    return train.label.to_numpy()[:, None] == np.arange(len(names))[None, :], "class"


def close_far_selections(coords: pd.DataFrame, train: pd.DataFrame, seen: list[str], space: str,
                         count: int, space_name: str = "") -> tuple[pd.DataFrame, list]:
    """For each seen class with training images, its closest and furthest training images and the
    closest of other classes, measured in the embedding space or in the 2-d plane (space "umap",
    whichever DIMRED made it; sampled training points only): the training rows used and (class
    index, name, rows of indices and distances). space_name is what the notes call the space."""
    space_name = space_name or space
    if space == "umap":
        in_plane = coords[coords.subset == "train"]
        train = train.set_index("path").loc[in_plane.path].reset_index()[train.columns]
        space_points = in_plane[["x", "y"]].to_numpy()
    else:
        space_points = embedding_files.embedding_matrix(train)
    membership, noun = label_membership(train, seen)
    selections = []
    for i, name in enumerate(seen):
        members = int(membership[:, i].sum())
        if not members:
            print(f"note: no training images of {noun} {name} in the {space_name} space; figure skipped")
            continue
        closest, furthest, closest_other, centre = close_and_far(space_points, membership[:, i], count)
        rows = [(idx, np.linalg.norm(space_points[idx] - centre, axis=1)) for idx in (closest, furthest, closest_other)]
        if members < 2 * count:
            print(f"note: {noun} {name} has {members} training images: its closest and furthest rows overlap")
        selections.append((i, name, rows))
    return train, selections


ROW_NAMES = ("closest to the centre", "furthest from the centre", "closest of other classes")


def shown_images_table(train: pd.DataFrame, selections: list, root: Path) -> pd.DataFrame:
    """One row per image in the close/far figures: which figure and row, its rank there, its class,
    its distance to the centre, its path (relative and full), so an outlier can be opened."""
    records = []
    for i, name, rows in selections:
        for row_name, (indices, distances) in zip(ROW_NAMES, rows):
            for rank, (j, distance) in enumerate(zip(indices, distances), 1):
                item = train.iloc[j]
                records.append(dict(figure_class=name, figure=f"close_faraway_closeotherclass_class_{i}.png",
                                    row=row_name, rank=rank, image_class=item.class_name,
                                    distance_to_centre=float(distance), path=item.path, full_path=str(root / item.path)))
    return pd.DataFrame(records)


def load_shown_images(train: pd.DataFrame, selections: list, root: Path) -> dict:
    """Every image the close/far figures show, by relative path, loaded before anything is written:
    one that is gone or unreadable since embed.py is one error line."""
    shown = sorted({train.path.iloc[j] for _, _, rows in selections for idx, _ in rows for j in idx})
    missing = [p for p in shown if not (root / p).is_file()]
    if missing:
        raise PipelineError(f"{root / missing[0]} no longer exists ({len(missing)} of the {len(shown)} "
                                   f"images the close/far figures show are gone) — restore them, or re-run embed.py")
    pictures = {}
    for relpath in shown:
        try:
            pictures[relpath] = images.load_rgb(root / relpath)
        except Exception as err:  # truncated, or replaced by something that is not an image
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
            raise PipelineError(f"cannot read {root / relpath}, shown in a close/far figure ({reason}); "
                                       f"restore it, or re-run embed.py")
    return pictures


def remove_other_planes(out: Path, method: str) -> None:
    """Another DIMRED's figure and coordinates from an earlier run would read as this run's: gone."""
    for other in projection.METHODS:
        gone = [name for name in projection.output_names(other) if other != method and (out / name).is_file()]
        for name in gone:
            (out / name).unlink()
        if gone:
            print(f"note: removed {', '.join(gone)} (DIMRED={other!r} of an earlier run; this run is DIMRED={method!r})")


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    frames = {s: embedding_files.open_embeddings(paths, s) for s in SUBSETS}
    points, coords = plotted_points(frames, cfg.UMAP_SAMPLES, cfg.SEED)
    method = projection.METHODS[cfg.DIMRED]
    started = time.time()
    xy = method.fit(points, cfg.UMAP_NEIGHBORS, cfg.SEED)
    print(f"{method.label} fit on {len(points)} points in {time.time() - started:.1f}s")
    coords["x"], coords["y"] = xy[:, 0], xy[:, 1]
    train_info = embedding_files.info(frames["train"])
    seen, unseen = list(train_info.class_names), list(embedding_files.info(frames["unseen"]).class_names)
    root = Path(train_info.data_dir)
    space = method.label if cfg.CLOSE_FAR_SPACE == "umap" else cfg.CLOSE_FAR_SPACE
    train, selections = close_far_selections(coords, frames["train"], seen, cfg.CLOSE_FAR_SPACE, cfg.CLOSE_FAR_COUNT,
                                             space)
    pictures = load_shown_images(train, selections, root)
    inputs = provenance.start_stage(paths, "dimensionality_reduction",
                                   [paths.best] + [paths.embeddings(s) for s in SUBSETS])
    remove_other_planes(paths.out, cfg.DIMRED)

    outputs = [paths.coordinates(cfg.DIMRED), paths.out / projection.figure_name(cfg.DIMRED)]
    fileio.save_csv(coords, outputs[0], index=False)
    outputs += embedding_files.export_table(coords, outputs[0])  # the .parquet copy (the CSV is always written)
    plot_plane(coords, plots.class_colours(seen, unseen), unseen, outputs[1], train_info.task == "multilabel",
               cfg.DIMRED)
    outputs.append(paths.out / "close_far_images.csv")
    fileio.save_csv(shown_images_table(train, selections, root), outputs[-1], index=False)
    for i, name, rows in selections:
        outputs.append(paths.out / f"close_faraway_closeotherclass_class_{i}.png")
        plot_close_far(train, rows, pictures, name, space, outputs[-1], cfg.CLOSE_FAR_COUNT,
                       "label" if "labels" in train.columns else "class")
    provenance.save_provenance(paths, "dimensionality_reduction", inputs, outputs, cfg)
    print(f"-> {outputs[1]}, {paths.out}/close_faraway_closeotherclass_class_*.png")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
