"""plots.save_figure lays a figure out fewer times than savefig(bbox_inches="tight"), and plots.axes_off
hides more than set_axis_off: the PNGs must stay what savefig's "tight" crop of set_axis_off panels gave."""
import numpy as np
from PIL import Image

from plankton import plots


def titled_image_grid(hide):
    fig, axes = plots.pyplot().subplots(2, 3, figsize=(5, 4))
    for n, ax in enumerate(axes.flat):
        hide(ax)
        ax.imshow(np.arange(64).reshape(8, 8) * (n + 1) % 7, interpolation="nearest")
        ax.set_title(f"class {n} → class {n + 1}\nscore 0.{n}1", fontsize=8)
    fig.suptitle("a grid of titled thumbnails")
    fig.tight_layout()
    return fig


def constrained_with_colourbar_and_legend(hide):
    fig, axes = plots.pyplot().subplots(1, 2, figsize=(7, 3), layout="constrained")
    image = axes[0].imshow(np.eye(4))
    fig.colorbar(image, ax=axes[0])
    plots.class_ticks(axes[0], ["Chaetoceros_curvisetus_chain", "detritus", "Rhabdonellidae", "x"])
    axes[1].semilogy(np.geomspace(1e-9, 1, 30), label="eigenvalues")
    axes[1].legend(loc="best")
    fig.suptitle("constrained layout")
    return fig


def pixels(path):
    return np.asarray(Image.open(path))


def test_saved_figures_are_savefigs_tight_crop_pixel_for_pixel(tmp_path):
    for make in (titled_image_grid, constrained_with_colourbar_and_legend):
        reference = make(lambda ax: ax.set_axis_off())
        reference.savefig(tmp_path / "tight.png", format="png", dpi=plots.SAVE_DPI, bbox_inches="tight")
        plots.pyplot().close(reference)
        plots.save_figure(make(plots.axes_off), tmp_path / "saved.png")
        tight, saved = pixels(tmp_path / "tight.png"), pixels(tmp_path / "saved.png")
        assert tight.shape == saved.shape, make.__name__
        assert (tight == saved).all(), make.__name__


def test_the_weights_note_grows_the_crop_and_an_empty_figure_is_the_note_alone(tmp_path):
    plots.note_trunk_weights("random initialisation (WEIGHTS=None)")
    try:
        plots.save_figure(titled_image_grid(plots.axes_off), tmp_path / "noted.png")
        plots.save_figure(plots.pyplot().figure(), tmp_path / "empty.png")
    finally:
        plots.note_trunk_weights("ImageNet")
    plots.save_figure(titled_image_grid(plots.axes_off), tmp_path / "plain.png")
    noted, plain, empty = pixels(tmp_path / "noted.png"), pixels(tmp_path / "plain.png"), pixels(tmp_path / "empty.png")
    assert noted.shape[1] == plain.shape[1] and noted.shape[0] > plain.shape[0]
    red = (noted[..., 0] > 100) & (noted[..., 1] < 60) & (noted[..., 2] < 60)  # the note is dark red
    assert red[plain.shape[0]:].any() and not red[:plain.shape[0] - 20].any()
    assert empty.shape[0] < 60 and empty.shape[1] > 4 * empty.shape[0]  # one line of text, not a blank figure


def test_the_weights_note_sits_below_a_legend_anchored_to_the_figures_bottom(tmp_path):
    fig, ax = plots.pyplot().subplots(figsize=(5, 3))
    ax.plot([1, 3, 2], color="grey")
    fig.legend([plots.pyplot().Line2D([], [], color=(0, 0, 1), lw=4)], ["condition"], loc="lower center")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    plots.note_trunk_weights("random initialisation (WEIGHTS=None)")
    try:
        plots.save_figure(fig, tmp_path / "legend.png")
    finally:
        plots.note_trunk_weights("ImageNet")
    png = pixels(tmp_path / "legend.png")[..., :3].astype(int)
    blue_rows = np.where(((png[..., 2] > 200) & (png[..., 0] < 60) & (png[..., 1] < 60)).any(1))[0]
    red_rows = np.where(((png[..., 0] > 100) & (png[..., 1] < 60) & (png[..., 2] < 60)).any(1))[0]
    assert len(blue_rows) and len(red_rows), "the legend's line or the note is missing"
    assert blue_rows.max() < red_rows.min(), "the note is under the legend"
