"""One owner for the pipeline's settings: what each accepts (SCHEMA), reading them, checking them,
listing them and comparing them.

    cfg = settings.load_settings()      # reads sys.argv[1:]; runner.run_script does this for a script
    python train.py --help              # every setting with its value, its comment and what it accepts

Where the values come from, a later source winning:
1. configfile.py, the defaults: every setting has a line there with a trailing comment.
2. --config=FILE, a Python file. It RUNS AS CODE (exec), so give only files you trust. The
   upper-case names it sets replace configfile.py's values; the names it leaves out keep them.
   An upper-case name that is not a setting is an error (lower-case names are free for helper
   variables). Relative paths in it, as everywhere, are relative to the current folder.
3. --KEY=VALUE, read with ast.literal_eval (5, 0.1, True, None, ["a", "b"]); anything that is not
   a Python literal is a string, so --DEVICE=cpu needs no quotes.

Then every value is checked against SCHEMA, and the settings against each other (the three split
fractions sum to 1, seen and unseen classes are disjoint, folder settings name no file or device,
OUTPUT_DIR, CHECKPOINT_DIR and CACHE_DIR are neither the repository's folder, a filesystem root nor
inside the images). A settings file's values are read as plain built-in values (plain_value), and
a settings file that raises anything, SystemExit included, is an error. The first failure raises
PipelineError with one line naming the setting, the value and what it accepts:
`BATCH_SIZE=0: must be an integer >= 1`. Checked values come back normalised: a float setting given
as an int is a float, a class list is a list, `~` in a path is expanded.

SEED=None means "a fresh seed for this run": load_settings draws one from os.urandom, prints
`SEED=None: drew seed N ...` once and returns SEED=N, so every consumer gets an int and checkpoints
record the seed actually used (pass --SEED=N to repeat the run).

--help (or -h) prints help_text(cfg) with the values as given so far and raises SystemExit(0):
runner.run_script lets SystemExit through, so the script exits 0 without running.
"""
import ast
import collections
import dataclasses
import difflib
import io
import os
import re
import sys
import tokenize
import types
from collections.abc import Collection
from pathlib import Path

import backbone
from plankton import annotation, drift, ecotaxa, fileio, heads, openset, orientations, projection, tasks, training
from plankton.errors import PipelineError
from plankton.system import REPO_DIR

DEFAULTS_FILE = REPO_DIR / "configfile.py"
HELP_FLAGS = ("--help", "-h")


# ---- what each setting accepts -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    kind: str  # "int", "float", "bool", "str", "path", "classes", "names", "modules", "device", "seeds" or "words"
    bounds: str = ""  # numbers only, an interval: "[1, inf)" is >= 1, "(0, 1)" is strictly between 0 and 1
    choices: Collection[str] = ()  # words accepted as they are (the only values of a "str" setting);
    # a table (dict) itself where the choices are its keys, so that a new entry is accepted at once
    none_ok: bool = False  # None is accepted too


