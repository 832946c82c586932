"""Figures: matplotlib on the file-only backend, class-name ticks that never overlap, class colours,
and saving a PNG that says which trunk weights made it when they are not ImageNet's."""
import contextlib
from pathlib import Path

from plankton import fileio


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def class_ticks(ax, class_names: list[str]) -> None:
    """Class names on both axes of a class x class matrix; long names slanted so they never overlap."""
    slant = max(map(len, class_names)) > 3
    ax.set_xticks(range(len(class_names)), class_names, rotation=45 if slant else 0, ha="right" if slant else "center")
    ax.set_yticks(range(len(class_names)), class_names)


def axes_off(ax) -> None:
    """ax.set_axis_off(), and its x and y axes hidden too: the same picture, but matplotlib no longer lays
    out the invisible tick labels of a titled panel to place its title (an image grid's main cost,
    paid in every layout pass: tight_layout, the tight bounding box and the drawing)."""
    ax.set_axis_off()
    ax.xaxis.set_visible(False)
    ax.yaxis.set_visible(False)


FIGURE_NOTE = {"text": ""}  # set by note_trunk_weights once a stage knows which weights made its numbers


def note_trunk_weights(weights_source: str) -> None:
    """Every figure saved from now on says which trunk weights made it, unless they are ImageNet's:
    a random trunk's figures look like results, and a reader of a report must not take them for any."""
    pretrained = weights_source.startswith("ImageNet")
    FIGURE_NOTE["text"] = "" if pretrained else f"Trunk weights: {weights_source}, not ImageNet-pretrained"


SAVE_DPI = 110  # pixels per inch of the saved PNGs
SAVE_PAD = 0.1  # inches of margin around the drawn artists (matplotlib's savefig.pad_inches)
PNG_COMPRESS_LEVEL = 3  # zlib level: 0.72x zlib's default 6's encoding time for 7 % more bytes (same pixels)


def save_figure(fig, path: Path) -> None:
    """The PNG of fig cropped to what it draws (as savefig's bbox_inches="tight"), with the trunk-weights
    note under everything when there is one; then fig is closed. savefig's "tight" lays the figure out
    twice (a draw without output, then the bounding box) before drawing it: here the bounding box is
    laid out once, at the saving dpi, and the note is placed from that same box."""
    from matplotlib.transforms import Bbox
    with _dpi(fig, SAVE_DPI):
        renderer = fig.canvas.get_renderer()
        if fig.get_layout_engine() is not None:
            fig.get_layout_engine().execute(fig)  # constrained layout: what the first draw would do
        box = fig.get_tightbbox(renderer)
        if FIGURE_NOTE["text"]:  # below everything else (long slanted tick labels too); the crop grows to hold it
            for legend in fig.legends:  # one anchored to the figure would follow the crop's edge down onto the note
                if legend.get_bbox_to_anchor() is fig.bbox:
                    legend.set_bbox_to_anchor((0, 0, 1, 1), fig.transFigure)  # where it was laid out
            note = fig.text(0.5, min(0.0, box.y0 / fig.get_figheight()) - 0.02, FIGURE_NOTE["text"], ha="center",
                            va="top", fontsize=8, color="darkred")
            if box.bounds == fig.bbox_inches.bounds:  # maybe nothing else drawn (matplotlib then answers the
                box = fig.get_tightbbox(renderer)     # whole figure): the note alone, as savefig would crop it
            else:
                box = Bbox.union([box, Bbox(note.get_window_extent(renderer).get_points() / SAVE_DPI)])
    fig.set_layout_engine(None)  # laid out above: savefig need not lay it out again
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=SAVE_DPI, bbox_inches=box.padded(SAVE_PAD),
                    pil_kwargs=dict(compress_level=PNG_COMPRESS_LEVEL))
    pyplot().close(fig)


@contextlib.contextmanager
def _dpi(fig, dpi: float):
    """fig laid out at `dpi` meanwhile (text extents depend on it), as savefig does."""
    before = fig.dpi
    fig.dpi = dpi
    try:
        yield
    finally:
        fig.dpi = before


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


def thumbnail_sheet(root, relpaths: list[str], columns: int, cell: tuple[float, float], extra_height: float):
    """A contact sheet: root/relpath's thumbnails (images.thumbnail) in reading order, `columns` a row
    at most, each cell `cell` inches (width, height), axes off. Returns (the figure, one axes per image,
    in order) for the caller's captions and title."""
    from plankton import images  # here: images.py is a heavier import than the figures need
    columns = max(1, min(columns, len(relpaths)))
    rows = max(1, -(-len(relpaths) // columns))
    fig, axes = pyplot().subplots(rows, columns, figsize=(cell[0] * columns + 0.4, cell[1] * rows + extra_height),
                                  squeeze=False)
    for ax in axes.flat:
        axes_off(ax)
    for ax, relpath in zip(axes.flat, relpaths):
        pixels = images.thumbnail(Path(root) / relpath)
        ax.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 64 else "antialiased")
    return fig, list(axes.flat)[:len(relpaths)]
