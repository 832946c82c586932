"""The model bundle, one owner: the only module that knows its keys. One file, model_bundle.pt, that
another lab predicts with on a machine without the training images, the split or the checkpoints:

    bundle = bundles.open_bundle("model_bundle.pt")   # checked key by key, its SHA-256 recomputed
    trained, fitted = bundle.trained_model(device), bundle.fitted()

It holds best.pth's record as it is (trunk id, weights source, the whole model's tensors so a random,
ImageNet or fine-tuned trunk comes back exactly, the head, class names, preprocessing), and what
predict.py otherwise derives from the split (fit_from_run): the open-set score's name and unknown
threshold, the temperature, the per-class routing thresholds, the kNN/Mahalanobis reference (training
embeddings with their labels, class means, precision), the settings it was exported with, and a
SHA-256 of all of that (hashing.record_sha256). Tensors and plain values only, so it opens with
torch.load(weights_only=True): a crafted file runs no code. Also the optional ONNX export of the
model (trunk + head -> logits, embeddings).
"""
import contextlib
import math
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import backbone
from plankton import abundance, calibrate, checkpoints, fileio, openset, orientations, routing
from plankton.errors import PipelineError
from plankton.hashing import record_sha256
from plankton.plots import note_trunk_weights

FORMAT = "plankton model bundle"  # the marker that tells a bundle from any other torch file
VERSION = 1
FILE_NAME = "model_bundle.pt"
BUNDLE_KEYS = ("format", "version", "checkpoint", "checkpoint_sha256", "open_set", "reference", "temperature",
               "class_thresholds", "settings", "code_version", "sha256")
OPEN_SET_KEYS = ("score", "threshold", "keep", "val_images", "val_kept")
REFERENCE_KEYS = ("train_embeddings", "labels", "class_means", "precision", "k", "metric")
THRESHOLD_COLUMNS = ("threshold", "val_predicted", "val_confident", "val_precision", "note")
# the settings whose values the bundle fixes: predict.py uses the bundle's, whatever it is given
PREDICT_SETTINGS = ("PREDICT_SCORE", "PREDICT_KEEP", "ROUTE_PRECISION", "OPEN_SET_K", "OPEN_SET_KNN_METRIC",
                    "OPEN_SET_TRAIN_SAMPLES", "TTA")
REDO = "re-run export_model.py, or ask for a fresh copy of the bundle"


# ---- what predict.py compares new images with, from the run --------------------------------------

def fit_from_run(cfg, trained: checkpoints.TrainedModel, cache, runtime) -> dict:
    """From the split's train and val images: the open-set reference, the unknown threshold on the
    validation scores, the temperature fitted on the validation logits, and the per-class thresholds
    of ROUTE_PRECISION on the validation images. predict.py and export_model.py both use this."""
    reference = openset.reference_from_model(trained, cache, runtime, cfg)
    val_logits, val_embeddings, val_labels = openset.subset_outputs(trained, cache, runtime, "val")
    test_logits, test_embeddings, test_labels = openset.subset_outputs(trained, cache, runtime, "test")
    val_scores = openset.SCORES[cfg.PREDICT_SCORE](val_logits, val_embeddings, reference)
    threshold = openset.keep_threshold(val_scores, cfg.PREDICT_KEEP)
    choice = calibrate.choose_temperature(val_logits, val_labels, test_logits, test_labels)
    temperature = choice.temperature
    class_thresholds = routing.class_thresholds(calibrate.probabilities(val_logits, temperature), val_labels,
                                                trained.class_names, cfg.ROUTE_PRECISION)
    # predict.py's abundance corrections learn the classifier's mistakes on the val and test images kept as known
    held_scores = np.r_[val_scores, openset.SCORES[cfg.PREDICT_SCORE](test_logits, test_embeddings, reference)]
    held_out = abundance.held_out_images(np.r_[val_logits, test_logits], np.r_[val_labels, test_labels],
                                         held_scores <= threshold, temperature)
    return dict(reference=reference, threshold=threshold, val_images=len(val_labels), class_thresholds=class_thresholds,
                val_kept=float((val_scores <= threshold).mean()), temperature=temperature,
                temperature_note=choice.note, temperature_choice=choice.record(), held_out=held_out)


# ---- writing ------------------------------------------------------------------------------------

def _tensor(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values))


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value  # numpy scalars: torch.load refuses them


