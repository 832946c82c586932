"""Run the whole pipeline in order and report each stage's wall time.

    python run_all.py                    # built-in digits, or DATA_DIR from configfile.py
    python run_all.py --config=my.py     # settings overrides pass through to every stage
    python run_all.py --TASK=multilabel  # the built-in multi-label demo (2x2 digit mosaics)

Stages: dataset_overview.py -> train.py -> evaluate.py -> leaks.py -> reproduce.py -> ranked_images.py -> embed.py ->
feature_maps.py -> compute_average_distances.py -> dimensionality_reduction.py -> embedding_quality.py ->
transfer_learning.py -> open_set.py -> calibration.py, then predict.py only when PREDICT_DIR is set, then
report.py (last: one HTML page of everything the others wrote).
A stage whose TASKS tuple lacks TASK is skipped with one line (see the README's multi-label section).
Writes what each stage writes, plus outputs/stage_times.json (rewritten after each stage, so the report
sees the times of the stages before it). A finished training run is not repeated (train.py says so).
"""
import time

import artifacts
import calibration
import common
import compute_average_distances
import dataset_overview
import dimensionality_reduction
import embed
import embedding_quality
import evaluate
import feature_maps
import leaks
import open_set
import predict
import ranked_images
import report
import reproduce
import train
import transfer_learning

STAGES = (("dataset_overview", dataset_overview), ("train", train), ("evaluate", evaluate), ("leaks", leaks),
          ("reproduce", reproduce), ("ranked_images", ranked_images), ("embed", embed), ("feature_maps", feature_maps),
          ("compute_average_distances", compute_average_distances),
          ("dimensionality_reduction", dimensionality_reduction), ("embedding_quality", embedding_quality),
          ("transfer_learning", transfer_learning), ("open_set", open_set), ("calibration", calibration),
          ("report", report))
ON_REQUEST = (("predict", predict, "PREDICT_DIR"),)  # stages run only when their setting is not None


def stages_for(cfg) -> tuple:
    """STAGES with each ON_REQUEST stage whose setting is set (predict.py when PREDICT_DIR is) before
    the report, which stays last so that it shows them."""
    requested = tuple((name, module) for name, module, setting in ON_REQUEST if getattr(cfg, setting) is not None)
    return STAGES[:-1] + requested + STAGES[-1:]


def run(cfg, after_stage=None) -> dict:
    """Every stage in order; returns their wall times. after_stage(name), if given, is called after
    each stage that ran (bench.py reads each stage's peak memory there)."""
    times, started = {}, time.time()
    out = artifacts.Paths.from_settings(cfg).out
    logs = out / "logs"
    if cfg.COMPILE_AHEAD:
        dimensionality_reduction.compile_ahead()  # numba compiles umap-learn's code while training runs
    try:
        for name, module in stages_for(cfg):
            print(f"\n======== {name}.py ========")
            if cfg.TASK not in module.TASKS:  # a stage for one task only says so in its TASKS
                print(f"skipped: {name}.py is {' and '.join(module.TASKS)} only (TASK={cfg.TASK!r})")
                continue
            stage_started = time.time()
            with common.tee_output(logs / f"{name}.log"):  # each stage's own log beside run_all's
                module.run(cfg)
            times[name] = time.time() - stage_started
            common.release_free_memory()  # the next stage starts from the baseline, not this one's leftovers
            if after_stage is not None:
                after_stage(name)
            common.save_json(times, out / "stage_times.json")  # so far: the report stage shows them
    finally:
        dimensionality_reduction.stop_compiling(wait=False)
    times["total"] = time.time() - started
    print("\n======== stage wall times ========")
    for name, seconds in times.items():
        print(f"{name:>28}: {seconds:7.1f} s")
    common.save_json(times, out / "stage_times.json")
    return times


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
