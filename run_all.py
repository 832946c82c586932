"""Run the whole pipeline in order and report each stage's wall time.

    python run_all.py                    # built-in digits, or DATA_DIR from configfile.py
    python run_all.py --config=my.py     # settings overrides pass through to every stage
    python run_all.py --TASK=multilabel  # the built-in multi-label demo (2x2 digit mosaics)

Stages: dataset_overview.py -> train.py -> evaluate.py -> reproduce.py -> ranked_images.py -> embed.py ->
feature_maps.py -> compute_average_distances.py -> dimensionality_reduction.py -> transfer_learning.py.
A stage whose TASKS tuple lacks TASK is skipped with one line (multilabel: dataset_overview,
ranked_images, transfer_learning). Writes what each stage writes, plus outputs/stage_times.json. A finished training run is not repeated
(train.py says so).
"""
import time

import artifacts
import common
import compute_average_distances
import dataset_overview
import dimensionality_reduction
import embed
import evaluate
import feature_maps
import ranked_images
import reproduce
import train
import transfer_learning

STAGES = (("dataset_overview", dataset_overview), ("train", train), ("evaluate", evaluate), ("reproduce", reproduce),
          ("ranked_images", ranked_images), ("embed", embed), ("feature_maps", feature_maps),
          ("compute_average_distances", compute_average_distances),
          ("dimensionality_reduction", dimensionality_reduction), ("transfer_learning", transfer_learning))


def run(cfg) -> dict:
    times, started = {}, time.time()
    logs = artifacts.Paths.from_settings(cfg).out / "logs"
    for name, module in STAGES:
        print(f"\n======== {name}.py ========")
        if cfg.TASK not in module.TASKS:  # a stage for one task only says so in its TASKS
            print(f"skipped: {name}.py is {' and '.join(module.TASKS)} only (TASK={cfg.TASK!r})")
            continue
        stage_started = time.time()
        with common.tee_output(logs / f"{name}.log"):  # each stage's own log beside run_all's
            module.run(cfg)
        times[name] = time.time() - stage_started
    times["total"] = time.time() - started
    print("\n======== stage wall times ========")
    for name, seconds in times.items():
        print(f"{name:>28}: {seconds:7.1f} s")
    common.save_json(times, artifacts.Paths.from_settings(cfg).out / "stage_times.json")
    return times


def main(argv=None):
    common.run_script(run, argv)


if __name__ == "__main__":
    main()
