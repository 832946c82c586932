"""Label sets for new images (predict.py with TASK="multilabel"): each label's sigmoid score at the
validation temperature, the image's label set from the per-label thresholds of ROUTE_PRECISION
(plankton/routing.py's label_thresholds, as calibration.py reports them), and the open-set flag.

predict.py finds and reads the new images and calls `label_set_outputs`; this module fits what the
validation images give and writes predictions.csv and predictions.json. An EcoTaxa import has one
category per object, so a multi-label run writes no ecotaxa_import.tsv and no per-class figure.
"""
from pathlib import Path

import numpy as np
import pandas as pd

from plankton import calibrate, fileio, images, labelsets, openset, routing

# PREDICT_SCORE names a single-label score; a multi-label run reads it as its counterpart
MULTILABEL_SCORE = {"max_softmax": "max_sigmoid", "energy": "joint_energy", "knn": "knn", "mahalanobis": "mahalanobis"}


def fit_on_validation(cfg, trained, cache, runtime) -> dict:
    """The open-set reference and unknown threshold, the label temperature and the label thresholds."""
    score = openset.MULTILABEL_SCORES[MULTILABEL_SCORE[cfg.PREDICT_SCORE]]
    reference = openset.reference_from_model(trained, cache, runtime, cfg)
    val_logits, val_embeddings, val_targets = openset.subset_outputs(trained, cache, runtime, "val")
    val_scores = score(val_logits, val_embeddings, reference)
    threshold = openset.keep_threshold(val_scores, cfg.PREDICT_KEEP)
    temperature, not_fitted = calibrate.validation_label_temperature(val_logits, val_targets)
    thresholds = routing.label_thresholds(calibrate.sigmoid_probabilities(val_logits, temperature), val_targets,
                                          trained.class_names, cfg.ROUTE_PRECISION)
    return dict(score=score, reference=reference, threshold=threshold, val_images=len(val_targets),
                val_kept=float((val_scores <= threshold).mean()), temperature=temperature,
                temperature_note=not_fitted or f"fitted on {len(val_targets)} validation images", thresholds=thresholds)


def label_set_table(relpaths: list[str], hashes: list[str], probs: np.ndarray, names: list[str],
                    thresholds: pd.DataFrame, open_scores: np.ndarray, threshold: float) -> pd.DataFrame:
    """One row per image: path, sha256, predicted_labels (every label whose score reaches its
    threshold, joined by ";"; empty when none does), labels_at_half (score >= 0.5), score_<label>,
    open_set_score, unknown."""
    chosen = routing.label_sets(probs, thresholds)
    table = pd.DataFrame(dict(path=[images.printable(p) for p in relpaths], sha256=hashes,
                              predicted_labels=[labelsets.LABEL_SEPARATOR.join(np.asarray(names)[row]) for row in chosen],
                              labels_at_half=[labelsets.LABEL_SEPARATOR.join(np.asarray(names)[row >= 0.5])
                                              for row in probs]))
    for i, name in enumerate(names):
        table[f"score_{name}"] = probs[:, i]
    table["open_set_score"] = open_scores
    table["unknown"] = open_scores > threshold
    return table


def label_set_outputs(cfg, trained, cache, runtime, root: Path, relpaths: list[str], hashes: list[str],
                      logits: np.ndarray, embeddings: np.ndarray, bad_files: pd.DataFrame, out: Path) -> list[Path]:
    """predictions.csv, predictions.json and bad_files.csv in `out` for a multi-label model; returns them."""
    fitted = fit_on_validation(cfg, trained, cache, runtime)
    names = trained.class_names
    probs = calibrate.sigmoid_probabilities(logits, fitted["temperature"])
    open_scores = fitted["score"](logits, embeddings, fitted["reference"])
    table = label_set_table(relpaths, hashes, probs, names, fitted["thresholds"], open_scores, fitted["threshold"])
    outputs = [out / "predictions.csv", out / "predictions.json", out / "bad_files.csv"]
    fileio.save_csv(table, outputs[0], index=False)
    carried = table.predicted_labels.str.split(labelsets.LABEL_SEPARATOR).explode()
    fileio.save_json(dict(task="multilabel", predict_dir=str(root), images_predicted=len(table),
                          bad_files=len(bad_files), flagged_unknown=int(table.unknown.sum()),
                          open_set_score=MULTILABEL_SCORE[cfg.PREDICT_SCORE], threshold=fitted["threshold"],
                          keep=cfg.PREDICT_KEEP, val_images=fitted["val_images"], val_kept=fitted["val_kept"],
                          temperature=fitted["temperature"], temperature_note=fitted["temperature_note"],
                          scores="sigmoid(logits / temperature)", route_precision=cfg.ROUTE_PRECISION,
                          label_thresholds=dict(zip(names, fitted["thresholds"].threshold.replace(np.inf, None))),
                          images_per_label=carried[carried != ""].value_counts().to_dict(),
                          checkpoint_sha256=trained.sha256, split_sha256=trained.split.sha256), outputs[1])
    fileio.save_csv(bad_files, outputs[2], index=False)
    print(f"{len(table)} images: label sets from the per-label thresholds of precision {cfg.ROUTE_PRECISION:g}; "
          f"{int(table.unknown.sum())} flagged unknown ({MULTILABEL_SCORE[cfg.PREDICT_SCORE]} score > "
          f"{fitted['threshold']:.4g}); scores at temperature {fitted['temperature']:.3g} ({fitted['temperature_note']})")
    return outputs
