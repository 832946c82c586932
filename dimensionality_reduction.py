"""UMAP of the embeddings, and for each seen class the images closest to and furthest from its
centre, with the closest images of other classes.

    python dimensionality_reduction.py

Reads:  outputs/embeddings_{train,test,unseen}.pkl (checked against checkpoints/best.pth), the images.
Writes: outputs/umap_embeddings.png (train, test, unseen panels, coloured by class),
        outputs/umap_coordinates.csv (and .parquet),
        outputs/close_faraway_closeotherclass_class_<i>.png for each seen class i,
        outputs/close_far_images.csv (every image those figures show: figure, row, rank, class,
        distance to the centre, path), and last outputs/provenance_dimensionality_reduction.json.

UMAP is fitted once, on all the points plotted (up to UMAP_SAMPLES from each set, standardised
together). Close/far distances are measured to the class centre in the 128-d embedding space of the
training images (CLOSE_FAR_SPACE="embedding"), or in the 2-d UMAP plane as the study did ("umap"),
where only the sampled training images have coordinates.
"""
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import artifacts
import common
import images
import labelsets
import tasks

SUBSETS = ("train", "test", "unseen")


TASKS = tasks.ALL_TASKS  # works on single- and multi-label runs (run_all.py checks this)


def sample_rows(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def cache_umap_compilation() -> int:
    """Ask numba to keep umap-learn's compiled functions on disk too.

    umap-learn marks few of its numba functions cache=True, so every new process compiled them
    again: the first fit in a process took 11 s here, a second one 3.3 s. With the compiled code
    cached, a new process's first fit takes 3.4 s. Returns how many functions were switched."""
    import umap.distances, umap.layouts, umap.spectral, umap.umap_, umap.utils
    from numba.core.registry import CPUDispatcher
    switched = 0
    for module in (umap.umap_, umap.layouts, umap.utils, umap.spectral, umap.distances):
        for function in vars(module).values():
            if isinstance(function, CPUDispatcher):
                try:
                    function.enable_caching()
                    switched += 1
                except Exception:  # a function numba cannot cache is compiled as before
                    pass
    return switched


def exact_neighbours(points: np.ndarray, k: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Each point's k nearest points (itself first, at distance 0), exactly, by blocked matrix
    products in torch: (indices, Euclidean distances), as umap-learn's precomputed_knn takes them.

    umap-learn finds neighbours exactly below 4,096 points and with pynndescent's approximate search
    above; pynndescent's compiled code is not kept between processes and took 26 s of a 31 s first
    fit on 4,600 points. The exact search here costs O(n^2 d) multiply-adds: 0.1 s for 6,000 points."""
    x = torch.as_tensor(points, dtype=torch.float32)
    squares = (x * x).sum(1)
    indices, distances = [], []
    for start in range(0, len(x), block):
        rows = slice(start, min(start + block, len(x)))
        d2 = squares[rows, None] - 2.0 * (x[rows] @ x.T) + squares[None, :]
        own = torch.arange(rows.start, rows.stop)
        d2[own - start, own] = -1.0  # itself first, whatever the rounding
        values, nearest = torch.topk(d2, k, dim=1, largest=False)  # sorted, nearest first
        values[:, 0] = 0.0
        indices.append(nearest.numpy())
        distances.append(values.clamp_(min=0.0).sqrt_().numpy())
    return np.concatenate(indices).astype(np.int64), np.concatenate(distances).astype(np.float32)


_compiling: subprocess.Popen | None = None  # compile_ahead's process, waited for by fit_umap


def umap_code_cached() -> bool:
    """Whether numba's cache folder already holds umap-learn's compiled layout code."""
    folder = os.environ.get("NUMBA_CACHE_DIR")
    return folder is None or any(Path(folder).rglob("layouts.*.nbi"))


def compile_ahead() -> None:
    """On a cold numba cache, fit a small UMAP in a background process at low priority, so that
    numba compiles umap-learn's code (about 18 s on one core) into the cache while the stages before
    this one run; fit_umap then waits for it and loads the compiled code. Does nothing when the code
    is cached already or numba keeps no cache."""
    global _compiling
    if _compiling is not None or umap_code_cached():
        return
    warm_up = ("import numpy as np, dimensionality_reduction as d; "
               "d.fit_umap(np.random.default_rng(0).normal(size=(64, 8)), 15, 0)")
    _compiling = subprocess.Popen([sys.executable, "-c", warm_up], cwd=common.REPO_DIR, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.nice(10))


def stop_compiling(wait: bool) -> None:
    """Wait for compile_ahead's process (or stop it: wait=False); a failed one changes nothing, as
    fit_umap then compiles what it needs itself."""
    global _compiling
    if _compiling is None:
        return
    try:
        _compiling.wait(timeout=600 if wait else 0)
    except subprocess.TimeoutExpired:
        _compiling.kill()
        _compiling.wait()
    _compiling = None


def fit_umap(points: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Standardise, find exact neighbours, then one UMAP fit to 2-d (numba's compiled code is
    cached on disk; a compile_ahead process still compiling it is waited for first)."""
    stop_compiling(wait=True)
    import umap  # imported here: it compiles with numba on first use
    from sklearn.preprocessing import StandardScaler
    cache_umap_compilation()
    scaled = StandardScaler().fit_transform(points).astype(np.float32)
    neighbours = max(2, min(n_neighbors, len(points) - 1))
    knn = exact_neighbours(scaled, neighbours)
    # a seed makes UMAP reproducible (and single-threaded)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, random_state=seed, n_jobs=1,
                        init="spectral" if len(points) > 10 else "random", precomputed_knn=knn)
    with warnings.catch_warnings():  # "no search index: transform() unavailable": never used here
        warnings.filterwarnings("ignore", message="precomputed_knn")
        return reducer.fit_transform(scaled)


def plotted_points(frames: dict, limit: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """The points UMAP is fitted on (up to `limit` random rows of each subset) and their
    label, class_name, path and subset, in the same order."""
    rng = np.random.default_rng(seed)
    picked = {s: sample_rows(len(frames[s]), limit, rng) for s in SUBSETS}
    points = np.concatenate([artifacts.embedding_matrix(frames[s])[picked[s]] for s in SUBSETS])
    rows = pd.concat([frames[s].iloc[picked[s]][["label", "class_name", "path"]].assign(subset=s)
                      for s in SUBSETS], ignore_index=True)
    return points, rows


def class_colours(seen: list[str], unseen: list[str]) -> dict[str, tuple]:
    """One hue per class, seen classes first, from one qualitative palette: an unseen class never
    takes a seen class's hue (tab10 up to 10 classes in all, tab20 up to 20, then evenly spaced hues)."""
    import matplotlib.pyplot as plt
    names = list(seen) + list(unseen)
    if len(names) <= 10:
        return {c: plt.get_cmap("tab10")(i) for i, c in enumerate(names)}
    if len(names) <= 20:
        return {c: plt.get_cmap("tab20")(i) for i, c in enumerate(names)}
    return {c: plt.get_cmap("hsv")(i / len(names)) for i, c in enumerate(names)}


UNSEEN_MARKER = "^"  # unseen classes are triangles, seen classes dots


def plot_umap(coords: pd.DataFrame, colours: dict, unseen: list[str], path, multilabel: bool = False) -> None:
    """Train, test and unseen panels on one plane. Within a panel the points are drawn in a random
    order, so that no class is hidden under the one drawn after it. Multi-label: each image in the
    hue of its rarest label (embed.py's class_name)."""
    from matplotlib.lines import Line2D
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(18, 6.2), sharex=True, sharey=True)  # one fit: one plane
    titles = dict(train="Training data (seen classes)", test="Test data (seen classes)", unseen="Unseen classes")
    if multilabel:
        titles = dict(train="Training images (seen labels only)", test="Test images (seen labels only)",
                      unseen="Held-out images (an unseen label)")
    rng = np.random.default_rng(0)
    for ax, subset in zip(axes, SUBSETS):
        part = coords[coords.subset == subset].iloc[rng.permutation((coords.subset == subset).sum())]
        marker = UNSEEN_MARKER if subset == "unseen" else "o"
        ax.scatter(part.x, part.y, s=10 if len(part) > 500 else 24, alpha=0.75, linewidths=0, marker=marker,
                   c=[colours[name] for name in part.class_name])
        counts = part.class_name.value_counts()
        handles = [Line2D([], [], ls="", marker=marker, color=colours[name], label=f"{name} ({counts[name]})")
                   for name in colours if name in counts]
        ax.set_title(f"{titles[subset]}: {len(part)} points")
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.legend(handles=handles, title="rarest label (points)" if multilabel else "class (points)", fontsize=8,
                  loc="best", framealpha=0.8)
    fig.suptitle("UMAP of the embeddings (one fit on all plotted points; each image in the hue of its rarest "
                 "label, unseen labels as triangles)" if multilabel else "UMAP of the embeddings (one fit on all "
                 "plotted points; each class its own hue, unseen classes as triangles)")
    fig.tight_layout()
    common.save_figure(fig, path)


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
    plt = common.pyplot()
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
    common.save_figure(fig, path)


def label_membership(train: pd.DataFrame, names: list[str]) -> tuple[np.ndarray, str]:
    """Images x classes, True where the image belongs: its one class, or (multi-label tables, with a
    `labels` column) every label it carries; and the noun for them, "class" or "label"."""
    if "labels" in train.columns:
        return labelsets.multi_hot(list(train["labels"]), list(names)).astype(bool), "label"
    return train.label.to_numpy()[:, None] == np.arange(len(names))[None, :], "class"


def close_far_selections(coords: pd.DataFrame, train: pd.DataFrame, seen: list[str], space: str,
                         count: int) -> tuple[pd.DataFrame, list]:
    """For each seen class with training images, its closest and furthest training images and the
    closest of other classes, measured in the embedding space or in the UMAP plane (sampled
    training points only): the training rows used and (class index, name, rows of indices and distances)."""
    if space == "umap":
        in_plane = coords[coords.subset == "train"]
        train = train.set_index("path").loc[in_plane.path].reset_index()[train.columns]
        space_points = in_plane[["x", "y"]].to_numpy()
    else:
        space_points = artifacts.embedding_matrix(train)
    membership, noun = label_membership(train, seen)
    selections = []
    for i, name in enumerate(seen):
        members = int(membership[:, i].sum())
        if not members:
            print(f"note: no training images of {noun} {name} in the {space} space; figure skipped")
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
        raise common.PipelineError(f"{root / missing[0]} no longer exists ({len(missing)} of the {len(shown)} "
                                   f"images the close/far figures show are gone) — restore them, or re-run embed.py")
    pictures = {}
    for relpath in shown:
        try:
            pictures[relpath] = images.load_rgb(root / relpath)
        except Exception as err:  # truncated, or replaced by something that is not an image
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}" if str(err) else type(err).__name__
            raise common.PipelineError(f"cannot read {root / relpath}, shown in a close/far figure ({reason}); "
                                       f"restore it, or re-run embed.py")
    return pictures


