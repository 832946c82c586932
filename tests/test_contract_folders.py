"""The output, checkpoint and cache folders as an attack surface (issue 19, item 1): a link or a
hard link left at the lock file, a log file or the logs folder is never written through (one
`error:` line, the user's file untouched); an artifact written over a link replaces the link, not
the file it points to."""
import os

import pandas as pd
import pytest
from conftest import dir_args, one_error_line

import evaluate
from plankton import fileio, runner
from plankton.errors import PipelineError

USERS_TEXT = "my thesis, chapter 3\n"



@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "home" / "thesis.tex"
    path.parent.mkdir()
    path.write_text(USERS_TEXT)
    return path


@pytest.mark.parametrize("link", ["outputs/.plankton.lock", "checkpoints/.plankton.lock", "outputs/logs/evaluate.log"])
@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_a_linked_lock_or_log_file_is_one_line_and_the_users_file_is_untouched(tmp_path, capsys, users_file,
                                                                               link, kind):
    at = tmp_path / "run" / link
    at.parent.mkdir(parents=True)
    at.symlink_to(users_file) if kind == "symbolic" else os.link(users_file, at)
    line = one_error_line(capsys, evaluate.main, dir_args(tmp_path / "run"))
    assert str(at) in line and ("symbolic link" in line or "hard link" in line), line
    assert users_file.read_text() == USERS_TEXT


def test_a_linked_logs_folder_is_one_line_and_nothing_lands_in_the_folder_it_points_to(tmp_path, capsys, users_file):
    (tmp_path / "run" / "outputs").mkdir(parents=True)
    (tmp_path / "run" / "outputs" / "logs").symlink_to(users_file.parent)
    line = one_error_line(capsys, evaluate.main, dir_args(tmp_path / "run"))
    assert "logs is a symbolic link" in line, line
    assert sorted(p.name for p in users_file.parent.iterdir()) == ["thesis.tex"]


def test_a_dangling_link_at_the_lock_creates_nothing_where_it_points(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".plankton.lock").symlink_to(tmp_path / "planted")
    with pytest.raises(PipelineError, match="symbolic link"):
        with runner.folder_lock(tmp_path / "out"):
            pass
    assert not (tmp_path / "planted").exists()


def test_the_lock_and_the_log_still_work_as_plain_files(tmp_path):
    with runner.folder_lock(tmp_path / "out"), runner.tee_output(tmp_path / "out" / "logs" / "x.log"):
        print("hello")
    assert (tmp_path / "out" / ".plankton.lock").read_text() == f"pid {os.getpid()}\n"
    assert (tmp_path / "out" / "logs" / "x.log").read_text().splitlines()[1:] == ["hello"]
    with runner.tee_output(tmp_path / "out" / "logs" / "x.log"):  # started afresh
        print("again")
    assert (tmp_path / "out" / "logs" / "x.log").read_text().splitlines()[1:] == ["again"]


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_an_artifact_written_over_a_link_replaces_the_link_not_its_target(tmp_path, users_file, kind):
    """Verified, not changed: atomic_path's os.replace swaps the directory entry."""
    at = tmp_path / "outputs" / "split.csv"
    at.parent.mkdir()
    at.symlink_to(users_file) if kind == "symbolic" else os.link(users_file, at)
    fileio.save_csv(pd.DataFrame({"a": [1]}), at, index=False)
    fileio.save_json({"a": 1}, tmp_path / "outputs" / "split.csv")
    assert users_file.read_text() == USERS_TEXT
    assert not at.is_symlink() and at.stat().st_nlink == 1
