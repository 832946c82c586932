"""Launcher variables (issue 19, item 8): torchrun's WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT are all set or none, whole numbers in range, else one `error:` line before anything
starts; a rendezvous whose peers never come ends in one line naming what is missing, within
PLANKTON_RENDEZVOUS_SECONDS (a second here), not after the hour-long collective timeout."""
import socket
import subprocess

import pytest
from conftest import PYTHON, REPO, dir_args, env, one_error_line

import train
from plankton import distributed

COMPLETE = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")



@pytest.mark.parametrize("variables, said", [
    (dict(WORLD_SIZE="2"), "but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    (dict(RANK="0", LOCAL_RANK="0"), "but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    (dict(COMPLETE, WORLD_SIZE="two"), "WORLD_SIZE='two': must be a whole number"),
    (dict(COMPLETE, RANK="-1"), "RANK='-1': must be a whole number"),
    (dict(COMPLETE, LOCAL_RANK="²"), "LOCAL_RANK='²': must be a whole number"),
    (dict(COMPLETE, RANK="2"), "RANK=2: must be below WORLD_SIZE=2"),
    (dict(COMPLETE, WORLD_SIZE="0", RANK="0"), "WORLD_SIZE=0: must be >= 1"),
    (dict(COMPLETE, MASTER_PORT="70000"), "MASTER_PORT=70000: must be a port"),
    (dict(COMPLETE, MASTER_ADDR=" "), "MASTER_ADDR=' ': must name"),
    (dict(COMPLETE, PLANKTON_RENDEZVOUS_SECONDS="soon"), "PLANKTON_RENDEZVOUS_SECONDS='soon'")])
def test_launcher_variables_are_all_or_none_and_numbers_in_range(tmp_path, capsys, monkeypatch, variables, said):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    line = one_error_line(capsys, train.main, dir_args(tmp_path))
    assert said in line, line
    assert not list(tmp_path.iterdir()), "something was written before the variables were checked"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("rank, said", [("0", "1 of the 2 processes never joined"), ("1", "rank 1 found no rank 0")])
def test_a_rendezvous_without_its_peers_ends_in_one_line_in_bounded_time(tmp_path, rank, said):
    variables = dict(env(), **dict(COMPLETE, RANK=rank, LOCAL_RANK=rank, MASTER_PORT=str(free_port())),
                     PLANKTON_RENDEZVOUS_SECONDS="1")
    done = subprocess.run([PYTHON, "train.py", *dir_args(tmp_path), "--DEVICE=cpu"], cwd=REPO, env=variables,
                          capture_output=True, text=True, timeout=120)  # before: silent for the hour-long timeout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert said in lines[0] and "MASTER_ADDR:MASTER_PORT=127.0.0.1:" in lines[0], lines[0]
