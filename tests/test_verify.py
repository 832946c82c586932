"""verify.py: a fresh run passes; any edited output, input or link of the chain is named."""
import pytest
from conftest import tiny_config

import verify
from plankton import locations, registry
from plankton.errors import PipelineError

pytestmark = pytest.mark.slow  # the fixture runs the whole pipeline once


@pytest.fixture
def finished(shared_run):
    """The session's whole run (conftest.SharedRun), held for this test: each test below restores what it
    changes."""
    with shared_run.lock:
        yield shared_run.cfg, locations.Paths.from_settings(shared_run.cfg)


def _mismatches(cfg, capsys) -> list[str]:
    capsys.readouterr()
    try:
        verify.run(cfg)
    except PipelineError as err:
        assert "mismatch" in str(err)
    return [line[len("mismatch: "):] for line in capsys.readouterr().err.splitlines() if line.startswith("mismatch: ")]


def test_a_fresh_run_verifies_and_lists_the_package_versions(finished, capsys):
    cfg, paths = finished
    verify.run(cfg)
    out = capsys.readouterr().out
    stages = len(list(paths.out.glob("provenance_*.json")))
    assert stages == len([s for s in registry.STAGES if s.recorded and s.run_all and s.when_set is None])  # every stage but train.py (best.pth records its split instead)
    assert f"verified: {stages} stages" in out and "torch" in out and "differs" not in out


@pytest.mark.parametrize("name", ["confusion_matrix.png", "transfer_learning.csv", "umap_coordinates.csv",
                                  "embeddings_test.pkl"])
def test_an_edited_output_is_named(finished, capsys, name):
    cfg, paths = finished
    target = paths.out / name
    original = target.read_bytes()
    try:
        target.write_bytes(original + b" ")
        problems = _mismatches(cfg, capsys)
        assert any(p.startswith(f"{target}: changed since") for p in problems), problems
    finally:
        target.write_bytes(original)
    assert _mismatches(cfg, capsys) == []


def test_a_checkpoint_from_another_split_and_a_stray_output_are_named(finished, capsys):
    cfg, paths = finished
    split = paths.split.read_bytes()
    stray = paths.out / "accuracy_extra.png"
    try:
        paths.split.write_bytes(split.replace(b"\n", b"\r\n"))
        stray.write_bytes(b"not from this run")
        problems = _mismatches(cfg, capsys)
        assert f"{paths.best}: trained on another split.csv than {paths.split}" in problems
        assert f"{stray}: not written by the transfer_learning run that made the record" in problems
        assert any(p.startswith(f"{paths.embeddings('train')}: made from another split.csv") for p in problems)
    finally:
        paths.split.write_bytes(split)
        stray.unlink()
    assert _mismatches(cfg, capsys) == []


def test_nothing_to_verify_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match="nothing to verify .* run run_all.py first"):
        verify.run(tiny_config(tmp_path))
