"""For chosen seen classes (or labels, TASK="multilabel"), the test images with the highest and the
lowest score for that class, from the predictions evaluate.py saved (nothing is recomputed).

    python ranked_images.py
    python ranked_images.py --RANKED_CLASSES="['3', '5']" --RANKED_AMONG=all

Reads:  outputs/test_scores.npz (checked against checkpoints/best.pth), the test images.
Writes: outputs/ranked_<class index>_<class name>.png for each class of RANKED_CLASSES ([] = every
        seen class): 2 rows x 10, the highest scores (top row, highest first) and the lowest (bottom
        row, lowest first), each captioned with its true class and score; last
        outputs/provenance_ranked_images.json (see plankton/provenance.py).

RANKED_AMONG = "class" ranks a class's score among its own test images (its surest and its least
sure members); "all" among every test image (which images the model scores highest for the class,
whatever their true class). A class with fewer test images than 10 shows them all in both rows.

Multi-label runs (as companion study 003): the same figures per seen label, ranked by the label's
sigmoid score; "class" ranks among the test images carrying the label, "all" among every test
image, and each caption gives the image's whole label set (green when it carries the label).
"""
import re
import textwrap
from pathlib import Path

import numpy as np

from plankton import images, locations, plots, provenance, registry, runner, saved_predictions
from plankton.errors import PipelineError

SHOWN = 10  # images per row




def members(labels: np.ndarray, class_index: int) -> np.ndarray:
    """True for the test images of the class: their class index (labels of shape (n,)) or, for a
    multi-hot matrix (n x labels), every image carrying the label."""
    return labels == class_index if labels.ndim == 1 else labels[:, class_index] > 0


def ranked(scores: np.ndarray, labels: np.ndarray, class_index: int, among: str,
           count: int = SHOWN) -> tuple[np.ndarray, np.ndarray]:
    """(highest, lowest): indices of the `count` images with the highest score for `class_index`,
    highest first, and of the `count` with the lowest, lowest first; among the class's own test
    images ("class": for multi-hot labels, those carrying the label) or all of them ("all"). Ties
    keep the file order."""
    candidates = np.flatnonzero(members(labels, class_index)) if among == "class" else np.arange(len(labels))
    highest_first = candidates[np.argsort(-scores[candidates, class_index], kind="stable")]
    lowest_first = candidates[np.argsort(scores[candidates, class_index], kind="stable")]
    return highest_first[:count], lowest_first[:count]


def chosen_classes(setting: list[str], class_names: list[str]) -> list[int]:
    """Indices of the classes RANKED_CLASSES names ([] = all); a name that is no seen class is an error."""
    unknown = [name for name in setting if name not in class_names]
    if unknown:
        raise PipelineError(f"RANKED_CLASSES={setting!r}: {', '.join(map(repr, unknown))} not among the "
                                   f"seen classes ({', '.join(class_names)}); [] ranks every seen class")
    return [class_names.index(name) for name in setting] if setting else list(range(len(class_names)))


def file_name(class_index: int, class_name: str) -> str:
    """ranked_<index>_<name>.png with every character but letters, digits, '.', '-' and '_' made '_'."""
    return f"ranked_{class_index}_{re.sub(r'[^A-Za-z0-9._-]', '_', class_name).strip('.') or 'class'}.png"


def load_pictures(predictions: saved_predictions.Predictions, indices, root: Path) -> dict[int, object]:
    """Every image to be shown, decoded before anything is written; a missing one is one error line."""
    pictures = {}
    for i in sorted(set(int(j) for j in indices)):
        path = root / predictions.relpaths[i]
        try:
            pictures[i] = images.load_rgb(path)
        except (OSError, ValueError) as err:
            raise PipelineError(f"cannot read {path} ({type(err).__name__}), shown in the ranked images; "
                                       f"restore it, or re-run train.py and evaluate.py on the current images")
    return pictures