SCHEMA: dict[str, Rule] = {  # in configfile.py's order
    # data
    "DATA_DIR": Rule("path", none_ok=True),
    "SEEN_CLASSES": Rule("classes"),
    "UNSEEN_CLASSES": Rule("classes"),
    "BUILTIN_DATA_DIR": Rule("path"),
    "BAD_IMAGES": Rule("str", choices=("skip", "error")),
    # images
    "IMAGE_SIZE": Rule("int", "[16, 2048]"),
    "RESIZE_MODE": Rule("str", choices=("stretch", "pad")),
    "AUGMENT": Rule("bool"),
    "TTA": Rule("str", choices=orientations.TTA),
    # split
    "TRAIN_FRACTION": Rule("float", "(0, 1)"),
    "VAL_FRACTION": Rule("float", "(0, 1)"),
    "TEST_FRACTION": Rule("float", "(0, 1)"),
    # model
    "TRUNK": Rule("str", choices=backbone.TRUNKS),
    "WEIGHTS": Rule("path", choices=("auto", "imagenet"), none_ok=True),
    "EMBEDDING_DIM": Rule("int", "[1, inf)"),
    "DROPOUT": Rule("float", "[0, 1)"),
    # training
    "BATCH_SIZE": Rule("int", "[1, inf)"),
    "LR": Rule("float", "(0, inf)"),
    "MAX_EPOCHS": Rule("int", "[1, inf)"),
    "PATIENCE": Rule("int", "[1, inf)"),
    "VAL_PER_EPOCH": Rule("int", "[1, inf)"),
    "CLASSWISE_TRAIN": Rule("str", choices=("batches", "pass")),
    "CLASSWISE_SAMPLES": Rule("int", "[1, inf)"),
    "RESUME": Rule("bool"),
    "SEED": Rule("int", "[0, 4294967295]", none_ok=True),  # numpy.random.seed stops at 2**32 - 1
    # rare classes, grouped splits
    "CLASS_WEIGHTS": Rule("str", choices=training.CLASS_WEIGHTS),
    "BALANCED_SAMPLING": Rule("bool"),
    "MAX_PER_CLASS": Rule("int", "[1, inf)", none_ok=True),
    "SELECT_BY": Rule("str", choices=training.SELECTIONS),
    "GROUP_BY": Rule("group", choices=("sample_id",), none_ok=True),
    "GROUP_CSV": Rule("path", none_ok=True),
    # speed
    "DEVICE": Rule("device", choices=("auto", "cpu", "cuda")),
    "NUM_WORKERS": Rule("int", "[0, inf)", choices=("auto",)),
    "CACHE_TRUNK": Rule("bool"),
    "CACHE_DTYPE": Rule("str", choices=("float16", "float32")),
    "MIXED_PRECISION": Rule("bool"),
    "CHANNELS_LAST": Rule("bool"),
    "DETERMINISTIC": Rule("bool"),
    # outputs
    "OUTPUT_DIR": Rule("path"),
    "CHECKPOINT_DIR": Rule("path"),
    "CACHE_DIR": Rule("path"),
    "COMPILE_AHEAD": Rule("bool"),
    "EXPORT_CSV": Rule("bool"),
    # analysis
    "DIMRED": Rule("str", choices=projection.METHODS),
    "UMAP_SAMPLES": Rule("int", "[2, inf)"),
    "UMAP_NEIGHBORS": Rule("int", "[2, inf)"),
    "DISTANCE_SAMPLES": Rule("int", "[2, inf)"),
    "CLOSE_FAR_COUNT": Rule("int", "[1, inf)"),
    "CLOSE_FAR_SPACE": Rule("str", choices=("embedding", "umap")),
    "TRANSFER_TEST_FRACTION": Rule("float", "(0, 1)"),
    "TRANSFER_REPEATS": Rule("int", "[1, inf)"),
    "TRANSFER_MAX_TRAIN": Rule("int", "[2, inf)"),
    "KNN_K": Rule("int", "[1, inf)"),
    # fine-tuning
    "FINETUNE_BLOCKS": Rule("int", "[0, inf)"),
    "FINETUNE_LR": Rule("float", "(0, inf)"),
    # evaluation extras: reproduction check, ranked images
    "REPRO_TOLERANCE": Rule("float", "[0, 1]"),
    "RANKED_CLASSES": Rule("names"),
    "RANKED_AMONG": Rule("str", choices=("class", "all")),
    # training options and seed robustness
    "OPTIMIZER": Rule("str", choices=training.OPTIMIZERS),
    "MOMENTUM": Rule("float", "[0, 1)"),
    "WEIGHT_DECAY": Rule("float", "[0, inf)"),
    "LR_SCHEDULE": Rule("str", choices=training.SCHEDULES),
    "LR_STEP_EPOCHS": Rule("int", "[1, inf)"),
    "LR_GAMMA": Rule("float", "(0, 1]"),
    "COLOR_JITTER": Rule("float", "[0, 1]"),
    "LABEL_SMOOTHING": Rule("float", "[0, 1)"),
    "SPLIT_SEED": Rule("int", "[0, 4294967295]", none_ok=True),
    "SEEDS": Rule("seeds", "[0, 4294967295]"),
    # dataset overview
    "OVERVIEW_SAMPLES": Rule("int", "[1, 64]"),
    # feature maps
    "FEATURE_MODULES": Rule("modules", choices=("auto",)),
    "FEATURE_IMAGES": Rule("int", "[2, inf)"),
    "FEATURE_MAP_DIR": Rule("path", none_ok=True),
    # open-set detection, calibration, prediction
    "OPEN_SET_K": Rule("int", "[1, inf)"),
    "OPEN_SET_TRAIN_SAMPLES": Rule("int", "[1, inf)"),
    "OPEN_SET_KNN_METRIC": Rule("str", choices=("cosine", "euclidean")),
    "PREDICT_DIR": Rule("path", none_ok=True),
    "PREDICT_SCORE": Rule("str", choices=openset.SCORES),
    "PREDICT_KEEP": Rule("float", "(0, 1]"),
    "PREDICT_EMBEDDINGS": Rule("bool"),
    "ROUTE_PRECISION": Rule("float", "(0, 1]"),
    "PREDICT_SAMPLES": Rule("int", "[1, 32]"),
    "DRIFT_ALPHA": Rule("float", "(0, 1)", none_ok=True),
    "DRIFT_SAMPLES": Rule("int", f"[{drift.MIN_IMAGES}, inf)"),
    "PREDICT_BUNDLE": Rule("path", none_ok=True),
    "EXPORT_ONNX": Rule("bool"),
    "SAMPLE_BY": Rule("path", choices=("folder", "sample_id")),
    "ABUNDANCE_BOOTSTRAPS": Rule("int", "[0, 100000]"),
    # embedding quality, leaks between splits, few-shot transfer, suspicious labels
    "QUALITY_SAMPLES": Rule("int", "[3, inf)"),
    "QUALITY_TRUST_NEIGHBORS": Rule("int", "[1, inf)"),
    "LEAK_THRESHOLD": Rule("float", "[0, 2]"),
    "LEAK_GRID": Rule("int", "[1, 16]"),
    "LEAK_FIGURE_PAIRS": Rule("int", "[1, 200]"),
    "FEWSHOT_DRAWS": Rule("int", "[2, inf)"),
    "FEWSHOT_TEMPERATURE": Rule("float", "(0, inf)"),
    "SUSPECT_FOLDS": Rule("int", "[2, 50]"),
    "SUSPECT_COUNT": Rule("int", "[1, 200]"),
    # multi-label task
    "TASK": Rule("str", choices=tasks.TASK_OBJECTS),
    "LABELS_CSV": Rule("path", none_ok=True),
    "BUILTIN_MULTILABEL_DIR": Rule("path"),
    "TAIL_THRESHOLDS": Rule("int", "[2, 1000]"),
    # EcoTaxa
    "ECOTAXA_EXPORT": Rule("path", none_ok=True),
    "ECOTAXA_STATUSES": Rule("words", choices=ecotaxa.STATUSES),
    "ECOTAXA_MIN_COUNT": Rule("int", "[3, inf)"),
    "ECOTAXA_IMPORT_ZIP": Rule("bool"),
    # head losses
    "HEAD_LOSS": Rule("str", choices=heads.LOSS_NAMES),
    "HEAD_LOSS_WEIGHT": Rule("float", "(0, 100]"),
    "HEAD_COMPARE_LOSSES": Rule("names"),
    "HEAD_COMPARE_EPOCHS": Rule("int", "[1, inf)", none_ok=True),
    # what to annotate next
    "ANNOTATE_STRATEGY": Rule("str", choices=annotation.STRATEGIES),
    "ANNOTATE_BATCH": Rule("int", "[1, inf)"),
}
MIN_CLASSES = 2  # the classifier needs two seen classes, the transfer analysis two unseen ones
SPLIT_FRACTIONS = ("TRAIN_FRACTION", "VAL_FRACTION", "TEST_FRACTION")
# folders that are created and swept of leftover temporary files: never the repository or a root
OWN_FOLDERS = ("OUTPUT_DIR", "CHECKPOINT_DIR", "CACHE_DIR")
FOLDERS = OWN_FOLDERS + ("DATA_DIR", "BUILTIN_DATA_DIR", "PREDICT_DIR", "BUILTIN_MULTILABEL_DIR", "FEATURE_MAP_DIR")
KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "path": "a non-empty path",
              "classes": f"a list of at least {MIN_CLASSES} different, non-empty class names",
              "names": "a list of different, non-empty class names (may be empty)",
              "device": "'cuda:N' (N a GPU number)", "seeds": "a list of at least 2 different integers",
              "modules": "a non-empty list of different module names",
              "words": "a non-empty list of different names from",
              "group": "'path:N' (N >= 1: the N-th folder of the image's path) or 'csv:<column>' "
                       "(a column of GROUP_CSV)"}


