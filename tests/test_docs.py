"""The documentation stays true to the code: the generated settings reference is current, the README
is short, its links resolve and its test command is the one CI runs."""
import re

from conftest import REPO

from plankton import settings

README_LIMIT = 15_000  # bytes: the README is for the first hour; the rest lives in docs/


def test_the_settings_reference_is_current():
    written = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert written == settings.reference_markdown(), "docs/settings.md is stale: python tools/settings_reference.py"


def test_the_settings_reference_names_every_setting_and_what_it_accepts():
    text = settings.reference_markdown()
    for name, rule in settings.SCHEMA.items():
        assert f"| `{name}` |" in text and settings.accepts(rule).replace("|", "\\|") in text


def test_the_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode()) < README_LIMIT
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    assert [link for link in local if not (REPO / link).exists()] == []


def test_the_readme_test_command_is_what_ci_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text()
    for command in ("python -m pytest -q -n 2 tests", "python -m pytest -q -n 2 -m slow tests"):
        assert command in readme and command in ci


def test_every_docs_page_is_linked_from_the_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
    assert pages and [p for p in pages if p not in readme] == []


def test_the_readme_settings_file_is_accepted_as_written(tmp_path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    example = next(block for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "DATA_DIR" in block)
    (tmp_path / "my_settings.py").write_text(example)
    cfg = settings.load_settings([f"--config={tmp_path / 'my_settings.py'}"])
    assert cfg.DATA_DIR and len(cfg.SEEN_CLASSES) >= 2
