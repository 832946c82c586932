"""Settings as an attacker or a tired user gives them (issue 19, items 3 and 9): folder settings that
name a file or a device, or that put the pipeline's folders inside the data; settings files that
exit, or whose objects raise from every method; tens of thousands of class names. Each ends in one
`error:` line and exit status 1 before any folder is made, or in a correct result."""
import os
from pathlib import Path

import pytest
from conftest import dir_args, make_image_folder, one_error_line

import evaluate
from plankton import settings
from plankton.errors import PipelineError

# ---- folder settings that name a file or a device ------------------------------------------------

@pytest.mark.parametrize("name", ["OUTPUT_DIR", "CHECKPOINT_DIR", "CACHE_DIR"])
@pytest.mark.parametrize("where", ["a file", "inside a file", "a device"])
def test_a_folder_setting_naming_a_file_or_a_device_is_one_line(tmp_path, capsys, name, where):
    users_file = tmp_path / "notes.txt"
    users_file.write_text("the user's notes\n")
    value = {"a file": users_file, "inside a file": users_file / "sub", "a device": Path(os.devnull)}[where]
    line = one_error_line(capsys, evaluate.main, [*dir_args(tmp_path / "run"), f"--{name}={value}"])
    assert line.startswith(f"error: {name}=") and "not a folder" in line, line
    assert users_file.read_text() == "the user's notes\n"
    assert not (tmp_path / "run").exists(), "a folder was made before the settings were refused"


@pytest.mark.parametrize("name", ["DATA_DIR", "PREDICT_DIR", "BUILTIN_DATA_DIR"])
def test_an_input_folder_setting_naming_a_file_is_refused_by_the_settings(tmp_path, name):
    users_file = tmp_path / "notes.txt"
    users_file.write_text("x")
    with pytest.raises(PipelineError, match=f"^{name}=.*not a folder"):
        settings.load_settings([*dir_args(tmp_path), f"--{name}={users_file}"])


# ---- the pipeline's folders inside the data -------------------------------------------------------

@pytest.mark.parametrize("name", ["OUTPUT_DIR", "CHECKPOINT_DIR", "CACHE_DIR"])
def test_an_output_folder_inside_the_data_is_one_line_and_writes_nothing_there(tmp_path, capsys, name):
    data = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    before = sorted(p for p in data.rglob("*"))
    line = one_error_line(capsys, evaluate.main, [*dir_args(tmp_path), f"--DATA_DIR={data}",
                                                  f"--{name}={data / 'a' / 'figures'}"])
    assert line.startswith(f"error: {name}=") and "inside DATA_DIR" in line, line
    assert sorted(p for p in data.rglob("*")) == before


def test_an_output_folder_reaching_the_data_through_a_link_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    (tmp_path / "shortcut").symlink_to(data / "b")
    with pytest.raises(PipelineError, match="^OUTPUT_DIR=.*inside DATA_DIR"):
        settings.load_settings([*dir_args(tmp_path), f"--DATA_DIR={data}",
                                f"--OUTPUT_DIR={tmp_path / 'shortcut' / 'out'}"])


def test_the_data_folder_itself_is_no_output_folder(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    with pytest.raises(PipelineError, match="^CACHE_DIR=.*inside DATA_DIR"):
        settings.load_settings([*dir_args(tmp_path), f"--DATA_DIR={data}", f"--CACHE_DIR={data}"])


def test_an_output_folder_inside_the_builtin_data_or_the_predict_folder_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="^OUTPUT_DIR=.*inside BUILTIN_DATA_DIR"):
        settings.load_settings([*dir_args(tmp_path), f"--BUILTIN_DATA_DIR={tmp_path / 'digits'}",
                                f"--OUTPUT_DIR={tmp_path / 'digits' / '3' / 'out'}"])
    with pytest.raises(PipelineError, match="^CHECKPOINT_DIR=.*inside PREDICT_DIR"):
        settings.load_settings([*dir_args(tmp_path), f"--PREDICT_DIR={tmp_path / 'new'}",
                                f"--CHECKPOINT_DIR={tmp_path / 'new' / 'checkpoints'}"])


def test_folders_beside_the_data_and_the_defaults_pass(tmp_path):
    data = make_image_folder(tmp_path / "images", {"a": 2, "b": 2})
    cfg = settings.load_settings([*dir_args(tmp_path), f"--DATA_DIR={data}", f"--PREDICT_DIR={tmp_path / 'new'}"])
    assert cfg.OUTPUT_DIR == str(tmp_path / "outputs")
    assert settings.load_settings([]).OUTPUT_DIR == "outputs"  # built-in data in data/digits, outputs beside it
    assert settings.load_settings(["--TASK='multilabel'"]).CACHE_DIR == "cache"


# ---- settings files that exit or raise -------------------------------------------------------------

@pytest.mark.parametrize("body", ["raise SystemExit(0)", "raise SystemExit", "import sys\nsys.exit('bye')",
                                  "raise SystemExit(3)", "exit()"])