def bounds_words(bounds: str) -> str:
    """"[1, inf)" -> " >= 1"; "(0, 1)" -> " > 0 and < 1"; "[16, 2048]" -> " from 16 to 2048"."""
    if not bounds:
        return ""
    low, high = (end.strip() for end in bounds[1:-1].split(","))
    if bounds[0] + bounds[-1] == "[]":
        return f" from {low} to {high}"
    words = [(">= " if bounds[0] == "[" else "> ") + low]
    if high != "inf":
        words.append(("<= " if bounds[-1] == "]" else "< ") + high)
    return " " + " and ".join(words)


def in_bounds(number, bounds: str) -> bool:
    """NaN is never in bounds; infinity only where an end is a closed "inf]", which no rule has."""
    if not bounds:
        return True
    low, high = (float(end) for end in bounds[1:-1].split(","))
    above = number >= low if bounds[0] == "[" else number > low
    below = number <= high if bounds[-1] == "]" else number < high
    return above and below


def accepts(rule: Rule) -> str:
    """What a rule accepts, in words: "an integer >= 1", "'auto' or an integer >= 0"."""
    if rule.kind == "words":  # a list drawn from the choices
        return f"{KIND_WORDS['words']} {', '.join(map(repr, rule.choices))}"
    words = [repr(choice) for choice in rule.choices]
    if rule.kind != "str":
        words.append(KIND_WORDS[rule.kind] + bounds_words(rule.bounds))
    if rule.none_ok:
        words.append("None")
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


