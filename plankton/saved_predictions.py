"""The test set's saved logits and scores (outputs/test_scores.npz and test_predictions.csv):
computed from a trained model, written, and read back only if made from the current checkpoint."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from plankton import checkpoints, labelsets, tasks
from plankton.checkpoints import open_checkpoint
from plankton.embedding_files import export_table
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, save_csv
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.plots import note_trunk_weights


@dataclass
class Predictions:
    """Every test image's logits and softmax scores, in the split's test order, and where they came from."""
    logits: np.ndarray  # float32, images x classes
    scores: np.ndarray  # float32 softmax of the logits
    labels: np.ndarray  # int64 true class index
    relpaths: list[str]
    class_names: list[str]
    data_dir: str
    checkpoint_sha256: str
    task: str = "multiclass"  # "multilabel": labels is a multi-hot matrix, scores are sigmoids

    @property
    def predicted(self) -> np.ndarray:
        """The arg-max class index of each image, or (multilabel) a 0/1 matrix: score >= 0.5."""
        return self.logits.argmax(1) if self.task == "multiclass" else (self.logits >= 0).astype(np.int64)


PREDICTION_ARRAYS = ("logits", "scores", "labels", "relpaths", "class_names", "data_dir", "checkpoint_sha256")


def save_predictions(paths: Paths, predictions: Predictions) -> list[Path]:
    """test_scores.npz (exact, for reuse) and test_predictions.csv (path, true_class, predicted_class,
    score_<class> for each class; multilabel: path, true_labels, predicted_labels (score >= 0.5,
    joined by ";"), score_<label>) with its .parquet copy, each written atomically. Returns the paths."""
    p = predictions
    arrays = dict(logits=p.logits.astype(np.float32), scores=p.scores.astype(np.float32),
                  labels=p.labels.astype(np.int64), relpaths=np.array(p.relpaths, dtype=str),
                  class_names=np.array(p.class_names, dtype=str), data_dir=np.array(p.data_dir),
                  checkpoint_sha256=np.array(p.checkpoint_sha256))
    if p.task != "multiclass":  # a single-label file stays as it was before TASK
        arrays["task"] = np.array(p.task)
    with atomic_path(paths.scores) as tmp, open(tmp, "wb") as handle:  # a handle: savez adds no ".npz"
        np.savez(handle, **arrays)
    if p.task == "multiclass":
        table = pd.DataFrame(dict(path=p.relpaths, true_class=[p.class_names[i] for i in p.labels],
                                  predicted_class=[p.class_names[i] for i in p.predicted]))
    else:
        def joined(matrix):
            return [labelsets.LABEL_SEPARATOR.join(np.asarray(p.class_names)[row > 0]) for row in matrix]
        table = pd.DataFrame(dict(path=p.relpaths, true_labels=joined(p.labels), predicted_labels=joined(p.predicted)))
    for i, name in enumerate(p.class_names):
        table[f"score_{name}"] = p.scores[:, i]
    save_csv(table, paths.predictions, index=False)
    return [paths.predictions, paths.scores] + export_table(table, paths.predictions)  # + .parquet


def open_predictions(paths: Paths) -> Predictions:
    """The saved test predictions, refused unless made from the current best.pth."""
    if not paths.best.is_file():
        raise PipelineError(f"no checkpoint at {paths.best} — run train.py first")
    if not paths.scores.is_file():
        raise PipelineError(f"no test predictions at {paths.scores} — run evaluate.py first")
    try:
        with np.load(paths.scores, allow_pickle=False) as stored:  # arrays only, never code
            arrays = {name: stored[name] for name in PREDICTION_ARRAYS}
            task = str(stored["task"]) if "task" in stored.files else "multiclass"
    except (OSError, ValueError, KeyError, EOFError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PipelineError(f"cannot read {paths.scores} ({first_line}); re-run evaluate.py")
    predictions = checked_predictions(arrays, task, paths.scores)
    if predictions.checkpoint_sha256 != file_sha256(paths.best):
        raise PipelineError(f"{paths.scores} was made from another checkpoint than the current {paths.best} — "
                            f"re-run evaluate.py")
    note_trunk_weights(open_checkpoint(paths.best).weights_source)
    return predictions


def checked_predictions(arrays: dict, task: str, path: Path) -> Predictions:
    """The arrays of a scores file as Predictions, after checking what np.load cannot: kinds, shapes,
    finite values, labels that index the classes. One error line naming the file otherwise."""
    def bad(what: str):
        raise PipelineError(f"{path} is not a scores file from evaluate.py ({what}); re-run evaluate.py")
    if task not in tasks.ALL_TASKS:
        bad(f"task {task!r}")
    for name in ("relpaths", "class_names", "data_dir", "checkpoint_sha256"):
        if arrays[name].dtype.kind != "U":
            bad(f"{name} is not text")
    if arrays["relpaths"].ndim != 1 or arrays["class_names"].ndim != 1 or arrays["data_dir"].ndim != 0:
        bad("its names have the wrong shape")
    n, k = len(arrays["relpaths"]), len(arrays["class_names"])
    for name in ("logits", "scores"):
        if arrays[name].dtype.kind != "f" or arrays[name].shape != (n, k):
            bad(f"{name} is not {n} x {k} real numbers")
        if not np.isfinite(arrays[name]).all():
            bad(f"{name} holds NaN or infinite values")
    labels = arrays["labels"]
    if labels.dtype.kind not in "iu" or labels.shape != ((n,) if task == "multiclass" else (n, k)):
        bad(f"labels are not {n} whole numbers" if task == "multiclass" else f"labels are not an {n} x {k} 0/1 matrix")
    if labels.size and (labels.min() < 0 or labels.max() >= (k if task == "multiclass" else 2)):
        bad("labels out of range")
    return Predictions(arrays["logits"], arrays["scores"], labels, arrays["relpaths"].tolist(),
                       arrays["class_names"].tolist(), str(arrays["data_dir"]), str(arrays["checkpoint_sha256"]), task)


def predict_test_set(trained: checkpoints.TrainedModel, cache, runtime) -> "Predictions":
    """Logits and scores (softmax, or sigmoid for multilabel) of every test image (through `cache`, a
    trunk_cache.TrunkCache, or from the images when it is None), in the split's test order."""
    logits, _, labels = trained.outputs("test", cache, runtime)  # averaged over TTA's orientations
    relpaths, _ = trained.split.subset("test")
    task = tasks.for_name(trained.split.task)
    return Predictions(logits.astype(np.float32), task.scores(logits), labels, relpaths,
                                 trained.class_names, str(trained.split.root), trained.sha256,
                                 task.name)
