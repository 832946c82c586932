"""Provenance, one owner: what each stage read and wrote (SHA-256 of every file), with the code and
settings that made it, in outputs/provenance_<stage>.json; which outputs a record no longer vouches
for (stale_outputs); and whether a stage must run again (why_rerun, read by run_all.py)."""
import hashlib
import json
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath

from plankton import fileio, registry
from plankton.errors import PipelineError
from plankton.fileio import save_json
from plankton.hashing import file_sha256
from plankton.locations import Paths
from plankton.system import REPO_DIR


def code_version() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    """The versions of Python and of the packages whose behaviour the results depend on."""
    from importlib.metadata import PackageNotFoundError, version
    found = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "umap-learn", "pillow"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def provenance_path(paths: Paths, stage: str) -> Path:
    return paths.out / f"provenance_{stage}.json"


@dataclass(frozen=True)
class Record:
    """A stage's provenance record, each value checked when it was read (read_record)."""
    stage: str
    code_version: str
    code_sha256: str
    packages: dict  # name -> version
    inputs: dict  # path as the stage was given it -> SHA-256
    outputs: dict  # name relative to the output folder (never outside it) -> SHA-256
    settings: dict | None  # None: a record from before settings were kept


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _inside_name(name) -> bool:
    """An output name a record may hold: relative, within the output folder, no "." or ".." parts."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and all(p not in (".", "..") for p in parts) and "/".join(parts) == name


def read_record(paths: Paths, stage: str) -> Record | None:
    """provenance_<stage>.json, checked: None when there is none; one error naming the file when it
    is not a record this code writes (cut short, wrong types, an output named outside the folder)."""
    path = provenance_path(paths, stage)
    if not path.is_file():
        return None

    def bad(what: str):
        raise PipelineError(f"{path} is not a provenance record ({what}); re-run {stage}.py")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        bad(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
    if not isinstance(raw, dict):
        bad(f"a JSON {type(raw).__name__}, not an object")
    if raw.get("stage") != stage:
        bad(f"it is the record of stage {raw.get('stage')!r}")
    for key in ("inputs", "outputs"):
        files = raw.get(key)
        if not isinstance(files, dict) or not all(isinstance(k, str) and _is_sha256(v) for k, v in files.items()):
            bad(f"{key!r} is not a map of file to SHA-256")
    outside = [name for name in raw["outputs"] if not _inside_name(name)]
    if outside:
        bad(f"it names outputs outside the output folder: {outside[0]!r}")
    packages, settings = raw.get("packages", {}), raw.get("settings")
    if not isinstance(packages, dict) or not all(isinstance(v, str) for v in packages.values()):
        bad("'packages' is not a map of package to version")
    if settings is not None and not isinstance(settings, dict):
        bad("'settings' is not an object")
    for key in ("code_version", "code_sha256"):
        if not isinstance(raw.get(key, ""), str):
            bad(f"{key!r} is not text")
    return Record(stage, raw.get("code_version", "unknown"), raw.get("code_sha256", ""), packages, raw["inputs"],
                  raw["outputs"], settings)


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """SHA-256 of the pipeline's code as it is on disk (every .py file of the scripts, the library
    package and configfile.py): unlike `git describe`, it changes with every uncommitted edit."""
    digest = hashlib.sha256()
    for path in sorted([*REPO_DIR.glob("*.py"), *(REPO_DIR / "plankton").glob("*.py")]):
        digest.update(path.relative_to(REPO_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def why_rerun(paths: Paths, stage: str, cfg) -> str | None:
    """None when a stage need not run again: its record is there and readable, was made by this code
    with these settings, every input it read is unchanged, and every output it wrote is there and
    unchanged (none stale). Otherwise, in a few words, why it must run."""
    entry = registry.stage(stage)
    if not entry.recorded:
        return "it keeps no provenance record (it checks its own state)"
    if not entry.resumable:
        return "it reads files that its record does not fingerprint"
    try:
        record = read_record(paths, stage)
    except PipelineError:
        record = None
    if record is None or record.settings is None:
        return "no complete record of an earlier run"
    if record.code_sha256 != code_fingerprint():
        return "the code changed"
    if record.settings != fileio.plain_json(vars(cfg)):
        return "the settings changed"
    if stale_outputs(paths, stage):
        return "its inputs or outputs changed"
    return None


def start_stage(paths: Paths, stage: str, inputs: list[Path]) -> dict[str, str]:
    """Call after a stage's inputs are checked, before it writes anything: deletes its provenance
    record (the stage's outputs count as incomplete until save_provenance writes a new one), says so
    when earlier outputs are replaced, and returns the inputs' SHA-256 as they are now."""
    record = provenance_path(paths, stage)
    if not record.is_file() and existing_outputs(paths, stage):
        print(f"note: {stage} outputs in {paths.out} have no {record.name} (an earlier run stopped part-way): "
              f"replacing them")
    try:
        record.unlink(missing_ok=True)
    except OSError as err:  # a read-only output folder
        raise PipelineError(f"cannot remove {record}: {err.strerror or err}") from err
    return {str(p): file_sha256(p) for p in inputs}


def save_provenance(paths: Paths, stage: str, inputs: dict[str, str], outputs: list[Path], cfg=None) -> None:
    """provenance_<stage>.json, the stage's last write: the SHA-256 of each input (as start_stage
    found them; an input replaced while the stage ran is an error) and of each file it wrote, the
    code's fingerprint and the settings (cfg) it ran with: what run_all.py compares to skip it."""
    for name, sha256 in inputs.items():
        if not Path(name).is_file() or file_sha256(name) != sha256:
            raise PipelineError(f"{name} changed while {stage} ran (another run beside this one?); "
                                f"re-run {stage}.py")
    record = dict(stage=stage, code_version=code_version(), code_sha256=code_fingerprint(),
                  packages=package_versions(), inputs=inputs,
                  outputs={output_name(paths, p): file_sha256(p) for p in outputs})
    if cfg is not None:
        record["settings"] = fileio.plain_json(vars(cfg))
    save_json(record, provenance_path(paths, stage))
    left_over = stale_outputs(paths, stage)
    if left_over:
        print(f"note: {len(left_over)} older {stage} output(s) were not written by this run, e.g. {left_over[0]}")


def stale_outputs(paths: Paths, stage: str) -> list[str]:
    """The stage's output files that its provenance does not vouch for: all of them when the record
    is missing or unreadable or an input has changed since; otherwise each file missing, changed, or
    not written by the run that made the record."""
    on_disk = existing_outputs(paths, stage)
    try:
        record = read_record(paths, stage)
    except PipelineError:
        record = None
    if record is None:
        return sorted(str(paths.out / name) for name in on_disk)
    inputs, outputs = record.inputs, record.outputs
    if any(not Path(p).is_file() or file_sha256(p) != sha256 for p, sha256 in inputs.items()):
        return sorted(str(paths.out / name) for name in on_disk | set(outputs))
    return sorted(str(paths.out / name) for name in on_disk | set(outputs)
                  if name not in outputs or not (paths.out / name).is_file()
                  or file_sha256(paths.out / name) != outputs[name])


def output_name(paths: Paths, path: Path) -> str:
    """How provenance names an output: its path relative to the output folder ("predictions/x.csv"),
    which for the files directly in it is their name."""
    path = Path(path)
    return path.relative_to(paths.out).as_posix() if path.is_relative_to(paths.out) else path.name


def existing_outputs(paths: Paths, stage: str) -> set[str]:
    """Names (relative to the output folder) of the files there that match the stage's output patterns."""
    return {output_name(paths, p) for pattern in registry.stage(stage).outputs for p in paths.out.glob(pattern) if p.is_file()}