# ---- checking one value: each returns the value normalised, or raises ValueError(why or "") -------

def check_number(value, rule: Rule):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_number = is_int or (rule.kind == "float" and isinstance(value, float))
    if not is_number or not in_bounds(value, rule.bounds):
        raise ValueError()
    return float(value) if rule.kind == "float" else value


def check_bool(value, rule: Rule) -> bool:
    if not isinstance(value, bool):  # "false" would be a non-empty string, hence true
        raise ValueError("use True or False")
    return value


def check_choice(value, rule: Rule) -> str:
    close = difflib.get_close_matches(str(value), rule.choices, n=1)
    raise ValueError(f"must be {accepts(rule)}" + (f" (did you mean {close[0]!r}?)" if close else ""))


def check_path(value, rule: Rule) -> str:
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise ValueError()
    return os.path.expanduser(value)


def check_names(value, rule: Rule) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(name, str) and name for name in value):
        raise ValueError()
    repeated = sorted(name for name, times in collections.Counter(value).items() if times > 1)  # linear
    if repeated:  # the model would get one output per entry, two of them for one class
        raise ValueError(f"{', '.join(map(repr, repeated))} listed more than once; name each class once")
    return list(value)


def check_classes(value, rule: Rule) -> list[str]:
    value = check_names(value, rule)
    if len(value) < MIN_CLASSES:
        raise ValueError()
    return value


def check_device(value, rule: Rule) -> str:
    if not (isinstance(value, str) and re.fullmatch(r"cuda:[0-9]+", value)):
        raise ValueError()
    return value


def check_seeds(value, rule: Rule) -> list[int]:
    if not isinstance(value, (list, tuple)) or len(set(value)) < 2 or len(set(value)) < len(value):
        raise ValueError()
    for seed in value:
        check_number(seed, Rule("int", rule.bounds))
    return [int(seed) for seed in value]


def check_modules(value, rule: Rule) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(name, str) and name for name in value):
        raise ValueError()
    if len(set(value)) != len(value):
        raise ValueError()
    return list(value)


def check_words(value, rule: Rule) -> list[str]:
    """A list of choices (a single word is a list of one): --ECOTAXA_STATUSES=validated."""
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not value or len(set(value)) != len(value):
        raise ValueError()
    wrong = [word for word in value if word not in rule.choices]
    if wrong:
        close = difflib.get_close_matches(str(wrong[0]), rule.choices, n=1)
        raise ValueError(f"{wrong[0]!r} is not one of {', '.join(map(repr, rule.choices))}"
                         + (f" (did you mean {close[0]!r}?)" if close else ""))
    return list(value)


def check_group(value, rule: Rule) -> str:
    """GROUP_BY: "path:N" with N >= 1, or "csv:<column>" with a non-empty column name ("sample_id" is a choice)."""
    if not isinstance(value, str) or not (re.fullmatch(r"path:[1-9][0-9]*", value)
                                          or re.fullmatch(r"csv:.*\S.*", value)):
        raise ValueError()
    return value


CHECKS = {"int": check_number, "float": check_number, "bool": check_bool, "str": check_choice,
          "path": check_path, "classes": check_classes, "names": check_names, "device": check_device,
          "seeds": check_seeds, "modules": check_modules, "words": check_words, "group": check_group}


