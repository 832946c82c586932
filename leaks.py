"""Leaks between splits: training images that turn up again, as exact or near copies, among the
validation, test or unseen images. A test image that is a copy of a training image measures memory,
not generalisation; an unseen-class image that copies a training image is a labelling problem.

    python leaks.py            (run_all.py runs it right after evaluate.py)

Reads:  checkpoints/best.pth (its trunk), outputs/split.csv (its sha256 column), every image's trunk
        features (through the trunk cache, as evaluate.py reads them), the images shown.
Writes: outputs/leaks.csv (one row per val/test/unseen image that duplicates a training image:
        subset, path, class_name, train_path, train_class, same_class, distance, kind),
        outputs/leaks.png (thumbnails of up to LEAK_FIGURE_PAIRS pairs, closest first; with no leaks,
        the distribution of each image's distance to its nearest training image, with the threshold,
        so a reader sees how far from a leak the closest images were),
        outputs/leaks_summary.json (counts per subset and kind, the threshold, the nearest-distance
        quantiles; read beside evaluate.py's test_metrics.json), and last outputs/provenance_leaks.json.

Two kinds of pair, each image listed at most once:
- exact: the image file's bytes are a training image's (same SHA-256 in split.csv);
- near: otherwise, its nearest training image (cosine distance of the trunk features described
  below) is at most LEAK_THRESHOLD away.
The comparison uses the frozen trunk's feature maps, not the trained embeddings: the embedding is
trained to pull every image of a class together, so two different images of one class can be as
close there as a copy; the trunk's maps are not trained here and keep where things are in the
image. Each map is average-pooled to LEAK_GRID x LEAK_GRID cells (a few pixels of noise or a
re-encoding average out, the layout stays), centred on the training images' mean (otherwise what
all images share dominates every cosine) and compared by cosine distance, 1 - cos, from 0 to 2.
Any leak prints a `warning:` line; none is an error.

Multi-label runs (TASK="multilabel"): the same search (it compares images, not labels); leaks.csv
names each image's label set instead of its class (columns labels, train_labels, same_labels: the
two sets are equal), and "another class" in the summary and the figure means another label set.
"""
import textwrap

import numpy as np
import pandas as pd
import torch

import dataloader
from plankton import checkpoints, fileio, images, locations, plots, provenance, registry, runner, training

QUERY_SUBSETS = ("val", "test", "unseen")
COLUMNS = ["subset", "path", "class_name", "train_path", "train_class", "same_class", "distance", "kind"]
MULTILABEL_NAMES = {"class_name": "labels", "train_class": "train_labels", "same_class": "same_labels"}  # leaks.csv



def pooled_trunk_features(source: dataloader.FeatureSource, trunk, runtime, grid: int) -> np.ndarray:
    """Each item's trunk feature map, average-pooled to grid x grid cells and flattened (float32)."""
    rows = dataloader.Rows(len(source), np.float32)
    batches = dataloader.in_order(len(source), training.inference_batch_size(source, runtime))
    with torch.inference_mode():
        for features, _ in dataloader.feature_batches(source, batches, trunk, runtime):
            rows.add(torch.nn.functional.adaptive_avg_pool2d(features.float(), grid).flatten(1))
    return rows.result()