def test_a_settings_file_that_exits_is_an_error_naming_the_file(tmp_path, capsys, body):
    config = tmp_path / "my_settings.py"
    config.write_text(f"LR = 0.01\n{body}\n")
    line = one_error_line(capsys, evaluate.main, [*dir_args(tmp_path / "run"), f"--config={config}"])
    assert str(config) in line and "SystemExit" in line, line
    assert not (tmp_path / "run").exists()


HOSTILE_OBJECTS = '''
class Boom(Exception):
    def __str__(self):
        raise RuntimeError("no message either")

def boom(*args, **kwargs):
    raise Boom()

class Names(list):
    __iter__ = __len__ = __eq__ = __ne__ = __contains__ = __repr__ = __str__ = __bool__ = boom
    __hash__ = None
    def count(self, *args):
        boom()

class Word(str):
    __eq__ = __ne__ = __hash__ = __repr__ = __str__ = __len__ = __iter__ = __contains__ = boom
    def strip(self, *args):
        boom()

class Folder:
    __fspath__ = __eq__ = __repr__ = __str__ = boom
    __hash__ = None

class Thing:
    __eq__ = __repr__ = __str__ = __bool__ = __index__ = __float__ = __int__ = boom
    __hash__ = None
'''


@pytest.mark.parametrize("assignment", ["OUTPUT_DIR = Folder()", "LR = Thing()", "AUGMENT = Thing()",
                                        "SEEN_CLASSES = ['a', Thing()]", "raise Boom()"])
def test_a_settings_file_whose_objects_raise_from_every_method_is_one_line(tmp_path, capsys, assignment):
    config = tmp_path / "hostile_settings.py"
    config.write_text(HOSTILE_OBJECTS + assignment + "\n")
    line = one_error_line(capsys, evaluate.main, [*dir_args(tmp_path / "run"), f"--config={config}"])
    assert str(config) in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("assignment, name, value", [
    ("SEEN_CLASSES = Names(['a', 'b'])", "SEEN_CLASSES", ["a", "b"]), ("DEVICE = Word('cpu')", "DEVICE", "cpu"),
    ("TRUNK = Word('resnet18')", "TRUNK", "resnet18"), ("SEEDS = Names([1, 2])", "SEEDS", [1, 2]),
    ("SEEN_CLASSES = [Word('a'), 'b']", "SEEN_CLASSES", ["a", "b"])])
def test_a_builtin_subclass_whose_methods_raise_is_read_as_its_plain_value(tmp_path, assignment, name, value):
    config = tmp_path / "hostile_settings.py"
    config.write_text(HOSTILE_OBJECTS + assignment + "\n")
    cfg = settings.load_settings([*dir_args(tmp_path), f"--config={config}"])
    assert getattr(cfg, name) == value
    assert type(getattr(cfg, name)) is type(value) and all(type(v) in (str, int) for v in getattr(cfg, name))


def test_plain_subclasses_and_paths_in_a_settings_file_keep_working(tmp_path):
    config = tmp_path / "settings.py"
    config.write_text("import numpy as np\nfrom pathlib import Path\n"
                      f"OUTPUT_DIR = Path({str(tmp_path / 'out')!r})\nLR = np.float64(0.5)\n"
                      "SEEN_CLASSES = ('0', '1', '2')\n")
    cfg = settings.load_settings([f"--config={config}"])
    assert cfg.OUTPUT_DIR == str(tmp_path / "out") and type(cfg.LR) is float and cfg.LR == 0.5
    assert cfg.SEEN_CLASSES == ["0", "1", "2"]


# ---- many class names ------------------------------------------------------------------------------

def test_fifty_thousand_class_names_are_checked_and_a_repeat_is_named(tmp_path):
    config = tmp_path / "many.py"
    config.write_text("SEEN_CLASSES = [f's{i}' for i in range(50_000)]\n"
                      "UNSEEN_CLASSES = [f'u{i}' for i in range(50_000)]\n"
                      "RANKED_CLASSES = SEEN_CLASSES[:20_000]\n")
    cfg = settings.load_settings([f"--config={config}"])
    assert len(cfg.SEEN_CLASSES) == 50_000 and cfg.SEEN_CLASSES[-1] == "s49999"
    config.write_text(config.read_text() + "SEEN_CLASSES = SEEN_CLASSES + ['s123', 's7']\n")
    with pytest.raises(PipelineError, match=r"^SEEN_CLASSES=.*'s123', 's7' listed more than once"):
        settings.load_settings([f"--config={config}"])
    config.write_text(config.read_text() + "SEEN_CLASSES = SEEN_CLASSES[:-2]\nUNSEEN_CLASSES += ['s9']\n")
    with pytest.raises(PipelineError, match=r"^UNSEEN_CLASSES=.*'s9' also in SEEN_CLASSES"):
        settings.load_settings([f"--config={config}"])