def check_value(name: str, value, rule: Rule):
    """The value normalised, or a PipelineError naming the setting, the value and what it accepts."""
    if value is None and rule.none_ok:
        return None
    if isinstance(value, str) and value in rule.choices and rule.kind != "words":
        return value
    try:
        return CHECKS[rule.kind](value, rule)
    except ValueError as err:
        raise PipelineError(f"{name}={value!r}: {str(err) or 'must be ' + accepts(rule)}") from None


# ---- checking the settings together --------------------------------------------------------------

def check_together(values: dict) -> None:
    fractions = [values[name] for name in SPLIT_FRACTIONS]
    if abs(sum(fractions) - 1) > 1e-6:
        given = ", ".join(f"{name}={values[name]!r}" for name in SPLIT_FRACTIONS)
        raise PipelineError(f"{given}: must sum to 1 (they sum to {sum(fractions):.6g})")
    seen = set(values["SEEN_CLASSES"])  # a set: tens of thousands of names are checked in linear time
    shared = [name for name in values["UNSEEN_CLASSES"] if name in seen]
    if shared:
        raise PipelineError(f"UNSEEN_CLASSES={values['UNSEEN_CLASSES']!r}: {', '.join(map(repr, shared))} "
                            f"also in SEEN_CLASSES; a class is either seen or unseen")
    unknown = [name for name in values["RANKED_CLASSES"] if name not in seen]
    if unknown:
        raise PipelineError(f"RANKED_CLASSES={values['RANKED_CLASSES']!r}: {', '.join(map(repr, unknown))} not among "
                            f"the seen classes ({', '.join(values['SEEN_CLASSES'])}); [] ranks every seen class")
    check_folders(values)
    if values["FINETUNE_BLOCKS"]:  # backbone.py counts the trunk's blocks; torchvision is imported only then
        backbone.check_finetune_blocks(values["TRUNK"], values["FINETUNE_BLOCKS"])
    if values["LABELS_CSV"] is not None and values["TASK"] != "multilabel":  # it would silently do nothing
        raise PipelineError(f"LABELS_CSV={values['LABELS_CSV']!r}: read only with TASK='multilabel' (TASK is "
                            f"{values['TASK']!r}); set TASK='multilabel' or LABELS_CSV=None")
    if values["LABEL_SMOOTHING"] > 0 and values["TASK"] == "multilabel":
        raise PipelineError(f"LABEL_SMOOTHING={values['LABEL_SMOOTHING']!r}: smooths the multiclass loss only; "
                            f"set LABEL_SMOOTHING=0 with TASK='multilabel'")
    check_ecotaxa(values)
    check_rare_and_groups(values)
    if values["COLOR_JITTER"] > 0 and not values["AUGMENT"]:  # it would silently do nothing
        raise PipelineError(f"COLOR_JITTER={values['COLOR_JITTER']!r}: needs AUGMENT=True (jitter changes the trunk's "
                            f"input, so training images then go through the trunk); set AUGMENT=True or COLOR_JITTER=0")


def check_ecotaxa(values: dict) -> None:
    """ECOTAXA_EXPORT names something that exists, and is the run's one source of single-label images."""
    export = values["ECOTAXA_EXPORT"]
    if export is None:
        return
    if not os.path.exists(export):
        raise PipelineError(f"ECOTAXA_EXPORT={export!r}: no such file or folder; give an EcoTaxa export (a .tsv "
                            f"file, a folder of them with their images, or the .zip EcoTaxa writes)")
    if values["DATA_DIR"] is not None:
        raise PipelineError(f"ECOTAXA_EXPORT={export!r} and DATA_DIR={values['DATA_DIR']!r}: give one source of "
                            f"images; set DATA_DIR=None to train on the export")
    if values["TASK"] != "multiclass":
        raise PipelineError(f"ECOTAXA_EXPORT={export!r}: an export gives one category per object; use "
                            f"TASK='multiclass' (TASK is {values['TASK']!r})")


