"""Figures a reader can trust, with long real-world plankton class names: legends never sit on the
chance line or on the points, a reliability bin of 2 images does not look like one of 200, no leaks
is a figure with something in it, and feature-map panels name their modules readably."""
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

import calibration
import dimensionality_reduction
import feature_maps
import leaks
import transfer_learning
from plankton import plots, probes

LONG_SEEN = ["Chaetoceros_socialis_colony", "detritus_fibrous_long_name", "Thalassionematales_very_long_name",
             "Rhizosolenia_imbricata_chain_of_cells", "Neoceratium_fusus", "Codonellopsis_orthoceras",
             "Protoperidinium_claudicans_cyst", "Coscinodiscus_wailesii_valve_view"]
LONG_UNSEEN = ["Tintinnopsis_campanula_lorica", "Pseudo-nitzschia_delicatissima_complex", "Dictyocha_speculum",
               "fecal_pellet_long_cylindrical"]


@pytest.fixture
def saved(monkeypatch):
    """The figures the plotting functions would save, kept open for measuring (not written: a PNG
    costs time and adds nothing to what is measured here)."""
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    yield figures
    for fig in figures:
        plots.pyplot().close(fig)


def renderer_of(fig):
    """A renderer with the figure drawn once (its layout as saved), kept on the figure."""
    if not hasattr(fig, "_test_renderer"):
        fig._test_renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(fig._test_renderer)
    return fig._test_renderer


def boxes(fig, artists):
    renderer = renderer_of(fig)
    return [a.get_window_extent(renderer) for a in artists]


def overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def tick_labels_apart(fig, labels) -> bool:
    """Slanted tick labels are parallel lines of text: they stay apart when the distance between
    neighbouring lines (tick spacing x sin(angle)) is at least a line's height; level ones when
    their boxes do not meet."""
    angle = np.radians(labels[0].get_rotation())
    if angle == 0:
        label_boxes = boxes(fig, labels)
        return not any(overlap(a, b) for i, a in enumerate(label_boxes) for b in label_boxes[i + 1:])
    renderer = renderer_of(fig)
    anchors = sorted(t.get_transform().transform(t.get_position())[0] for t in labels)
    labels[0].set_rotation(0)
    height = labels[0].get_window_extent(renderer).height
    labels[0].set_rotation(np.degrees(angle))
    return min(np.diff(anchors)) * np.sin(angle) >= height


def test_fewshot_and_transfer_legends_sit_beside_the_axes_off_the_chance_line(tmp_path, saved):
    rows, runs, summary = [], [], []
    for i, method in enumerate(probes.PROBES):
        for n in (2, 4, 8, 16):
            rows += [dict(method=method, n_train=n, balanced_accuracy=0.25 + 0.01 * i + 0.002 * r) for r in range(3)]
        for k in (1, 2, 5):
            summary.append(dict(method=method, shots=k, mean=0.26 + 0.01 * i, ci95_low=0.2, ci95_high=0.3))
            runs += [dict(method=method, shots=k, **{f"acc_{c}": 0.9 for c in LONG_UNSEEN}) for _ in range(3)]
    chance = 1 / len(LONG_UNSEEN)  # 0.25: the curves run along it, where the legend used to sit
    transfer_learning.plot_curves(pd.DataFrame(rows), list(probes.PROBES), chance, "all", tmp_path / "a.png")
    transfer_learning.plot_fewshot(pd.DataFrame(summary), chance, "few-shot", tmp_path / "f.png")
    transfer_learning.plot_per_class(pd.DataFrame(runs), LONG_UNSEEN, "per class", tmp_path / "p.png")
    assert len(saved) == 3
    for fig in saved:
        ax = fig.axes[0]
        legend_box, axes_box = boxes(fig, [ax.get_legend(), ax])
        assert legend_box.x0 >= axes_box.x1, "the legend sits on the axes (on the chance line, curves or bars)"
    per_class = saved[2].axes[0]
    labels = [t for t in per_class.get_xticklabels() if t.get_text()]
    assert [t.get_text() for t in labels] == LONG_UNSEEN
    assert tick_labels_apart(saved[2], labels)


def test_a_reliability_bin_of_two_images_is_paler_than_one_of_two_hundred_and_counts_are_drawn(tmp_path, saved):
    bins = []
    for when in ("before", "after"):
        for low, images, acc in ((0.4, 2, 1.0), (0.6, 20, 0.7), (0.9, 200, 0.92)):
            bins.append(dict(subset="test", when=when, bin_low=low, images=images, accuracy=acc, confidence=low + 0.03))
    table = pd.DataFrame([dict(subset="test", when=w, temperature=1.3, ece=0.05, nll=0.3, brier=0.1, images=222)
                          for w in ("before", "after")])
    calibration.plot_reliability(table, pd.DataFrame(bins), "test", tmp_path / "r.png")
    fig = saved[0]
    top = [ax for ax in fig.axes if ax.get_ylabel() == "accuracy"][0]
    bars = [p for p in top.patches if p.get_height() > 0]
    alphas = {round(p.get_x(), 2): p.get_facecolor()[3] for p in bars}
    assert alphas[0.4] < alphas[0.6] < alphas[0.9]  # 2 < 20 < 200 images
    counts = [ax for ax in fig.axes if ax.get_yscale() == "log"]
    assert len(counts) == 2  # a count histogram under each panel
    assert sorted(round(p.get_height()) for p in counts[0].patches) == [2, 20, 200]