def bundle_record(cfg, trained: checkpoints.TrainedModel, fitted: dict) -> dict:
    """The bundle's contents (tensors and plain values), its SHA-256 last. `fitted`: fit_from_run's."""
    raw = checkpoints.load_checkpoint_file(trained.checkpoint.path)  # best.pth's record, key for key
    reference, table = fitted["reference"], fitted["class_thresholds"]
    record = dict(
        format=FORMAT, version=VERSION, checkpoint=raw, checkpoint_sha256=trained.sha256,
        open_set=dict(score=cfg.PREDICT_SCORE, threshold=float(fitted["threshold"]), keep=float(cfg.PREDICT_KEEP),
                      val_images=int(fitted["val_images"]), val_kept=float(fitted["val_kept"])),
        reference=dict(train_embeddings=_tensor(reference.train_embeddings), labels=_tensor(reference.labels),
                       class_means=_tensor(reference.class_means), precision=_tensor(reference.precision),
                       k=int(reference.k), metric=reference.metric),
        temperature=dict(value=float(fitted["temperature"]), note=str(fitted["temperature_note"])),
        class_thresholds=dict(route_precision=float(cfg.ROUTE_PRECISION), class_names=list(table.class_name),
                              **{c: [_plain(v) for v in table[c]] for c in THRESHOLD_COLUMNS}),
        settings=fileio.plain_json(vars(cfg)), code_version=trained.checkpoint.code_version)
    record["sha256"] = record_sha256(record)
    return record


# ---- reading: every key checked, each failure one line naming the file --------------------------

@dataclass(frozen=True)
class Bundle:
    """A model bundle's contents, each checked when it was opened."""
    path: Path
    checkpoint: checkpoints.Checkpoint  # the model: trunk, weights source, tensors, classes, preprocessing
    checkpoint_sha256: str  # of the best.pth it was exported from
    score: str  # openset.SCORES name behind the unknown flag
    threshold: float  # an image scoring above it is flagged unknown
    keep: float  # PREDICT_KEEP: the share of validation images the threshold keeps as known
    val_images: int
    val_kept: float
    reference: openset.Reference
    temperature: float
    temperature_note: str
    route_precision: float
    class_thresholds: pd.DataFrame  # routing.class_thresholds' table
    settings: dict  # the settings it was exported with
    code_version: str
    sha256: str  # of its contents (hashing.record_sha256), checked on opening

    @property
    def split_sha256(self) -> str:
        return self.checkpoint.split_sha256

    def fitted(self) -> dict:
        """What fit_from_run gives on the run the bundle was exported from."""
        return dict(reference=self.reference, threshold=self.threshold, val_images=self.val_images,
                    class_thresholds=self.class_thresholds, val_kept=self.val_kept, temperature=self.temperature,
                    temperature_note=self.temperature_note)

    def trained_model(self, device: torch.device, channels_last: bool = False) -> checkpoints.TrainedModel:
        """The model rebuilt on `device`, its frozen trunk checked against the recorded hash. It has no
        split: only the new images go through it."""
        with _bundle_advice():
            model = self.checkpoint.build_model(device, channels_last)
        if backbone.frozen_trunk_sha256(model) != self.checkpoint.trunk_sha256:
            raise PipelineError(f"{self.path}: its trunk weights are not the ones its recorded trunk_sha256 stands "
                                f"for; {REDO}")
        note_trunk_weights(self.checkpoint.weights_source)
        tta = self.settings.get("TTA", "none")  # its threshold and reference were made with these orientations
        if tta not in orientations.TTA:
            raise PipelineError(f"{self.path}: TTA={tta!r} is none of {', '.join(orientations.TTA)}; {REDO}")
        return checkpoints.TrainedModel(self.checkpoint, self.checkpoint_sha256, None, model,
                                        self.checkpoint.preprocess, orientations.TTA[tta])

    def predict_settings(self, cfg):
        """A copy of cfg with the bundle's values of PREDICT_SETTINGS (its threshold and reference were
        made with them); a note names each one that differed."""
        exported = {key: self.settings.get(key) for key in PREDICT_SETTINGS}
        exported.update(PREDICT_SCORE=self.score, PREDICT_KEEP=self.keep, ROUTE_PRECISION=self.route_precision,
                        OPEN_SET_KNN_METRIC=self.reference.metric)
        changed = [f"{key}={exported[key]!r} (given {getattr(cfg, key)!r})" for key in PREDICT_SETTINGS
                   if exported[key] is not None and exported[key] != getattr(cfg, key)]
        if changed:
            print(f"note: {self.path.name} was exported with {', '.join(changed)}: predicting with the bundle's values")
        return types.SimpleNamespace(**{**vars(cfg), **{k: v for k, v in exported.items() if v is not None}})


