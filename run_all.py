"""Run the whole pipeline in order and report each stage's wall time.

    python run_all.py                    # built-in digits, or DATA_DIR from configfile.py
    python run_all.py --config=my.py     # settings overrides pass through to every stage
    python run_all.py --TASK=multilabel  # the built-in multi-label demo (2x2 digit mosaics)
    python run_all.py --force            # every stage again, even those whose outputs are current

The stages and their order are plankton/registry.py's STAGES (predict.py only when PREDICT_DIR is
set; the report last). A stage that does not handle TASK is skipped with one line. A stage whose
recorded inputs, settings and code are unchanged and whose outputs still verify is not run again
(one line says so): a second run_all.py right after a first takes seconds. train.py always runs; it
only checks a finished training run and returns.
Writes what each stage writes, plus outputs/stage_times.json (rewritten after each stage, so the report
sees the times of the stages before it).
"""
import sys
import time

from plankton import fileio, locations, projection, provenance, registry, runner, system

FORCE_FLAG = "--force"


def run(cfg, after_stage=None, force: bool = False) -> dict:
    """Every stage in order; returns the wall times of those that ran. after_stage(name), if given,
    is called after each stage that ran (bench.py reads each stage's peak memory there)."""
    times, started = {}, time.time()
    paths = locations.prepare_output_dirs(cfg)
    logs = paths.out / "logs"
    if cfg.COMPILE_AHEAD:
        projection.compile_ahead()  # numba compiles umap-learn's code while training runs
    stages = registry.run_all_stages(cfg)
    for stage in stages:
        stage.module()  # imported now (importing a stage runs nothing), so that imports_frozen exempts its modules
    try:
        with system.imports_frozen():  # the collections between and in stages skip the imported modules
            for stage in stages:
                print(f"\n======== {stage.script} ========")
                if not stage.handles(cfg.TASK):
                    print(f"skipped: {stage.script} is {' and '.join(stage.tasks)} only (TASK={cfg.TASK!r}): "
                          f"{stage.not_for}")
                    continue
                if not force and provenance.why_rerun(paths, stage.name, cfg) is None:
                    print(f"up to date: {stage.script}'s outputs match its recorded inputs, settings and code "
                          f"(--force runs it again)")
                    continue
                stage_started = time.time()
                with runner.tee_output(logs / f"{stage.name}.log"):  # each stage's own log beside run_all's
                    stage.module().run(cfg)
                times[stage.name] = time.time() - stage_started
                system.release_free_memory()  # the next stage starts from the baseline, not this one's leftovers
                if after_stage is not None:
                    after_stage(stage.name)
                fileio.save_json(times, paths.out / "stage_times.json")  # so far: the report stage shows them
    finally:
        projection.stop_compiling(wait=False)
    times["total"] = time.time() - started
    print("\n======== stage wall times ========")
    for name, seconds in times.items():
        print(f"{name:>28}: {seconds:7.1f} s")
    fileio.save_json(times, paths.out / "stage_times.json")
    return times


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    force = FORCE_FLAG in argv
    argv = [a for a in argv if a != FORCE_FLAG]
    runner.run_script(lambda cfg: run(cfg, force=force), argv)


if __name__ == "__main__":
    main()
