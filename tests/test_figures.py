"""What a reader of the report sees: the trunk-weights footnote never covers long, slanted class
names (real plankton names are long)."""
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from plankton import plots

LONG_NAMES = ["Thalassionematales_very_long_name", "Rhabdonellidae", "Chaetoceros_curvisetus_chain", "detritus"]


def test_the_weights_footnote_sits_below_long_slanted_class_names(tmp_path):
    plots.note_trunk_weights("random initialisation (WEIGHTS=None)")
    try:
        plt = plots.pyplot()
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.imshow(np.eye(len(LONG_NAMES)))
        plots.class_ticks(ax, LONG_NAMES)  # no tight_layout: the slanted names hang below the canvas
        plots.save_figure(fig, tmp_path / "matrix.png")
        renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed: a canvas of its own
        note = fig.texts[-1]
        assert note.get_text().startswith("Trunk weights:")
        note_box = note.get_window_extent(renderer)
        labels = [t.get_window_extent(renderer) for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
        assert len(labels) == 2 * len(LONG_NAMES)
        assert all(note_box.y1 <= box.y0 for box in labels), "the footnote overlaps a class name"
    finally:
        plots.note_trunk_weights("ImageNet")


def test_ranked_image_scores_are_written_so_that_near_one_scores_still_differ():
    import ranked_images
    texts = [ranked_images.score_text(s) for s in (2.3e-8, 0.5, 0.99998, 0.9999, 1.0)]
    assert texts == ["2.3e-08", "0.500", "1 - 2.0e-05", "1 - 1.0e-04", "1 - 0"]
    assert len(set(texts)) == len(texts)  # "1." for both near-one scores ranked nothing