def score_text(score: float) -> str:
    """A score with the digits that tell near-0 and near-1 scores apart: 2.3e-08, 0.412, 1 - 2.0e-05
    (a saturated softmax reads "1 - 0": the caption's logit still ranks it)."""
    if score < 0.001:
        return f"{score:.1e}"
    if score <= 0.999:
        return f"{score:.3f}"
    return f"1 - {1 - score:.1e}" if score < 1 else "1 - 0"


def caption_truth(predictions: saved_predictions.Predictions, i: int, class_index: int) -> tuple[str, bool]:
    """(the image's true class, or "labels a+b" for a multi-label run; whether it is of the class)."""
    names = np.asarray(predictions.class_names)
    if predictions.task == "multiclass":
        return f"true {names[predictions.labels[i]]}", bool(predictions.labels[i] == class_index)
    carried = names[predictions.labels[i] > 0]
    return f"labels {'+'.join(carried) or '(none)'}", bool(predictions.labels[i, class_index] > 0)


def plot_ranked(predictions: saved_predictions.Predictions, class_index: int, rows: tuple, pictures: dict,
                among: str, path) -> None:
    plt = plots.pyplot()
    name = predictions.class_names[class_index]
    multilabel = predictions.task != "multiclass"
    noun, score = ("label", "sigmoid score") if multilabel else ("class", "softmax score")
    fig, axes = plt.subplots(2, SHOWN, figsize=(1.7 * SHOWN, 6.0), squeeze=False)
    for r, (indices, label) in enumerate(zip(rows, ("highest", "lowest"))):
        for c, ax in enumerate(axes[r]):
            plots.axes_off(ax)
            if c >= len(indices):
                continue
            i = int(indices[c])
            ax.imshow(pictures[i], interpolation="nearest")
            truth, carries = caption_truth(predictions, i, class_index)
            ax.set_title("\n".join(textwrap.wrap(truth, 18)[:2]) +
                         f"\nscore {score_text(predictions.scores[i, class_index])}"
                         f"\nlogit {predictions.logits[i, class_index]:.2f}", fontsize=8,
                         color="darkgreen" if carries else "firebrick")
        axes[r, 0].text(-0.15, 0.5, f"{label} {name} score", transform=axes[r, 0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=10)
    n_class = int(members(predictions.labels, class_index).sum())
    pool = f"the {n_class} test image{'s' * (n_class != 1)} {'carrying it' if multilabel else 'of the class'}" \
        if among == "class" else f"all {len(predictions.labels)} test images"
    truth = f"the image's labels, green when it carries {name}" if multilabel else f"true class, green when it is {name}"
    fig.suptitle(f"{noun.capitalize()} {name}: test images with the highest (top row) and lowest (bottom row) {score} "
                 f"for {name}, among {pool}\n(caption: {truth}; score and logit for {name})", fontsize=11)
    fig.tight_layout()
    plots.save_figure(fig, path)


def run(cfg) -> None:
    registry.require_task("ranked_images", cfg.TASK)
    paths = locations.prepare_output_dirs(cfg)
    predictions = saved_predictions.open_predictions(paths)
    classes = chosen_classes(list(cfg.RANKED_CLASSES), predictions.class_names)
    selections = {c: ranked(predictions.scores, predictions.labels, c, cfg.RANKED_AMONG) for c in classes}
    pictures = load_pictures(predictions, [i for rows in selections.values() for part in rows for i in part],
                             Path(predictions.data_dir))
    inputs = provenance.start_stage(paths, "ranked_images", [paths.best, paths.scores])
    outputs = []
    for c, rows in selections.items():
        outputs.append(paths.out / file_name(c, predictions.class_names[c]))
        plot_ranked(predictions, c, rows, pictures, cfg.RANKED_AMONG, outputs[-1])
    provenance.save_provenance(paths, "ranked_images", inputs, outputs, cfg)
    print(f"ranked test images (among {cfg.RANKED_AMONG}) for {len(outputs)} class(es) -> "
          f"{outputs[0] if len(outputs) == 1 else paths.out / 'ranked_*.png'}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
