"""Reproduction check: reload the trained model in this process, recompute every test image's
softmax scores and compare them with the ones evaluate.py saved.

    python reproduce.py                       # through the trunk cache, as evaluate.py computes them
    python reproduce.py --CACHE_TRUNK=False   # straight from the images (measures the cache's rounding)

Reads:  checkpoints/best.pth, outputs/split.csv, outputs/test_scores.npz, the test images (through
        the trunk cache unless CACHE_TRUNK=False).
Writes: outputs/reproduction_check.csv (one row per class and an "overall" row: largest and mean
        absolute softmax-score difference, share of identical predictions, saved and recomputed
        average precision and their absolute difference; overall: mAP), outputs/reproduction_check.json
        (the same, the tolerance and the verdict), and last outputs/provenance_reproduce.json.

The check fails when the largest absolute score difference exceeds REPRO_TOLERANCE: the report is
written, then one `error:` line and exit status 1. Nothing is shared with the evaluate stage: the
model is rebuilt from best.pth and the scores compared are the ones on disk.
"""
import numpy as np
import pandas as pd

import dataloader
from plankton import checkpoints, fileio, locations, metrics, provenance, runner, saved_predictions, tasks
from plankton.errors import PipelineError


def _compare(saved: np.ndarray, now: np.ndarray, saved_pred: np.ndarray, now_pred: np.ndarray) -> dict:
    difference = np.abs(saved.astype(np.float64) - now.astype(np.float64))
    return dict(n_test=len(saved), max_abs_score_difference=float(difference.max(initial=0.0)),
                mean_abs_score_difference=float(difference.mean()) if difference.size else 0.0,
                same_prediction_share=float((saved_pred == now_pred).mean()) if len(saved) else 1.0)


def class_part(predictions: saved_predictions.Predictions, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, predictions) a class's row compares: its test images' scores for every class
    (multiclass), or every test image's score and 0/1 prediction for the label (multilabel)."""
    if predictions.task == "multiclass":
        mine = predictions.labels == c
        return predictions.scores[mine], predictions.predicted[mine]
    return predictions.scores[:, c], predictions.predicted[:, c]


def class_average_precisions(predictions: saved_predictions.Predictions) -> np.ndarray:
    """Each class's (one-vs-rest) or label's average precision of its score."""
    if predictions.task == "multiclass":
        return metrics.average_precisions(predictions.labels, predictions.scores, len(predictions.class_names))
    return tasks.average_precisions(predictions.labels, predictions.scores)


def compare_predictions(saved: saved_predictions.Predictions, now: saved_predictions.Predictions) -> pd.DataFrame:
    """Per class (its test images; multilabel: the label's score on every test image) and overall:
    score differences, share of identical predictions (multilabel: of the 0/1 decisions at 0.5), and
    each class's average precision saved vs recomputed (overall: mAP)."""
    if (saved.relpaths != now.relpaths or saved.task != now.task
            or not np.array_equal(saved.labels, now.labels)):
        raise PipelineError("the saved test predictions list other images than the current split's "
                            "test set; re-run evaluate.py")
    if list(saved.class_names) != list(now.class_names):
        raise PipelineError(f"the saved test predictions score the classes {list(saved.class_names)}, the model "
                            f"{list(now.class_names)}; re-run evaluate.py")
    ap_saved, ap_now = class_average_precisions(saved), class_average_precisions(now)
    rows = []
    for c, name in enumerate(saved.class_names):
        (saved_scores, saved_pred), (now_scores, now_pred) = class_part(saved, c), class_part(now, c)
        rows.append(dict(class_name=name, **_compare(saved_scores, now_scores, saved_pred, now_pred),
                         saved_ap=ap_saved[c], recomputed_ap=ap_now[c], ap_difference=abs(ap_now[c] - ap_saved[c])))
    map_saved, map_now = np.nanmean(ap_saved), np.nanmean(ap_now)
    rows.append(dict(class_name="overall", **_compare(saved.scores, now.scores, saved.predicted, now.predicted),
                     saved_ap=map_saved, recomputed_ap=map_now, ap_difference=abs(map_now - map_saved)))
    return pd.DataFrame(rows)


def print_report(table: pd.DataFrame, tolerance: float) -> None:
    print(f"{'class':>16} {'images':>6} {'max |Δscore|':>12} {'mean |Δscore|':>13} {'same pred.':>10} "
          f"{'AP saved':>8} {'AP now':>8} {'|ΔAP|':>9}")
    for row in table.itertuples():
        name = "overall (mAP)" if row.class_name == "overall" else row.class_name[:16]
        print(f"{name:>16} {row.n_test:>6} {row.max_abs_score_difference:>12.3g} "
              f"{row.mean_abs_score_difference:>13.3g} {100 * row.same_prediction_share:>9.1f}% "
              f"{row.saved_ap:>8.4f} {row.recomputed_ap:>8.4f} {row.ap_difference:>9.2g}")
    print(f"tolerance (REPRO_TOLERANCE): largest absolute score difference <= {tolerance:g}")


def run(cfg) -> None:
    paths = locations.prepare_output_dirs(cfg)
    runtime = dataloader.runtime_from_settings(cfg)
    trained = checkpoints.open_trained_model(cfg, paths, runtime.device, runtime.channels_last)
    saved = saved_predictions.open_predictions(paths)
    inputs = provenance.start_stage(paths, "reproduce", [paths.best, paths.split, paths.scores])
    how = f"trunk cache ({cfg.CACHE_DTYPE})" if cfg.CACHE_TRUNK else "images (CACHE_TRUNK=False)"
    print(f"reproduce.py  {paths.best} reloaded; test scores recomputed from the {how}, compared with {paths.scores}")
    cache = trained.trunk_cache(cfg, paths, runtime)
    table = compare_predictions(saved, saved_predictions.predict_test_set(trained, cache, runtime))
    print_report(table, cfg.REPRO_TOLERANCE)
    overall = table.iloc[-1]
    passed = bool(overall.max_abs_score_difference <= cfg.REPRO_TOLERANCE)
    outputs = [paths.out / "reproduction_check.csv", paths.out / "reproduction_check.json"]
    fileio.save_csv(table, outputs[0], index=False)
    fileio.save_json(dict(passed=passed, tolerance=cfg.REPRO_TOLERANCE, recomputed_from=how,
                          checkpoint_sha256=trained.sha256, overall=overall.to_dict(),
                          per_class=table.to_dict("records")), outputs[1])
    provenance.save_provenance(paths, "reproduce", inputs, outputs, cfg)
    if not passed:
        raise PipelineError(
            f"reproduction check failed: scores recomputed from {paths.best} differ from {paths.scores} by up to "
            f"{overall.max_abs_score_difference:.3g} (REPRO_TOLERANCE={cfg.REPRO_TOLERANCE:g}; "
            f"{100 * overall.same_prediction_share:.1f}% identical predictions); see {outputs[0]}")
    print(f"reproduction check passed -> {outputs[0]}")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