def check_rare_and_groups(values: dict) -> None:
    """The rare-class settings weigh one class per image; GROUP_BY's source must exist for the run."""
    task, group_by = values["TASK"], values["GROUP_BY"]
    if task == "multilabel":
        for name, off in (("CLASS_WEIGHTS", "none"), ("BALANCED_SAMPLING", False), ("MAX_PER_CLASS", None)):
            if values[name] != off:
                raise PipelineError(f"{name}={values[name]!r}: weighs one class per image, so TASK='multiclass' only "
                                    f"(TASK is 'multilabel'); set {name}={off!r}")
        if values["SELECT_BY"] not in ("auto", "val_loss"):
            raise PipelineError(f"SELECT_BY={values['SELECT_BY']!r}: a multiclass figure; with TASK='multilabel' "
                                f"use 'auto' (validation mAP) or 'val_loss'")
    if group_by == "sample_id" and values["ECOTAXA_EXPORT"] is None:
        raise PipelineError("GROUP_BY='sample_id': EcoTaxa's sample_id comes with ECOTAXA_EXPORT, which is None; "
                            "use 'path:N' or 'csv:<column>' for class folders")
    if group_by is not None and task != "multiclass":
        raise PipelineError(f"GROUP_BY={group_by!r}: grouped splits are drawn for single-label runs "
                            f"(TASK='multiclass'; TASK is {task!r}); set GROUP_BY=None")
    if isinstance(group_by, str) and group_by.startswith("csv:") and values["GROUP_CSV"] is None:
        raise PipelineError(f"GROUP_BY={group_by!r}: needs GROUP_CSV, a CSV with a 'path' column and the column "
                            f"{group_by[4:]!r}; set GROUP_CSV")
    if values["GROUP_CSV"] is not None and not (isinstance(group_by, str) and group_by.startswith("csv:")):
        raise PipelineError(f"GROUP_CSV={values['GROUP_CSV']!r}: read only with GROUP_BY='csv:<column>' (GROUP_BY is "
                            f"{group_by!r}); set GROUP_BY or GROUP_CSV=None")


def check_folders(values: dict) -> None:
    """Folder settings name folders (or nothing yet), never a file or a device; OUTPUT_DIR,
    CHECKPOINT_DIR and CACHE_DIR are neither the repository, a root, nor inside the images (DATA_DIR,
    or the built-in data it stands for, PREDICT_DIR or FEATURE_MAP_DIR): figures would land among the user's images.
    Paths are compared as real paths, so a link into the data is inside it too."""
    for name in FOLDERS:
        if values[name] is not None:
            blocker = _existing_non_folder(Path(values[name]))
            if blocker is not None:
                where = "" if blocker == Path(values[name]).expanduser() else f" ({blocker} is not a folder)"
                raise PipelineError(f"{name}={values[name]!r}: not a folder{where}; give a folder (it is created "
                                    f"if missing)")
    images = {name: Path(values[name]).resolve() for name in _image_folders(values)}
    export = values["ECOTAXA_EXPORT"]
    if export is not None and not (os.path.isfile(export) and export.lower().endswith(".zip")):
        images["ECOTAXA_EXPORT"] = Path(export).resolve().parent if os.path.isfile(export) else Path(export).resolve()
    for name in OWN_FOLDERS:
        folder = Path(values[name]).resolve()
        if folder == REPO_DIR or folder.parent == folder:
            what = "the repository's own folder" if folder == REPO_DIR else "a filesystem root"
            raise PipelineError(f"{name}={values[name]!r}: must be a folder the pipeline can own, "
                                f"not {what} ({folder})")
        for image_setting, image_folder in images.items():
            if folder.is_relative_to(image_folder):
                raise PipelineError(f"{name}={values[name]!r}: inside {image_setting} ({image_folder}), so the "
                                    f"pipeline's files would land among the images; choose a folder outside it")


def _image_folders(values: dict) -> list[str]:
    """The settings that name the folders of images this run reads."""
    if values["ECOTAXA_EXPORT"] is not None:
        data = []  # the export's folder, which check_folders adds
    elif values["DATA_DIR"] is not None:
        data = ["DATA_DIR"]
    else:
        data = ["BUILTIN_MULTILABEL_DIR" if values["TASK"] == "multilabel" else "BUILTIN_DATA_DIR"]
    return data + [name for name in ("PREDICT_DIR", "FEATURE_MAP_DIR") if values[name] is not None]


def _existing_non_folder(path: Path) -> Path | None:
    """The path itself or its nearest existing parent, if that is not a folder (a file, a device)."""
    for candidate in (path.expanduser(), *path.expanduser().parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


def draw_seed() -> int:
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"SEED=None: drew seed {seed}; run with --SEED={seed} to repeat this run")
    return seed


