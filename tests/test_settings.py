"""settings.py: every hostile value is one clear error naming the setting; files, overrides and --help."""
import re
from pathlib import Path

import pytest

from plankton import settings
from plankton.errors import PipelineError

CONFIGFILE = settings.DEFAULTS_FILE


def configfile_lines() -> list[tuple[str, str]]:
    """(NAME, trailing comment) for each `NAME = value  # comment` line of configfile.py, read line by
    line here, independently of settings.setting_docs."""
    found = []
    for line in CONFIGFILE.read_text().splitlines():
        match = re.match(r"([A-Z][A-Z0-9_]*) = (.*?)  # (.*)$", line)
        if match:
            found.append((match.group(1), match.group(3)))
    return found


def configfile_values() -> dict:
    namespace: dict = {}
    exec(CONFIGFILE.read_text(), namespace)
    return {name: value for name, value in namespace.items() if name.isupper()}


# ---- the defaults ---------------------------------------------------------------------------------

def test_schema_describes_exactly_the_settings_of_configfile_in_its_order():
    assert list(settings.SCHEMA) == [name for name, _ in configfile_lines()]
    assert list(settings.SCHEMA) == list(configfile_values())


def test_default_configfile_validates_to_its_own_values():
    assert vars(settings.load_settings([])) == configfile_values()


# ---- hostile values -------------------------------------------------------------------------------

HOSTILE = [
    ("BATCH_SIZE", "0"), ("LR", "abc"), ("LR", "0"), ("LR", "1e999"), ("SEED", "x"), ("SEED", "-1"),
    ("SEED", "True"), ("SEED", "4294967296"), ("DEVICE", "tpu"), ("DEVICE", "cuda:x"), ("NUM_WORKERS", "-1"),
    ("NUM_WORKERS", "Auto"), ("DROPOUT", "1.5"), ("DROPOUT", "-0.1"), ("UMAP_SAMPLES", "0"),
    ("UMAP_NEIGHBORS", "1"), ("CLOSE_FAR_COUNT", "0"), ("EMBEDDING_DIM", "0"), ("EMBEDDING_DIM", "2.5"),
    ("IMAGE_SIZE", "8"), ("IMAGE_SIZE", "4096"), ("MAX_EPOCHS", "0"), ("PATIENCE", "0"), ("VAL_PER_EPOCH", "0"),
    ("UNSEEN_CLASSES", "[]"), ("UNSEEN_CLASSES", '["6"]'), ("SEEN_CLASSES", '["a", "a", "b"]'),
    ("SEEN_CLASSES", '["a", ""]'), ("SEEN_CLASSES", "a,b"), ("TRAIN_FRACTION", "0.9"), ("TEST_FRACTION", "-0.2"),
    ("VAL_FRACTION", "0"), ("CACHE_DTYPE", "int8"), ("BAD_IMAGES", "foo"), ("RESIZE_MODE", "crop"),
    ("CLOSE_FAR_SPACE", "pca"), ("TRUNK", "vgg16"), ("TRANSFER_TEST_FRACTION", "1"), ("TRANSFER_REPEATS", "0"),
    ("KNN_K", "0"), ("OUTPUT_DIR", ""), ("OUTPUT_DIR", "/"), ("OUTPUT_DIR", str(CONFIGFILE.parent)),
    ("CHECKPOINT_DIR", "/"), ("CACHE_DIR", str(CONFIGFILE.parent)), ("WEIGHTS", ""), ("DATA_DIR", "7"),
    ("AUGMENT", "false"), ("RESUME", "false"), ("CACHE_TRUNK", "false"), ("AUGMENT", "1"),
]


@pytest.mark.parametrize("key, text", HOSTILE)
def test_a_hostile_value_is_one_line_naming_the_setting(key, text):
    with pytest.raises(PipelineError) as caught:
        settings.load_settings([f"--{key}={text}"])
    message = str(caught.value)
    assert key in message and "\n" not in message


def test_the_message_names_the_value_and_what_is_accepted():
    with pytest.raises(PipelineError, match=r"^BATCH_SIZE=0: must be an integer >= 1$"):
        settings.load_settings(["--BATCH_SIZE=0"])
    with pytest.raises(PipelineError, match=r"^CACHE_DTYPE='int8': must be 'float16' or 'float32'$"):
        settings.load_settings(["--CACHE_DTYPE=int8"])
    with pytest.raises(PipelineError, match=r"'6' also in SEEN_CLASSES"):
        settings.load_settings(['--SEEN_CLASSES=["0", "6"]'])


@pytest.mark.parametrize("key", [name for name, rule in settings.SCHEMA.items() if rule.kind == "bool"])
def test_booleans_accept_only_true_and_false(key):
    for text in ("false", "FALSE", "0", "None", "'True'"):
        with pytest.raises(PipelineError, match=f"^{key}=.*: use True or False$"):
            settings.load_settings([f"--{key}={text}"])
    assert getattr(settings.load_settings([f"--{key}=False"]), key) is False
    assert getattr(settings.load_settings([f"--{key}=True"]), key) is True


def test_good_values_pass_and_are_normalised():
    cfg = settings.load_settings(["--LR=1", "--DEVICE=cuda:1", "--NUM_WORKERS=3", "--WEIGHTS=None",
                                  "--TRAIN_FRACTION=0.8", "--TEST_FRACTION=0.15", "--SEEN_CLASSES=('x', 'y')"])
    assert cfg.LR == 1.0 and isinstance(cfg.LR, float)
    assert (cfg.DEVICE, cfg.NUM_WORKERS, cfg.WEIGHTS, cfg.SEEN_CLASSES) == ("cuda:1", 3, None, ["x", "y"])