@contextlib.contextmanager
def _bundle_advice():
    """checkpoints.py's errors advise re-running train.py (the remedy for best.pth); for a bundle
    the remedy is another export."""
    try:
        yield
    except PipelineError as err:
        raise PipelineError(str(err).replace(checkpoints.REDO, REDO)) from None


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def bad(self, what: str):
        raise PipelineError(f"{self.path} is not a model bundle this pipeline can use: {what}; {REDO}")

    def keys(self, value, keys: tuple[str, ...], where: str) -> dict:
        if not isinstance(value, dict) or set(value) != set(keys):
            have = sorted(map(str, value)) if isinstance(value, dict) else type(value).__name__
            self.bad(f"{where} holds {have}, not {', '.join(keys)}")
        return value

    def number(self, where: str, value, low: float = -math.inf, high: float = math.inf, integer: bool = False,
               inf_ok: bool = False) -> float:
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            self.bad(f"{where} is {value!r}, not {'a whole number' if integer else 'a number'}")
        if not ((math.isfinite(value) and low <= value <= high) or (inf_ok and value == math.inf)):
            self.bad(f"{where} is {value!r}")
        return value

    def array(self, where: str, value, shape: tuple, integer: bool = False) -> np.ndarray:
        if not isinstance(value, torch.Tensor) or value.is_floating_point() == integer:
            self.bad(f"{where} is not a tensor of {'whole numbers' if integer else 'numbers'}")
        if len(shape) != value.dim() or any(want is not None and want != got for want, got in zip(shape, value.shape)):
            self.bad(f"{where} has shape {tuple(value.shape)}")
        if not integer and not bool(torch.isfinite(value).all()):
            self.bad(f"{where} holds NaN or infinite values")
        return value.numpy()


