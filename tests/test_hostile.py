"""Bad settings as a user would give them. Every value is checked once, through the one
load_settings path, table-driven over the schema (test_every_setting_refuses_a_wrong_value); then
one smoke per script shows that each script's main() turns a refused setting into one `error:` line
on stderr and exit status 1 before it writes anything (not even the output folders)."""
import importlib

import pytest
from conftest import dir_args, one_error_line

import evaluate
from plankton import registry, settings, system
from plankton.errors import PipelineError

# A wrong value of each kind of setting (bounds aside, which test_settings.py covers value by value).
WRONG = {"int": "'many'", "float": "'abc'", "bool": "'false'", "str": "'no-such-choice'", "path": "''",
         "classes": "[]", "names": "['a', 'a']", "device": "'tpu'", "seeds": "[1]", "modules": "[]",
         "words": "['no-such-choice']", "group": "'path:first'"}



@pytest.mark.parametrize("name", list(settings.SCHEMA))
def test_every_setting_refuses_a_wrong_value_in_one_line_naming_it(name):
    rule = settings.SCHEMA[name]
    with pytest.raises(PipelineError) as refused:
        settings.load_settings([f"--{name}={WRONG[rule.kind]}"])
    message = str(refused.value)
    assert message.startswith(f"{name}=") and "\n" not in message, message


SCRIPTS = [s.name for s in registry.STAGES] + ["run_all", "verify"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_stops_on_a_bad_setting_before_writing_anything(tmp_path, capsys, script):
    main = importlib.import_module(script).main
    line = one_error_line(capsys, main, [*dir_args(tmp_path), "--BATCH_SIZE=0"])
    assert line == "error: BATCH_SIZE=0: must be an integer >= 1"
    assert not list(tmp_path.iterdir()), "an output folder was made before the settings were checked"


@pytest.mark.parametrize("argument, said", [("--MAX_EPOCH=3", "MAX_EPOCH"), ("--config=/no/such/settings.py", "settings"),
                                            ("stray", "stray")])
def test_a_misspelt_name_a_missing_file_or_a_stray_word_is_one_line(tmp_path, capsys, argument, said):
    line = one_error_line(capsys, evaluate.main, [*dir_args(tmp_path), argument])
    assert said in line and not list(tmp_path.iterdir())


def test_help_lists_every_setting_and_exits_0(capsys):
    from plankton import settings
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in settings.SCHEMA)


def test_a_tilde_in_a_folder_setting_is_the_home_folder(tmp_path, monkeypatch):
    from plankton import settings
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = settings.load_settings(["--OUTPUT_DIR=~/runs/out"])
    assert cfg.OUTPUT_DIR == str(tmp_path / "runs" / "out")


def test_a_second_run_on_the_same_folders_stops_at_once(tmp_path, capsys):
    import subprocess
    import sys
    import time
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from plankton import runner\n"
        "from pathlib import Path\n"
        "with runner.folder_lock(Path(sys.argv[2])):\n"
        "    print('held', flush=True); time.sleep(60)"), str(system.REPO_DIR), str(tmp_path / "outputs")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(capsys, evaluate.main, dir_args(tmp_path))
        assert f"pid {holder.pid}" in line and "in use by another run" in line
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    line = one_error_line(capsys, evaluate.main, dir_args(tmp_path))  # the lock died with its holder
    assert "run train.py first" in line