def test_no_leaks_is_a_histogram_of_nearest_distances_with_the_threshold_not_an_empty_panel(tmp_path, saved):
    rng = np.random.default_rng(0)
    nearest = {s: (np.zeros(n, np.int64), rng.uniform(0.05, 0.6, n).astype(np.float32))
               for s, n in (("val", 5), ("test", 30), ("unseen", 40))}
    empty = pd.DataFrame(columns=leaks.COLUMNS)
    leaks.plot_leaks(empty, tmp_path, 0.005, 24, tmp_path / "leaks.png", "checked: 75 images", nearest)
    fig = saved[0]
    (ax,) = fig.axes
    assert ax.axison and len(ax.patches) >= 3  # a histogram per subset, on visible axes
    assert "No leaks" in ax.get_title()
    assert f"{float(min(d.min() for _, d in nearest.values())):.4f}" in ax.get_title()  # the closest pair's distance
    assert any(np.allclose(line.get_xdata(), 0.005) for line in ax.lines)  # the threshold, drawn
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["val (5 images)", "test (30 images)", "unseen (40 images)"]


def test_the_plane_legends_with_long_class_names_cover_no_points_and_no_other_legend(tmp_path, saved):
    rng = np.random.default_rng(0)
    rows = []
    for subset, names in (("train", LONG_SEEN), ("test", LONG_SEEN), ("unseen", LONG_UNSEEN)):
        for c, name in enumerate(names):
            rows += [dict(label=c, class_name=name, path=f"{name}/{j}.png", subset=subset,
                          x=c + rng.normal(), y=rng.normal()) for j in range(6)]
    coords = pd.DataFrame(rows)
    dimensionality_reduction.plot_plane(coords, plots.class_colours(LONG_SEEN, LONG_UNSEEN), LONG_UNSEEN,
                                        tmp_path / "tsne.png", method="tsne")
    fig = saved[0]
    legends = [ax.get_legend() for ax in fig.axes]
    legend_boxes = boxes(fig, legends)
    axes_boxes = boxes(fig, fig.axes)
    assert not any(overlap(legend, panel) for legend in legend_boxes for panel in axes_boxes)
    assert not any(overlap(a, b) for i, a in enumerate(legend_boxes) for b in legend_boxes[i + 1:])
    shown = {t.get_text().rsplit(" (", 1)[0] for legend in legends for t in legend.get_texts()}
    assert shown == set(LONG_SEEN + LONG_UNSEEN)
    assert fig.axes[0].get_xlabel() == "t-SNE 1" and "t-SNE" in fig._suptitle.get_text()


def test_feature_map_panels_name_their_modules_and_their_legends_are_readable(tmp_path, saved):
    names = ["trunk.features.0", "tuned_trunk.features.3", "head.0"]
    block = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1)), torch.nn.Sequential(torch.nn.ReLU()))
    kinds = {"trunk.features.0": feature_maps.module_kind(torch.nn.Conv2d(1, 1, 1)),
             "tuned_trunk.features.3": feature_maps.module_kind(block), "head.0": "Conv2d"}
    stats, spectra = [], []
    for name in names:
        conditions = ["seen_test", "unseen"] + (["head_init"] if name == "head.0" else
                                                ["random_trunk", "pretrained_trunk"])
        for condition in conditions:
            values = np.sort(np.random.default_rng(len(stats)).uniform(0.01, 1, 6))[::-1]
            stats.append(dict(module=name, condition=condition, n_images=10, n_channels=6, nonpositive_share=0.4,
                              effective_rank=feature_maps.effective_rank(values)))
            spectra += [dict(module=name, condition=condition, rank=i + 1, eigenvalue=v) for i, v in enumerate(values)]
    stats = pd.DataFrame(stats)
    feature_maps.plot_spectra(pd.DataFrame(spectra), stats, names, kinds, "trunks", tmp_path / "s.png", "images of x/")
    fig = saved[0]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert [t.splitlines()[0] for t in titles] == names  # the names FEATURE_MODULES takes
    assert not any("Sequential" in t for t in titles)
    texts = [t for legend in [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
             for t in legend.get_texts()]
    assert texts and min(t.get_fontsize() for t in texts) >= 8
    assert "trunk before fine-tuning, images of x/" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_the_finetune_comparison_labels_every_module_without_overlap(tmp_path, saved):
    modules = [f"trunk.features.{i}" for i in range(5)] + ["tuned_trunk.features.5", "tuned_trunk.features.6"]
    table = pd.DataFrame([dict(module=m, part="fine-tuned block" if m.startswith("tuned") else "frozen block",
                               n_images=40, n_channels=64, nonpositive_share_pretrained=0.5,
                               nonpositive_share_finetuned=0.5 + 0.1 * m.startswith("tuned"),
                               effective_rank_pretrained=12.0, effective_rank_finetuned=9.0) for m in modules])
    feature_maps.plot_finetune_comparison(table, "seen test images", "trunk: ImageNet", tmp_path / "c.png")
    fig = saved[0]
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert [t.get_text() for t in labels] == modules
        assert tick_labels_apart(fig, labels)
    assert fig.axes[0].get_ylim() == (0.0, 1.0)
