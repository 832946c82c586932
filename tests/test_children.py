"""A stopped run leaves no process behind: the children the pipeline starts (seeds.py's stage
processes, the UMAP compile-ahead) and those the tests start end when their parent ends, however it
ends (plankton.system.die_with_parent)."""
import ast
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import PYTHON, REPO, env

PARENT = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from plankton import system
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=system.die_with_parent)
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie (ended, not yet reaped by init) counts as gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_a_child_ends_when_its_parent_is_killed():
    parent = subprocess.Popen([PYTHON, "-c", PARENT.format(repo=str(REPO))], env=env(), stdout=subprocess.PIPE,
                              text=True, preexec_fn=None)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)  # no handler, no cleanup: only the kernel can tell the child
    parent.wait()
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its killed parent"


def test_every_process_the_pipeline_starts_dies_with_its_parent():
    """Each subprocess.Popen/run in the scripts and the library passes a preexec_fn that calls
    system.die_with_parent (read from the code, so a new one cannot forget it)."""
    missing = []
    files = [p for p in REPO.glob("*.py")] + list((REPO / "plankton").glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("Popen", "run") and getattr(node.func.value, "id", "") == "subprocess"):
                if not any(k.arg == "preexec_fn" for k in node.keywords):
                    missing.append(f"{Path(path).name}:{node.lineno}")
    allowed = {"provenance.py"}  # `git describe`, five seconds at most, nothing to leave behind
    assert [m for m in missing if m.split(":")[0] not in allowed] == []