def validate(values: dict) -> dict:
    """Every setting checked and normalised (see the module docstring); SEED=None becomes a drawn seed.
    Raises PipelineError at the first failure."""
    unknown = [name for name in values if name not in SCHEMA]
    if unknown:
        raise unknown_name(unknown[0], "settings")
    missing = [name for name in SCHEMA if name not in values]
    if missing:
        raise PipelineError(f"{missing[0]} is not set; configfile.py gives every setting a value")
    checked = {name: check_value(name, value, SCHEMA[name]) for name, value in values.items()}
    check_together(checked)
    if checked["SEED"] is None:
        checked["SEED"] = draw_seed()
    return checked


# ---- reading --------------------------------------------------------------------------------------

def unknown_name(name: str, where: str) -> PipelineError:
    close = difflib.get_close_matches(name.upper(), SCHEMA, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return PipelineError(f"{where}: {name} is not a setting{hint} (--help lists them)")


def read_settings_file(path: Path) -> dict:
    """The upper-case names a settings file sets, as plain values (plain_value). The file runs as
    Python code; whatever it raises, SystemExit included (it must not end the script, silently or
    not), is one PipelineError naming the file."""
    if not path.is_file():
        raise PipelineError(f"no settings file at {path}")
    namespace: dict = {"__file__": str(path)}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
    except (Exception, SystemExit) as err:  # a typo in the settings file, or an exit()
        raise PipelineError(f"cannot read settings file {path}: {_said(err)}") from None
    values = {}
    for name, value in namespace.items():
        if isinstance(name, str) and name.isupper() and not name.startswith("_"):
            try:
                values[str.__str__(name)] = plain_value(value)
            except Exception as err:  # noqa: BLE001 - an object of the file's own whose methods raise
                raise PipelineError(f"{name} in settings file {path}: {_said(err)}; give a plain value "
                                    f"(a number, a string, True/False, None or a list of them)") from None
    return values


PLAIN_DEPTH = 4  # lists inside lists: no setting nests deeper


def plain_value(value, depth: int = 0):
    """value as built-in types only, so that no method of a settings file's own classes runs later
    (a str or float subclass becomes a str or float, a path its text, a list or tuple a list or tuple
    of plain values); TypeError for anything else. Built-in methods are called on the base type
    directly, so an override that raises is never reached."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(int.__int__(value))
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (list, tuple)) and depth < PLAIN_DEPTH:
        items = list.copy(value) if isinstance(value, list) else tuple.__getitem__(value, slice(None))
        plain = [plain_value(item, depth + 1) for item in items]
        return plain if isinstance(value, list) else tuple(plain)
    if isinstance(value, os.PathLike):
        return plain_value(os.fspath(value), depth + 1)
    raise TypeError(f"a {type(value).__name__} object")


def _said(err: BaseException) -> str:
    """"Type: message" of an exception, even one whose message itself raises."""
    kind = type(err).__name__
    try:
        text = str(err)
    except Exception:  # noqa: BLE001 - a hostile __str__
        text = ""
    if isinstance(err, SystemExit):
        return f"it raised SystemExit({text}); a settings file only sets values, it cannot end the script"
    return f"{kind}: {text}" if text else kind


def read_defaults() -> dict:
    """configfile.py's values; it must set exactly the settings SCHEMA describes."""
    values = read_settings_file(DEFAULTS_FILE)
    for name in values:
        if name not in SCHEMA:
            raise PipelineError(f"{DEFAULTS_FILE} sets {name}, which settings.SCHEMA does not describe; add a rule")
    for name in SCHEMA:
        if name not in values:
            raise PipelineError(f"{DEFAULTS_FILE} lacks {name}; every setting in settings.SCHEMA needs a line there")
    return values


def parse_value(text: str):
    """A Python literal, or else the text itself: "5" -> 5, "None" -> None, "cpu" -> "cpu"."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def parse_arguments(argv: list[str]) -> tuple[Path | None, dict, bool]:
    """(--config file or None, {KEY: value} overrides, whether help was asked for)."""
    config_file, overrides, wants_help = None, {}, False
    for arg in argv:
        if arg in HELP_FLAGS:
            wants_help = True
        elif arg.startswith("--config="):
            if config_file is not None:
                raise PipelineError(f"--config given twice ({config_file} and {arg[9:]}); give one settings file")
            config_file = Path(os.path.expanduser(arg[9:]))
        elif arg.startswith("--") and "=" in arg:
            key, text = arg[2:].split("=", 1)
            if key not in SCHEMA:
                raise unknown_name(key, f"--{key}={text}")
            overrides[key] = parse_value(text)
        else:
            raise PipelineError(f"unknown argument {arg!r}: use --config=FILE, --KEY=VALUE or --help")
    return config_file, overrides, wants_help


def load_settings(argv: list[str] | None = None) -> types.SimpleNamespace:
    """configfile.py, then --config=FILE (runs as Python code), then --KEY=VALUE, all checked.
    With --help or -h: prints help_text and raises SystemExit(0)."""
    config_file, overrides, wants_help = parse_arguments(sys.argv[1:] if argv is None else argv)
    values = read_defaults()
    if config_file is not None:
        for name, value in read_settings_file(config_file).items():
            if name not in SCHEMA:
                raise unknown_name(name, str(config_file))
            values[name] = value
    values.update(overrides)
    if wants_help:
        print(help_text(types.SimpleNamespace(**values)))
        raise SystemExit(0)
    return types.SimpleNamespace(**validate(values))


# ---- listing and comparing ------------------------------------------------------------------------

def setting_docs(path: Path = DEFAULTS_FILE) -> dict[str, tuple[str, str]]:
    """{NAME: (section, trailing comment)} for each `NAME = value  # comment` of a settings file, in
    file order; a section is the title of the last `# ---- title ----` line above the setting."""
    source = path.read_text()
    trailing, headings = {}, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#").strip()
        if token.line[:token.start[1]].strip():  # code before it on its line
            trailing[token.start[0]] = text
        elif text.startswith("----"):
            headings.append((token.start[0], text.strip("- ")))
    docs = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            section = next((title for line, title in reversed(headings) if line < node.lineno), "")
            comment = trailing.get(node.end_lineno) or trailing.get(node.lineno, "")
            docs[node.targets[0].id] = (section, comment)
    return docs


def help_text(cfg: types.SimpleNamespace) -> str:
    """A usage line, where settings come from, then every setting grouped as in configfile.py with
    its value in cfg, its comment there and what it accepts."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "<script>.py"
    lines = [f"usage: python {script} [--config=FILE] [--KEY=VALUE ...] [--help]", "",
             "Settings come from configfile.py, then from --config=FILE (a Python file that runs as code; the",
             "names it sets replace configfile.py's, the others keep theirs), then from --KEY=VALUE (a Python",
             "literal such as 5, 0.1, True, None or [\"a\", \"b\"]; a bare word is a string: --DEVICE=cpu)."]
    docs, section = setting_docs(), None
    for name, value in vars(cfg).items():
        here, comment = docs.get(name, ("other", ""))
        if here != section:
            lines += ["", f"---- {here} ----"]
            section = here
        lines.append(f"  {name} = {value!r}")
        if comment:
            lines.append(f"      {comment}")
        if name in SCHEMA:
            lines.append(f"      accepts: {accepts(SCHEMA[name])}")
    return "\n".join(lines)


def settings_dict(cfg: types.SimpleNamespace) -> dict:
    """The settings as plain JSON values (tuples become lists), fit for a weights_only checkpoint."""
    return fileio.plain_json(vars(cfg))


def differences(old: dict, new: dict, keys) -> list[str]:
    """"KEY: old -> new" for each of keys whose value differs, e.g. "MAX_EPOCHS: 50 -> 2"; a key that
    one side lacks (an older checkpoint) shows as (not set)."""
    missing = object()

    def show(value) -> str:
        return "(not set)" if value is missing else repr(value)

    lines = []
    for key in keys:
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            lines.append(f"{key}: {show(before)} -> {show(after)}")
    return lines


def reference_markdown() -> str:
    """docs/settings.md: every setting, grouped as in configfile.py, with its default, what it accepts
    and its comment there. tools/settings_reference.py writes it; a test checks that it is current."""
    defaults, docs = read_defaults(), setting_docs()
    lines = ["# Settings", "",
             "Generated from `plankton/settings.py`'s SCHEMA and `configfile.py` by "
             "`python tools/settings_reference.py`; do not edit by hand.", "",
             "Set them in `configfile.py`, in a file given with `--config=FILE` (only the names it changes), "
             "or for one run with `--KEY=VALUE`. `python <script>.py --help` lists them with their current values."]
    section = None
    for name, rule in SCHEMA.items():
        here, comment = docs.get(name, ("other", ""))
        if here != section:
            lines += ["", f"## {here}", "", "| setting | default | accepts | meaning |", "|---|---|---|---|"]
            section = here
        cells = [f"`{name}`", f"`{defaults[name]!r}`", accepts(rule), comment]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"
