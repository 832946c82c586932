"""Check a finished run against what its stages recorded: every input and output named in the
stages' provenance still has the SHA-256 recorded, no stage's outputs lack a record, and the chain
holds (each embeddings file comes from this best.pth, best.pth from this split.csv).

    python verify.py                                   # the run in OUTPUT_DIR / CHECKPOINT_DIR
    python verify.py --OUTPUT_DIR=runs/a/outputs --CHECKPOINT_DIR=runs/a/checkpoints

Reads:  outputs/provenance_<stage>.json and every file they name, checkpoints/best.pth,
        outputs/split.csv, outputs/embeddings_*.pkl, outputs/model_bundle/model_bundle.pt.
Writes: nothing. Prints the package versions each stage ran with beside those installed now, then
        one line per mismatch (`mismatch: ...`) and exits 1 if there is any.
"""
import sys
from pathlib import Path

from plankton import (
    bundles,
    checkpoints,
    embedding_files,
    hashing,
    locations,
    provenance,
    registry,
    runner,
    safepickle,
)
from plankton.errors import PipelineError


def stage_mismatches(paths: locations.Paths, stage: str, record: provenance.Record) -> list[str]:
    """Each input and output of a stage's record whose file is gone or whose SHA-256 differs."""
    problems = []
    named = [(p, sha, "input") for p, sha in record.inputs.items()]
    named += [(str(paths.out / name), sha, "output") for name, sha in record.outputs.items()]
    for path, sha256, role in named:
        if not Path(path).is_file():
            problems.append(f"{path}: missing ({role} of {stage})")
        elif hashing.file_sha256(path) != sha256:
            problems.append(f"{path}: changed since {stage} recorded it as its {role}")
    unvouched = provenance.existing_outputs(paths, stage) - set(record.outputs)
    problems += [f"{paths.out / name}: not written by the {stage} run that made the record" for name in sorted(unvouched)]
    return problems


def chain_mismatches(paths: locations.Paths) -> list[str]:
    """best.pth made from this split.csv; each embeddings file and the model bundle from this best.pth
    and split.csv."""
    if not paths.best.is_file():
        return [f"{paths.best}: missing"]
    problems = []
    best, best_sha = checkpoints.open_checkpoint(paths.best), hashing.file_sha256(paths.best)
    split_sha = hashing.file_sha256(paths.split) if paths.split.is_file() else None
    if best.split_sha256 != split_sha:
        problems.append(f"{paths.best}: trained on another split.csv than {paths.split}")
    for subset in embedding_files.EMBEDDED_SUBSETS:
        path = paths.embeddings(subset)
        if not path.is_file():
            continue
        try:
            source = embedding_files.EmbeddingsInfo.of(safepickle.load_dataframe(path), path)
        except (safepickle.UnsafePickle, OSError, PipelineError) as err:
            problems.append(f"{path}: unreadable ({err})")
            continue
        if source.checkpoint_sha256 != best_sha:
            problems.append(f"{path}: made from another checkpoint than {paths.best}")
        if source.split_sha256 != split_sha:
            problems.append(f"{path}: made from another split.csv than {paths.split}")
    return problems + bundle_mismatches(paths, best_sha, split_sha)


def bundle_mismatches(paths: locations.Paths, best_sha: str, split_sha: str | None) -> list[str]:
    """The model bundle, if there is one: it opens (its content SHA-256 holds) and was exported from
    this best.pth and split.csv."""
    path = paths.bundle_dir / bundles.FILE_NAME
    if not path.is_file():
        return []
    try:
        bundle = bundles.open_bundle(path)
    except PipelineError as err:
        return [f"{path}: unreadable ({err})"]
    problems = []
    if bundle.checkpoint_sha256 != best_sha:
        problems.append(f"{path}: exported from another checkpoint than {paths.best}")
    if bundle.split_sha256 != split_sha:
        problems.append(f"{path}: exported from another split.csv than {paths.split}")
    return problems


def print_versions(records: dict) -> None:
    now = provenance.package_versions()
    print(f"{'package':<14}{'now':<16}then")
    for name, version in now.items():
        then = sorted({r.packages.get(name, "not recorded") for r in records.values()})
        flag = "" if then == [version] else "   <- differs"
        print(f"{name:<14}{version:<16}{', '.join(then)}{flag}")


def run(cfg) -> None:
    paths = locations.Paths.from_settings(cfg)
    records, problems = {}, []
    for stage in [entry.name for entry in registry.STAGES if entry.recorded]:
        path = provenance.provenance_path(paths, stage)
        try:
            record = provenance.read_record(paths, stage)
        except PipelineError as err:
            problems.append(str(err))
            continue
        if record is not None:
            records[stage] = record
        elif provenance.existing_outputs(paths, stage):
            problems.append(f"{paths.out}: {stage} outputs without {path.name} (the stage stopped part-way?)")
    if not records and not paths.best.is_file():
        raise PipelineError(f"nothing to verify in {paths.out} and {paths.checkpoints}: run run_all.py first")
    for stage, record in records.items():
        problems += stage_mismatches(paths, stage, record)
    problems += chain_mismatches(paths)
    print_versions(records)
    for problem in problems:
        print(f"mismatch: {problem}", file=sys.stderr)
    if problems:
        raise PipelineError(f"{len(problems)} mismatch(es) in the run in {paths.out}")
    checked = sum(len(r.inputs) + len(r.outputs) for r in records.values())
    print(f"verified: {len(records)} stages, {checked} recorded files, the chain split -> best.pth -> embeddings and "
          f"model bundle")


def main(argv=None):
    runner.run_script(run, argv)


if __name__ == "__main__":
    main()