def test_tilde_is_expanded_in_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = settings.load_settings(["--OUTPUT_DIR=~/x", "--CHECKPOINT_DIR=~/c", "--CACHE_DIR=~/k",
                                  "--DATA_DIR=~/images", "--BUILTIN_DATA_DIR=~/digits", "--WEIGHTS=~/w.pth"])
    assert cfg.OUTPUT_DIR == str(tmp_path / "x") and cfg.WEIGHTS == str(tmp_path / "w.pth")
    assert "~" not in "".join([cfg.CHECKPOINT_DIR, cfg.CACHE_DIR, cfg.DATA_DIR, cfg.BUILTIN_DATA_DIR])


def test_seed_none_draws_a_seed_once_and_says_so(capsys):
    first = settings.load_settings(["--SEED=None"]).SEED
    second = settings.load_settings(["--SEED=None"]).SEED
    printed = capsys.readouterr().out
    assert isinstance(first, int) and 0 <= first < 2**32 and first != second
    assert f"SEED=None: drew seed {first}" in printed and printed.count("drew seed") == 2


# ---- arguments and settings files -----------------------------------------------------------------

def test_unknown_key_suggests_the_close_setting():
    with pytest.raises(PipelineError, match=r"BATCHSIZE is not a setting; did you mean BATCH_SIZE\?"):
        settings.load_settings(["--BATCHSIZE=3"])
    with pytest.raises(PipelineError, match="did you mean BATCH_SIZE"):
        settings.load_settings(["--batch_size=3"])
    with pytest.raises(PipelineError, match="unknown argument"):
        settings.load_settings(["BATCH_SIZE=3"])


def test_partial_config_file_takes_the_rest_from_configfile(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("import os\nhelper = 2\nMAX_EPOCHS = helper\nSEEN_CLASSES = ['a', 'b']\n")
    cfg = settings.load_settings([f"--config={mine}", "--LR=0.01"])
    expected = configfile_values() | {"MAX_EPOCHS": 2, "SEEN_CLASSES": ["a", "b"], "LR": 0.01}
    assert vars(cfg) == expected


def test_config_file_values_are_checked_too(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("BATCH_SIZE = 0\n")
    with pytest.raises(PipelineError, match="^BATCH_SIZE=0"):
        settings.load_settings([f"--config={mine}"])
    assert settings.load_settings([f"--config={mine}", "--BATCH_SIZE=4"]).BATCH_SIZE == 4  # the command line wins


def test_misspelt_name_in_config_file_names_file_and_suggestion(tmp_path):
    mine = tmp_path / "mine.py"
    mine.write_text("MAX_EPOCH = 2\n")
    with pytest.raises(PipelineError) as caught:
        settings.load_settings([f"--config={mine}"])
    message = str(caught.value)
    assert str(mine) in message and "MAX_EPOCH is not a setting; did you mean MAX_EPOCHS?" in message


def test_broken_or_missing_config_file_is_one_clear_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("SEED = 0\nLR = 0.001 +\n")
    with pytest.raises(PipelineError, match="cannot read settings file"):
        settings.load_settings([f"--config={broken}"])
    with pytest.raises(PipelineError, match="no settings file at"):
        settings.load_settings([f"--config={tmp_path / 'absent.py'}"])


# ---- help, dict, differences ----------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_value_and_comment_and_exits_0(flag, capsys):
    with pytest.raises(SystemExit) as caught:
        settings.load_settings(["--MAX_EPOCHS=3", flag])
    assert caught.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ")
    positions = []
    for name, comment in configfile_lines():
        value = 3 if name == "MAX_EPOCHS" else configfile_values()[name]
        assert f"  {name} = {value!r}\n      {comment}\n" in printed, name
        positions.append(printed.index(f"  {name} = "))
    assert positions == sorted(positions)
    for section in ("data", "images", "split", "model", "training", "speed", "outputs", "analysis"):
        assert f"---- {section} ----" in printed
    assert "accepts: an integer >= 1" in printed


def test_help_text_groups_settings_under_their_configfile_section():
    text = settings.help_text(settings.load_settings([]))
    assert text.index("---- model ----") < text.index("  TRUNK = ") < text.index("---- training ----")


def test_settings_dict_is_plain_json_values():
    cfg = settings.load_settings([])
    cfg.SEEN_CLASSES, cfg.OUTPUT_DIR = ("a", "b"), Path("out")
    plain = settings.settings_dict(cfg)
    assert plain["SEEN_CLASSES"] == ["a", "b"] and plain["OUTPUT_DIR"] == "out" and plain["DATA_DIR"] is None


def test_differences_lists_changed_keys_only():
    old = {"MAX_EPOCHS": 50, "LR": 0.0014, "DEVICE": "cpu"}
    new = {"MAX_EPOCHS": 2, "LR": 0.0014, "DEVICE": "cuda", "TRUNK": "resnet18"}
    assert settings.differences(old, new, ["MAX_EPOCHS", "LR", "DEVICE", "TRUNK"]) == [
        "MAX_EPOCHS: 50 -> 2", "DEVICE: 'cpu' -> 'cuda'", "TRUNK: (not set) -> 'resnet18'"]
    assert settings.differences(old, dict(old), old) == []
