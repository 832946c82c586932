"""The embeddings tables (outputs/embeddings_<subset>.pkl, with Parquet/CSV copies) and the UMAP
coordinates: written and read here only, each refused unless made from the current checkpoint."""
from pathlib import Path

import numpy as np
import pandas as pd

from plankton import labelsets, safepickle
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, save_csv
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.plots import note_trunk_weights
from plankton.provenance import stale_outputs

EMBEDDED_SUBSETS = ("train", "test", "unseen")


META_COLUMNS = ["label", "class_name", "path"]


EMBEDDING_PREFIX = "e"


def embeddings_frame(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                     relpaths: list[str], attrs: dict, label_texts: list[str] | None = None,
                     label_counts: np.ndarray | None = None) -> pd.DataFrame:
    """label, class_name, path, e0..e<d-1> (float32); attrs record where the numbers came from.
    Multi-label (`labels` a multi-hot matrix, `label_texts` each image's whole label set): label and
    class_name are the image's rarest label among `class_names` (fewest images of the split carry it:
    `label_counts`), and a `labels` column after path
    holds its whole set ("1;3;5", seen labels of a held-out image included)."""
    columns = [f"{EMBEDDING_PREFIX}{i}" for i in range(embeddings.shape[1])]
    frame = pd.DataFrame(embeddings.astype(np.float32), columns=columns)
    if label_texts is not None:
        frame.insert(0, "labels", list(label_texts))
        labels = labelsets.rarest_labels(labels, label_counts)
    frame.insert(0, "path", relpaths)
    frame.insert(0, "class_name", [class_names[i] for i in labels])
    frame.insert(0, "label", labels.astype(np.int64))
    frame.attrs.update(attrs)
    return frame


def save_embeddings(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        safepickle.save_dataframe(frame, tmp)  # in the form safepickle.load_dataframe reads back


def export_table(frame: pd.DataFrame, path: Path, csv: bool = False) -> list[Path]:
    """A table also for tools outside Python: <path>.parquet always (with pyarrow; frame.attrs go into
    its metadata), <path>.csv too when asked. Returns the files written."""
    written = [path.with_suffix(".parquet")]
    with atomic_path(written[0]) as tmp:
        frame.to_parquet(tmp, index=False)
    if csv:
        written.append(path.with_suffix(".csv"))
        save_csv(frame, written[1], index=False)
    return written


def embedding_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if str(c).startswith(EMBEDDING_PREFIX) and str(c)[1:].isdigit()]


def embedding_matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame[embedding_columns(frame)].to_numpy()


def open_embeddings(paths: Paths, subset: str) -> pd.DataFrame:
    """One subset's embeddings, refused unless they were made from the current best.pth."""
    if not paths.best.is_file():
        raise PipelineError(f"no checkpoint at {paths.best} — run train.py first")
    path = paths.embeddings(subset)
    if not path.is_file():
        raise PipelineError(f"no embeddings at {path} — run embed.py first")
    try:
        frame = safepickle.load_dataframe(path)  # never runs code from the file
    except safepickle.UnsafePickle as err:  # crafted, truncated or not a pickle; the message names the file
        raise PipelineError(f"refused to read {err}; re-run embed.py")
    if not isinstance(frame, pd.DataFrame) or list(frame.columns[:3]) != META_COLUMNS:
        raise PipelineError(f"{path} is not an embeddings table from embed.py; re-run embed.py")
    if frame.attrs.get("checkpoint_sha256") != file_sha256(paths.best):
        raise PipelineError(f"{path} was made from another checkpoint than the current {paths.best} — "
                            f"re-run embed.py")
    note_trunk_weights(frame.attrs.get("weights_source", "unknown (not recorded)"))
    return frame


UMAP_COLUMNS = ["label", "class_name", "path", "subset", "x", "y"]


def open_umap_coordinates(paths: Paths) -> pd.DataFrame:
    """umap_coordinates.csv, refused unless dimensionality_reduction.py's provenance vouches for it
    (written by the recorded run, from the current best.pth and embeddings)."""
    path = paths.umap_coordinates
    if not path.is_file():
        raise PipelineError(f"no UMAP coordinates at {path} — run dimensionality_reduction.py first")
    if str(path) in stale_outputs(paths, "dimensionality_reduction"):
        raise PipelineError(f"{path} was not made from the current checkpoint and embeddings (or its provenance "
                            f"record is missing) — re-run dimensionality_reduction.py")
    try:
        coords = pd.read_csv(path, dtype={"path": str, "class_name": str, "subset": str}, keep_default_na=False)
    except ValueError as err:
        raise PipelineError(f"cannot read {path} ({str(err).strip().splitlines()[0]}); re-run dimensionality_reduction.py")
    if list(coords.columns) != UMAP_COLUMNS:
        raise PipelineError(f"{path} has columns {list(coords.columns)}, not {UMAP_COLUMNS}; re-run dimensionality_reduction.py")
    return coords