def bundle_from_record(raw, path: Path) -> Bundle:
    """A loaded bundle's values: its marker and version, its SHA-256 recomputed, then every part
    checked for type, shape and range against its model (classes, embedding size)."""
    check = _Checker(Path(path))
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        what = f"a {type(raw).__name__}" if not isinstance(raw, dict) else (
            "a checkpoint (give the model_bundle.pt that export_model.py writes)" if "model" in raw else
            f"no format marker {FORMAT!r}")
        check.bad(f"it holds {what}")
    check.keys(raw, BUNDLE_KEYS, "it")
    if raw["version"] != VERSION:
        check.bad(f"it is version {raw['version']!r}; this code reads version {VERSION}")
    try:
        content_sha256 = record_sha256({k: v for k, v in raw.items() if k != "sha256"})
    except TypeError as err:  # a value export_model.py never writes (a set, bytes, a number as a dict key)
        check.bad(str(err).replace("record_sha256: ", "it holds "))
    if content_sha256 != raw["sha256"]:
        raise PipelineError(f"{path}: its contents do not match its recorded SHA-256 (changed or damaged since it was "
                            f"exported); {REDO}")
    with _bundle_advice():
        checkpoint = checkpoints.checkpoint_from_record(raw["checkpoint"], Path(path))
    if checkpoint.task != "multiclass":
        check.bad(f"its model is for TASK={checkpoint.task!r}; predict.py predicts one class per image")
    classes, dim = len(checkpoint.class_names), checkpoint.arch["embedding_dim"]
    open_set = check.keys(raw["open_set"], OPEN_SET_KEYS, "'open_set'")
    if not isinstance(open_set["score"], str) or open_set["score"] not in openset.SCORES:
        check.bad(f"its open-set score {open_set['score']!r} is not one of {', '.join(openset.SCORES)}")
    ref = check.keys(raw["reference"], REFERENCE_KEYS, "'reference'")
    embeddings = check.array("reference train_embeddings", ref["train_embeddings"], (None, dim))
    labels = check.array("reference labels", ref["labels"], (len(embeddings),), integer=True)
    if len(embeddings) == 0 or labels.min() < 0 or labels.max() >= classes:
        check.bad("its reference embeddings are empty or labelled with classes it does not have")
    if ref["metric"] not in ("cosine", "euclidean"):
        check.bad(f"its kNN metric {ref['metric']!r} is not 'cosine' or 'euclidean'")
    reference = openset.Reference(
        embeddings, check.array("reference class_means", ref["class_means"], (classes, dim)),
        check.array("reference precision", ref["precision"], (dim, dim)),
        int(check.number("reference k", ref["k"], 1, len(embeddings), integer=True)), ref["metric"], labels)
    temperature = check.keys(raw["temperature"], ("value", "note"), "'temperature'")
    thresholds = check.keys(raw["class_thresholds"], ("route_precision", "class_names") + THRESHOLD_COLUMNS,
                            "'class_thresholds'")
    if thresholds["class_names"] != list(checkpoint.class_names) or not all(
            isinstance(thresholds[c], list) and len(thresholds[c]) == classes for c in THRESHOLD_COLUMNS):
        check.bad("its per-class thresholds are not one per class of its model")
    for name, value in zip(checkpoint.class_names, thresholds["threshold"]):
        check.number(f"the threshold of class {name!r}", value, 0.0, 1.0, inf_ok=True)
    if not isinstance(raw["settings"], dict):
        check.bad("'settings' is not a dict")
    if not all(isinstance(raw[k], str) for k in ("checkpoint_sha256", "code_version")) \
            or not isinstance(temperature["note"], str):
        check.bad("'checkpoint_sha256', 'code_version' or the temperature's note is not text")
    return Bundle(
        path=Path(path), checkpoint=checkpoint, checkpoint_sha256=raw["checkpoint_sha256"], score=open_set["score"],
        threshold=float(check.number("'open_set' threshold", open_set["threshold"])),
        keep=float(check.number("'open_set' keep", open_set["keep"], 1e-9, 1.0)),
        val_images=int(check.number("'open_set' val_images", open_set["val_images"], 1, integer=True)),
        val_kept=float(check.number("'open_set' val_kept", open_set["val_kept"], 0.0, 1.0)), reference=reference,
        temperature=float(check.number("the temperature", temperature["value"], 1e-9)),
        temperature_note=temperature["note"],
        route_precision=float(check.number("'class_thresholds' route_precision", thresholds["route_precision"],
                                           1e-9, 1.0)),
        class_thresholds=pd.DataFrame({"class_name": thresholds["class_names"],
                                       **{c: thresholds[c] for c in THRESHOLD_COLUMNS}}),
        settings=raw["settings"], code_version=raw["code_version"], sha256=raw["sha256"])


def open_bundle(path) -> Bundle:
    """A model bundle loaded safely (tensors and plain values only) and checked key by key, its
    SHA-256 recomputed: a missing, foreign, truncated or changed file is one error line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise PipelineError(f"no model bundle at {path}: give the {FILE_NAME} that export_model.py writes "
                            f"(OUTPUT_DIR/model_bundle/{FILE_NAME})")
    with _bundle_advice():
        raw = checkpoints.load_checkpoint_file(path)
    return bundle_from_record(raw, path)


# ---- ONNX ---------------------------------------------------------------------------------------

ONNX_OPSET = 17


def export_onnx(model: torch.nn.Module, image_size: int, path: Path) -> None:
    """The model (trunk + head) as ONNX: input "images" (N x 3 x size x size, normalised as the
    bundle's preprocessing says), outputs "logits" and "embeddings"; N is free. On the CPU, from a
    copy, so the caller's model stays where it is."""
    import copy
    import warnings
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        raise PipelineError("EXPORT_ONNX=True needs the onnx and onnxruntime packages: pip install onnx onnxruntime "
                            "(or set EXPORT_ONNX=False)") from None
    cpu_model = copy.deepcopy(model).cpu().float().eval()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = {0: "batch"}
    with fileio.atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(cpu_model, (example,), str(tmp), input_names=["images"],
                          output_names=["logits", "embeddings"], opset_version=ONNX_OPSET, dynamo=False,
                          dynamic_axes={"images": batch, "logits": batch, "embeddings": batch})


def onnx_outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits, embeddings) of normalised images (N x 3 x size x size) through the ONNX file, run by
    onnxruntime on the CPU."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, embeddings = session.run(["logits", "embeddings"], {"images": np.asarray(images, dtype=np.float32)})
    return logits, embeddings
