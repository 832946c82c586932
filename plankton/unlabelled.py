"""Unlabelled images a stage classifies, one owner: a folder of new images (PREDICT_DIR) found and
scanned, or the objects of an EcoTaxa export whose status is not trained on (ECOTAXA_STATUSES); and
their logits and embeddings through the trunk cache, each image keyed by its content's SHA-256.
predict.py and annotate_next.py read them from here."""
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import dataloader
from plankton import ecotaxa, images, locations, orientations, training
from plankton.errors import PipelineError


@dataclass(frozen=True)
class Unlabelled:
    """Readable images under one folder, with the files that could not be read."""
    root: Path
    relpaths: list[str]  # readable images, relative to root
    hashes: list[str]  # their SHA-256, in the same order
    bad: dict[str, str]  # unreadable file -> why
    objects: dict[str, tuple[str, str]] = field(default_factory=dict)  # EcoTaxa: relpath -> (object_id, sample_id)
    source: str = ""  # where they come from, in words


def find_new_images(predict_dir, paths: locations.Paths) -> tuple[Path, list[str], list[str], dict[str, str]]:
    """(the folder, its readable images, their SHA-256 in the same order, {unreadable file: why}).
    A missing or empty folder, or one where no image can be read, is a PipelineError."""
    if predict_dir is None:
        raise PipelineError("PREDICT_DIR is not set; run python predict.py --PREDICT_DIR=/folder/of/new/images")
    root = Path(predict_dir).expanduser()
    if not root.is_dir():
        raise PipelineError(f"PREDICT_DIR={str(predict_dir)!r} is not a folder; give the folder of new images")
    root = root.resolve()
    files = images.list_folder_images(root)
    if not files.images:
        raise PipelineError(f"PREDICT_DIR={str(predict_dir)!r} holds no image files "
                            f"({', '.join(sorted(images.IMAGE_EXTENSIONS))}) at any depth")
    if files.ignored or files.linked_folders:
        print(f"note: PREDICT_DIR: {len(files.ignored)} file(s) without an image extension ignored, "
              f"{len(files.linked_folders)} linked folder(s) not followed", file=sys.stderr)
    bad, hashes = images.scan_images(root, files.images, paths.scan_cache(root))
    readable = [f for f in files.images if f not in bad]
    if not readable:
        first = sorted(bad)[0]
        raise PipelineError(f"PREDICT_DIR={str(predict_dir)!r}: none of its {len(files.images)} image files can be "
                            f"read (e.g. {images.printable(first)!r}: {bad[first]})")
    return root, readable, [hashes[f] for f in readable], bad


def ecotaxa_candidates(selection: ecotaxa.Selection, paths: locations.Paths) -> Unlabelled:
    """The export's objects whose status is not one of the selection's (not yet validated, with the
    default ECOTAXA_STATUSES), with their object_id and sample_id. None left is a PipelineError."""
    objects, _ = ecotaxa.read_objects(selection.export)
    waiting = objects[~objects.status.isin(selection.statuses)]
    if waiting.empty:
        raise PipelineError(f"ECOTAXA_EXPORT={selection.export.setting!r}: every usable object has a status in "
                            f"ECOTAXA_STATUSES={list(selection.statuses)}; none is left to annotate (or give "
                            f"PREDICT_DIR)")
    root = selection.export.root
    relpaths = list(waiting.relpath)
    bad, hashes = images.scan_images(root, relpaths, paths.scan_cache(root))
    readable = [f for f in relpaths if f not in bad]
    if not readable:
        raise PipelineError(f"ECOTAXA_EXPORT={selection.export.setting!r}: none of the {len(relpaths)} images of "
                            f"objects not in ECOTAXA_STATUSES can be read")
    ids = dict(zip(waiting.relpath, zip(waiting.object_id, waiting.sample_id)))
    statuses = "/".join(sorted(set(waiting.status)))
    return Unlabelled(root, readable, [hashes[f] for f in readable], bad, {f: ids[f] for f in readable},
                      f"{len(relpaths)} EcoTaxa objects with status {statuses} in {root}")


def from_settings(cfg, paths: locations.Paths) -> Unlabelled:
    """PREDICT_DIR's images when it is set, else the EcoTaxa export's objects not yet trained on."""
    if cfg.PREDICT_DIR is None and cfg.ECOTAXA_EXPORT is not None:
        return ecotaxa_candidates(ecotaxa.selection_from_settings(cfg), paths)
    if cfg.PREDICT_DIR is None:
        raise PipelineError("no unlabelled images: set PREDICT_DIR=/folder/of/new/images, or train on an EcoTaxa "
                            "export (ECOTAXA_EXPORT) whose objects not in ECOTAXA_STATUSES are the candidates")
    root, relpaths, hashes, bad = find_new_images(cfg.PREDICT_DIR, paths)
    return Unlabelled(root, relpaths, hashes, bad, source=f"{len(relpaths) + len(bad)} image files in {root}")


def new_image_outputs(trained, cache, runtime, root: Path, relpaths: list[str], hashes: list[str]):
    """(logits, embeddings) of the new images, through the trunk cache keyed by content SHA-256,
    averaged over the orientations TTA asks for."""
    return orientations.averaged(lambda o: training.head_outputs(trained.model, dataloader.feature_source(
        root, relpaths, np.zeros(len(relpaths)), trained.preprocess, cache, keys=hashes, orientation=o), runtime),
        trained.orientations)