def unit_rows(x: np.ndarray, centre: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Rows minus `centre`, scaled to length 1 (a zero row stays zero); in_place overwrites a float32 x."""
    centred = x if in_place and x.dtype == np.float32 else np.array(x, dtype=np.float32)
    centred -= centre
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    centred /= np.where(norms > 0, norms, 1.0)
    return centred


# query rows compared at once: a block of queries x every training row is at most this many bytes
BLOCK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def nearest_training(queries: np.ndarray, train: np.ndarray, device: torch.device = torch.device("cpu"),
                     block_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each unit-length query row, the index of the nearest unit-length training row by cosine
    distance and that distance (1 - cos, clipped to [0, 2]); the first index among ties. Every
    training image is compared (a sample could miss a copy), in blocks of queries of at most
    block_bytes of similarities (BLOCK_BYTES for the device), one matrix product each, on `device`."""
    if not len(queries):
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    t = torch.as_tensor(train, dtype=torch.float32).to(device)
    block_bytes = block_bytes or BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"])
    block = max(1, block_bytes // (4 * max(1, len(t))))
    index, distance = np.empty(len(queries), np.int64), np.empty(len(queries), np.float32)
    with torch.inference_mode():
        for start in range(0, len(queries), block):
            q = torch.as_tensor(queries[start:start + block], dtype=torch.float32).to(device)
            best = (q @ t.T).max(1)
            index[start:start + len(q)] = best.indices.cpu().numpy()
            distance[start:start + len(q)] = (1.0 - best.values).clamp(0.0, 2.0).cpu().numpy()
    return index, distance


def find_leaks(split: pd.DataFrame, nearest: dict, threshold: float) -> pd.DataFrame:
    """The pairs: for each query subset, its images whose file is a training image's (exact), or
    whose nearest training image is at most `threshold` away (near). `split` is split.csv's table;
    `nearest[subset]` = (index into the subset's training rows, distance), in split order."""
    train = split[split.subset == "train"].reset_index(drop=True)
    first_with_hash = train.drop_duplicates("sha256").set_index("sha256")
    rows = []
    for subset in QUERY_SUBSETS:
        part = split[split.subset == subset].reset_index(drop=True)
        index, distance = nearest.get(subset, (np.zeros(len(part), int), np.full(len(part), np.inf)))
        for i, image in part.iterrows():
            if image.sha256 in first_with_hash.index:
                match, kind = first_with_hash.loc[image.sha256], "exact"
                match_distance = 0.0
            elif distance[i] <= threshold:
                match, kind, match_distance = train.iloc[index[i]], "near", float(distance[i])
            else:
                continue
            rows.append(dict(subset=subset, path=image.relpath, class_name=image.class_name,
                             train_path=match.relpath, train_class=match.class_name,
                             same_class=bool(match.class_name == image.class_name), distance=match_distance,
                             kind=kind))
    table = pd.DataFrame(rows, columns=COLUMNS)
    order = table.kind.map({"exact": 0, "near": 1})
    return table.assign(_order=order).sort_values(["_order", "distance"], kind="stable").drop(columns="_order") \
        .reset_index(drop=True)


def leak_summary(leaks: pd.DataFrame, split: pd.DataFrame, nearest: dict, threshold: float, grid: int) -> dict:
    """Counts per subset and kind, pairs across classes, and quantiles of each subset's nearest
    training distances (to judge the threshold against)."""
    summary = dict(threshold=threshold, metric=f"cosine distance of trunk features pooled to {grid}x{grid}, "
                                                f"centred on the training mean", total=int(len(leaks)), subsets={})
    for subset in QUERY_SUBSETS:
        part = leaks[leaks.subset == subset]
        distances = nearest.get(subset, (None, np.zeros(0)))[1]
        quantiles = {f"q{int(q * 100):02d}": float(np.quantile(distances, q)) for q in (0.0, 0.01, 0.5)} \
            if len(distances) else {}
        summary["subsets"][subset] = dict(images=int((split.subset == subset).sum()),
                                          exact=int((part.kind == "exact").sum()), near=int((part.kind == "near").sum()),
                                          other_class=int((~part.same_class.astype(bool)).sum()),
                                          nearest_train_distance=quantiles)
    return summary


def print_summary(summary: dict) -> None:
    for subset, counts in summary["subsets"].items():
        q = counts["nearest_train_distance"]
        spread = f"; nearest training image at cosine distance min {q['q00']:.4f}, 1% {q['q01']:.4f}, " \
                 f"median {q['q50']:.4f}" if q else ""
        print(f"{subset}: {counts['images']} images, {counts['exact']} exact and {counts['near']} near duplicates "
              f"of training images ({counts['other_class']} under another class){spread}")
        if counts["exact"] or counts["near"]:
            other = f", {counts['other_class']} of them under another class" if counts["other_class"] else ""
            print(f"warning: {counts['exact'] + counts['near']} {subset} image(s) duplicate a training image "
                  f"({counts['exact']} exact, {counts['near']} near, LEAK_THRESHOLD={summary['threshold']}){other}; "
                  f"see leaks.csv and leaks.png")


def plot_nearest_distances(nearest: dict, threshold: float, path, checked: str = "") -> None:
    """No leaks: per query subset, a histogram of each image's cosine distance to its nearest
    training image (log scale), with LEAK_THRESHOLD as a line, so the gap between the closest pair
    and a leak can be read off."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    distances = {s: d for s, (_, d) in nearest.items() if len(d)}
    floor = threshold / 10  # an exact copy of the features (distance 0) still has a place on the log axis
    everything = np.concatenate(list(distances.values())) if distances else np.array([threshold])
    edges = np.geomspace(floor, max(float(everything.max()), threshold) * 1.5, 40)
    for subset, d in distances.items():
        ax.hist(np.clip(d, floor, None), bins=edges, histtype="step", lw=1.8, label=f"{subset} ({len(d)} images)")
    ax.axvline(threshold, color="darkred", ls="--", lw=1.2, label=f"LEAK_THRESHOLD = {threshold}")
    ax.set_xscale("log")
    ax.set_xlabel("cosine distance of the pooled trunk features to the nearest training image (log scale)")
    ax.set_ylabel("images")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    closest = float(everything.min())
    ax.set_title(f"No leaks: no validation, test or unseen image is within {threshold} of a training image, nor the "
                 f"same file.\nThe closest is at {closest:.4f} ({closest / threshold:.1f}x the threshold). "
                 f"{checked[:1].upper() + checked[1:]}.", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plots.save_figure(fig, path)


def plot_leaks(leaks: pd.DataFrame, root, threshold: float, limit: int, path, checked: str = "",
               nearest: dict | None = None, noun: str = "class") -> None:
    """Each pair side by side (the val/test/unseen image, then its training image), closest first;
    with none, plot_nearest_distances (the distances to the nearest training image)."""
    plt = plots.pyplot()
    shown = leaks.head(limit)
    if shown.empty:
        plot_nearest_distances(nearest or {}, threshold, path, checked)
        return
    pairs_per_row = min(4, len(shown))
    rows = -(-len(shown) // pairs_per_row)
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(3.6 * pairs_per_row, 2.5 * rows + 0.8),
                             squeeze=False)
    for ax in axes.flat:
        plots.axes_off(ax)
    for n, pair in enumerate(shown.itertuples()):
        left, right = axes[n // pairs_per_row, 2 * (n % pairs_per_row)], axes[n // pairs_per_row, 2 * (n % pairs_per_row) + 1]
        for ax, relpath, caption in ((left, pair.path, f"{pair.subset}: {pair.class_name}"),
                                     (right, pair.train_path, f"train: {pair.train_class}")):
            ax.imshow(images.load_rgb(root / relpath), interpolation="nearest")
            name = textwrap.shorten(relpath, 24, placeholder="…")
            ax.set_title(f"{caption}\n{name}", fontsize=7, color="darkred" if not pair.same_class else "black")
        left.text(1.04, -0.08, f"{pair.kind}, d={pair.distance:.4f}", transform=left.transAxes, ha="center",
                  va="top", fontsize=8)
    more = f", the {len(shown)} closest shown (LEAK_FIGURE_PAIRS)" if len(leaks) > len(shown) else ""
    fig.suptitle(f"Leaks between splits: {len(leaks)} image(s) duplicating a training image{more}\n"
                 f"each pair: the val/test/unseen image (left) and its training image (right); "
                 f"red title = another {noun}", fontsize=10)
    fig.tight_layout()
    plots.save_figure(fig, path)


def nearest_per_subset(trained, cache, runtime, grid: int) -> dict:
    """For each query subset, (nearest training row, cosine distance) of its images, in split order."""
    pooled = {s: pooled_trunk_features(trained.source(s, cache), trained.model.trunk, runtime, grid)
              for s in ("train",) + QUERY_SUBSETS}
    centre = pooled["train"].mean(0)
    for rows in pooled.values():  # in place: the pooled maps are 4 KB an image at 128 px, 200 MB at 50,000
        unit_rows(rows, centre, in_place=True)
    return {s: nearest_training(pooled[s], pooled["train"], runtime.device) for s in QUERY_SUBSETS if len(pooled[s])}


def run(cfg) -> None:
    registry.require_task("leaks", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    inputs = provenance.start_stage(paths, "leaks", [paths.best, paths.split])
    cache = trained.trunk_cache(cfg, paths, runtime)
    nearest = nearest_per_subset(trained, cache, runtime, cfg.LEAK_GRID)
    table = trained.split.table
    multilabel = trained.split.task == "multilabel"
    if multilabel:  # a label set stands where a class would: equal sets are "the same class"
        table = table.assign(class_name=table.labels)
    leaks = find_leaks(table, nearest, cfg.LEAK_THRESHOLD)
    summary = leak_summary(leaks, table, nearest, cfg.LEAK_THRESHOLD, cfg.LEAK_GRID)
    print_summary(summary)
    outputs = [paths.out / "leaks.csv", paths.out / "leaks.png", paths.leaks_summary]
    fileio.save_csv(leaks.rename(columns=MULTILABEL_NAMES) if multilabel else leaks, outputs[0], index=False)
    checked = "checked: " + ", ".join(f"{c['images']} {s}" for s, c in summary["subsets"].items()) + \
        f" images against {int((table.subset == 'train').sum())} training images"
    plot_leaks(leaks, trained.split.root, cfg.LEAK_THRESHOLD, cfg.LEAK_FIGURE_PAIRS, outputs[1], checked, nearest,
               "label set" if multilabel else "class")
    fileio.save_json(dict(checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256, **summary), outputs[2])
    provenance.save_provenance(paths, "leaks", inputs, outputs, cfg)
    print(f"-> {outputs[0]}, {outputs[1]}, {outputs[2]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
