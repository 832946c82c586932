"""The embeddings tables (outputs/embeddings_<subset>.pkl, with Parquet/CSV copies) and the UMAP
coordinates: written and read here only, each refused unless made from the current checkpoint. A
table's attrs (where its numbers came from) are an EmbeddingsInfo: written and read through it."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from plankton import labelsets, projection, safepickle
from plankton.errors import PipelineError
from plankton.fileio import atomic_path, read_csv, save_csv
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.plots import note_trunk_weights
from plankton.provenance import read_record, stale_outputs

EMBEDDED_SUBSETS = ("train", "test", "unseen")


META_COLUMNS = ["label", "class_name", "path"]


EMBEDDING_PREFIX = "e"


@dataclass(frozen=True)
class EmbeddingsInfo:
    """Where an embeddings table came from: kept in its attrs (and the Parquet copy's metadata)."""
    checkpoint_sha256: str
    split_sha256: str
    subset: str
    class_names: tuple[str, ...]  # label i of the table is class_names[i]
    data_dir: str  # the images' folder; `path` is relative to it
    weights_source: str
    task: str

    def attrs(self) -> dict:
        return dict(dataclasses.asdict(self), class_names=list(self.class_names))

    @classmethod
    def of(cls, frame: pd.DataFrame, path: Path | str = "the embeddings table") -> "EmbeddingsInfo":
        """The table's attrs, each checked; one error line naming the file otherwise."""
        attrs, fields = frame.attrs, [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in fields if name not in attrs]
        names = attrs.get("class_names")
        if missing or not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names) \
                or not all(isinstance(attrs[name], str) for name in fields if name != "class_names"):
            raise PipelineError(f"{path} does not record where it came from "
                                f"({'no ' + ', '.join(missing) if missing else 'malformed attrs'}); re-run embed.py")
        return cls(**{name: attrs[name] for name in fields if name != "class_names"}, class_names=tuple(names))


def info(frame: pd.DataFrame) -> EmbeddingsInfo:
    """The EmbeddingsInfo of a table open_embeddings returned (checked there)."""
    return EmbeddingsInfo.of(frame)


def embeddings_frame(embeddings: np.ndarray, labels: np.ndarray, class_names: list[str],
                     relpaths: list[str], source: EmbeddingsInfo, label_texts: list[str] | None = None,
                     label_counts: np.ndarray | None = None) -> pd.DataFrame:
    """label, class_name, path, e0..e<d-1> (float32); attrs: `source`, where the numbers came from.
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
    frame.attrs.update(source.attrs())
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
    source = EmbeddingsInfo.of(frame, path)
    if source.checkpoint_sha256 != file_sha256(paths.best):
        raise PipelineError(f"{path} was made from another checkpoint than the current {paths.best} — "
                            f"re-run embed.py")
    check_table(frame, source, path)
    note_trunk_weights(source.weights_source)
    return frame


def check_table(frame: pd.DataFrame, source: EmbeddingsInfo, path: Path) -> None:
    """Columns, types and values as embeddings_frame writes them: labels index class_names and agree
    with class_name; the embedding columns are finite numbers."""
    redo = "re-run embed.py"
    columns = embedding_columns(frame)
    if not columns or not all(pd.api.types.is_float_dtype(frame[c]) for c in columns):
        raise PipelineError(f"{path}: its embedding columns are missing or not numbers; {redo}")
    if not np.isfinite(frame[columns].to_numpy()).all():
        raise PipelineError(f"{path}: its embeddings hold NaN or infinite values; {redo}")
    labels = frame["label"]
    if not pd.api.types.is_integer_dtype(labels) or (len(labels) and not labels.between(0, len(source.class_names) - 1).all()):
        raise PipelineError(f"{path}: its labels are not indices into its {len(source.class_names)} class names; {redo}")
    if [source.class_names[i] for i in labels] != list(frame["class_name"]):
        raise PipelineError(f"{path}: its class_name column disagrees with its labels; {redo}")


UMAP_COLUMNS = ["label", "class_name", "path", "subset", "x", "y"]  # <method>_coordinates.csv, whichever DIMRED


def projection_method(paths: Paths) -> str | None:
    """Which method of projection.METHODS dimensionality_reduction.py's record says it ran (the one
    whose <method>_coordinates.csv it wrote), or None without a readable record naming one."""
    try:
        record = read_record(paths, "dimensionality_reduction")
    except PipelineError:
        return None
    ran = [m for m in projection.METHODS if projection.coordinates_name(m) in (record.outputs if record else {})]
    return ran[0] if ran else None


def open_projection_coordinates(paths: Paths) -> tuple[str, pd.DataFrame]:
    """The 2-d plane dimensionality_reduction.py made last (DIMRED: umap, tsne or pca) and its
    <method>_coordinates.csv, refused unless its provenance vouches for it (written by the recorded
    run, from the current best.pth and embeddings)."""
    method = projection_method(paths)
    if method is None:
        raise PipelineError(f"no 2-d coordinates (umap_coordinates.csv or another DIMRED's) recorded in {paths.out} "
                            f"— run dimensionality_reduction.py first")
    return method, open_coordinates(paths, method)


def open_umap_coordinates(paths: Paths) -> pd.DataFrame:
    """umap_coordinates.csv (DIMRED="umap"), vouched for by dimensionality_reduction.py's provenance."""
    return open_coordinates(paths, "umap")


def open_coordinates(paths: Paths, method: str) -> pd.DataFrame:
    path = paths.coordinates(method)
    if not path.is_file():
        raise PipelineError(f"no {method} coordinates at {path} — run dimensionality_reduction.py "
                            f"(with DIMRED={method!r}) first")
    if str(path) in stale_outputs(paths, "dimensionality_reduction"):
        raise PipelineError(f"{path} was not made from the current checkpoint and embeddings (or its provenance "
                            f"record is missing) — re-run dimensionality_reduction.py")
    try:
        coords = read_csv(path, dtype={"path": str, "class_name": str, "subset": str}, keep_default_na=False)
    except ValueError as err:
        raise PipelineError(f"cannot read {path} ({str(err).strip().splitlines()[0]}); re-run dimensionality_reduction.py")
    if list(coords.columns) != UMAP_COLUMNS:
        raise PipelineError(f"{path} has columns {list(coords.columns)}, not {UMAP_COLUMNS}; re-run dimensionality_reduction.py")
    return coords
