"""The shape of the code: no import circle, no stage script importing another stage, the library
package importing no script, and every script a stage of the registry, a tool or the launcher."""
import ast
from pathlib import Path

from conftest import REPO

from plankton import registry

TOP_LEVEL_LIBRARIES = {"backbone", "dataloader", "configfile"}  # the design card's names beside the stages
LAUNCHERS = {"run_all", "verify"}  # run_all imports stages through the registry; verify only reads records


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (inside functions too), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "plankton":
                found |= {f"plankton.{alias.name}" for alias in node.names}
    return found


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in REPO.glob("*.py")}
    modules |= {f"plankton.{p.stem}": p for p in (REPO / "plankton").glob("*.py") if p.stem != "__init__"}
    return modules


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def test_no_import_circle():
    edges, circles = graph(), []
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not circles, circles


def test_no_stage_imports_another_stage():
    stages = set(registry.names())
    edges = graph()
    offenders = {f"{name} imports {other}" for name in stages for other in edges.get(name, ()) if other in stages}
    assert not offenders, sorted(offenders)


def test_library_imports_no_script():
    scripts = {name for name in project_modules() if "." not in name} - TOP_LEVEL_LIBRARIES
    edges = graph()
    offenders = {f"{name} imports {other}" for name in edges if name.startswith("plankton.")
                 for other in edges[name] if other in scripts}
    offenders |= {f"{name} imports {other}" for name in TOP_LEVEL_LIBRARIES for other in edges.get(name, ())
                  if other in scripts}
    assert not offenders, sorted(offenders)


def test_every_top_level_script_is_registered():
    """A script at the top level is a stage in the registry, a launcher, or a design-card library;
    tools (bench, report size) live in tools/."""
    scripts = {name for name in project_modules() if "." not in name}
    unexplained = scripts - set(registry.names()) - LAUNCHERS - TOP_LEVEL_LIBRARIES
    assert not unexplained, sorted(unexplained)
    missing = [s.script for s in registry.STAGES if not (REPO / s.script).is_file()]
    assert not missing, missing


def test_the_checks_catch_a_stage_importing_a_stage(tmp_path, monkeypatch):
    """The import reader sees an import inside a function (the way a circle used to be hidden)."""
    script = tmp_path / "x.py"
    script.write_text("def run(cfg):\n    import evaluate\n    from plankton import registry\n")
    assert {"evaluate", "plankton", "plankton.registry"} <= imports_of(script)