def run(cfg) -> None:
    paths = artifacts.prepare_output_dirs(cfg)
    frames = {s: artifacts.open_embeddings(paths, s) for s in SUBSETS}
    points, coords = plotted_points(frames, cfg.UMAP_SAMPLES, cfg.SEED)
    started = time.time()
    xy = fit_umap(points, cfg.UMAP_NEIGHBORS, cfg.SEED)
    print(f"UMAP fit on {len(points)} points in {time.time() - started:.1f}s")
    coords["x"], coords["y"] = xy[:, 0], xy[:, 1]
    seen, unseen = frames["train"].attrs["class_names"], frames["unseen"].attrs["class_names"]
    root = Path(frames["train"].attrs["data_dir"])
    train, selections = close_far_selections(coords, frames["train"], seen, cfg.CLOSE_FAR_SPACE, cfg.CLOSE_FAR_COUNT)
    pictures = load_shown_images(train, selections, root)
    inputs = artifacts.start_stage(paths, "dimensionality_reduction",
                                   [paths.best] + [paths.embeddings(s) for s in SUBSETS])

    outputs = [paths.out / "umap_coordinates.csv", paths.out / "umap_embeddings.png"]
    common.save_csv(coords, outputs[0], index=False)
    outputs += artifacts.export_table(coords, outputs[0])  # the .parquet copy (the CSV is always written)
    plot_umap(coords, class_colours(seen, unseen), unseen, outputs[1], frames["train"].attrs.get("task") == "multilabel")
    outputs.append(paths.out / "close_far_images.csv")
    common.save_csv(shown_images_table(train, selections, root), outputs[-1], index=False)
    for i, name, rows in selections:
        outputs.append(paths.out / f"close_faraway_closeotherclass_class_{i}.png")
        plot_close_far(train, rows, pictures, name, cfg.CLOSE_FAR_SPACE, outputs[-1], cfg.CLOSE_FAR_COUNT,
                       "label" if "labels" in train.columns else "class")
    artifacts.save_provenance(paths, "dimensionality_reduction", inputs, outputs)
    print(f"-> {paths.out / 'umap_embeddings.png'}, {paths.out}/close_faraway_closeotherclass_class_*.png")


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
