"""safepickle.load_dataframe reads the frames DataFrame.to_pickle writes and refuses crafted pickles
without running them; the control tests show pd.read_pickle does run the same files."""
import base64
import importlib
import io
import os
import pickle
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pytest
from pandas.core.internals.blocks import Block

from plankton import safepickle
from plankton.safepickle import UnsafePickle


@pytest.fixture(autouse=True)
def python_backed_strings():
    """Strings made here are python-backed even where pyarrow is installed (see the pyarrow test)."""
    with pd.option_context("mode.string_storage", "python"):
        yield


def embeddings_frame(rows: int = 6, strings=None) -> pd.DataFrame:
    """Shaped like embed.py's output: label, class_name, path, e0 … e127 and provenance in attrs."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows, 128)).astype(np.float32), columns=[f"e{i}" for i in range(128)])
    frame.insert(0, "path", [f"c{i % 3}/img_{i:03d}.png" for i in range(rows)])
    frame.insert(0, "class_name", [f"c{i % 3}" for i in range(rows)])
    frame.insert(0, "label", (np.arange(rows) % 3).astype(np.int64))
    if strings is not None:
        frame = frame.astype({"class_name": strings, "path": strings})
    frame.attrs.update(checkpoint_sha256="ab" * 32, split_sha256="cd" * 32, subset="train",
                       class_names=["c0", "c1", "c2"], data_dir="/data", weights_source=None)
    return frame


def with_column(value, label="extra") -> pd.DataFrame:
    frame = embeddings_frame()
    frame[label] = pd.Series([value] * len(frame), dtype=object)
    return frame


def with_attr(value) -> pd.DataFrame:
    frame = embeddings_frame()
    frame.attrs["note"] = value
    return frame


def write(path, thing):
    if isinstance(thing, pd.DataFrame):
        thing.to_pickle(path, compression=None)
    else:
        path.write_bytes(thing if isinstance(thing, bytes) else pickle.dumps(thing))
    return path


def refusal(path) -> str:
    with pytest.raises(UnsafePickle) as caught:
        safepickle.load_dataframe(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# ---- frames the pipeline writes ------------------------------------------------------------------

def extras() -> pd.DataFrame:
    frame = embeddings_frame(strings="string[python]").copy()  # copy: one block per dtype
    frame["f64"], frame["flag"] = np.linspace(0, 1, len(frame)), np.arange(len(frame)) % 2 == 0
    frame["mixed"] = pd.Series(["a", 1, 2.5, None, True, "b"], dtype=object)
    frame.attrs.update(count=3, scale=0.5, ok=True, nested={"k": [1, "x", (2.0, None)]})
    return frame


FRAMES = {
    "default strings": lambda: embeddings_frame(),
    "object strings": lambda: embeddings_frame(strings=object),
    "NA strings, float64, bool, mixed object": extras,
    "no rows": lambda: embeddings_frame().iloc[:0],
    "filtered rows": lambda: embeddings_frame(rows=9).iloc[::2],
    "string index": lambda: embeddings_frame().set_index("path"),
    "columns interleaved": lambda: embeddings_frame()[["e1", "label", "e0", "e2", "class_name", "e3"]],
}


@pytest.mark.parametrize("writer", ["to_pickle", "save_dataframe"])
@pytest.mark.parametrize("name", FRAMES)
def test_frame_round_trips(tmp_path, name, writer):
    frame, path = FRAMES[name](), tmp_path / "embeddings_train.pkl"
    if writer == "to_pickle":
        write(path, frame)
    else:
        safepickle.save_dataframe(frame, path)
    loaded = safepickle.load_dataframe(path)
    pd.testing.assert_frame_equal(loaded, frame)
    assert loaded.attrs == frame.attrs


def test_pyarrow_strings_load_once_saved_with_save_dataframe(tmp_path):
    pytest.importorskip("pyarrow")
    with pd.option_context("mode.string_storage", "pyarrow"):
        frame = embeddings_frame()
    assert "ArrowStringArray" in refusal(write(tmp_path / "to_pickle.pkl", frame))
    safepickle.save_dataframe(frame, tmp_path / "saved.pkl")
    loaded = safepickle.load_dataframe(tmp_path / "saved.pkl")
    pd.testing.assert_frame_equal(loaded, embeddings_frame())  # the same values, python-backed
    assert loaded.attrs == frame.attrs


# to_pickle(compression=None) under pandas 2.2.3 / numpy 1.26.4 (pandas.core.frame, numpy.core.*) of
# the frame `expected` below; zlib + base64 only to keep it short
PANDAS_2_PICKLE = """
eNptU01v00AQtZO4AVrxUYlSLr0h0kvSVhw4IDVQVAksgtQD4lKtxs4ma9XeWLtrlUoghUNLK82NhTP/FGY3ifJBN/F6HO+8eW/yZhz9ajQCv/BRCbIPup2OFG8P
FBTc4t23YODYxz/t7nf7zbawwYqhsrizeDyThisJuW4XIGHIlba48SYfpWcfJs+U3sKtaQrLs0TPcyw+YJUss/Qs5yxxSXQaN2VVlBcTeAq5ylKL62ygRkVSDQYT
yN/bweIaH9LWpS9dY7r+dC1GHofufXNROhlYG7ywN9c/7IltxXUMX9ler/f+Ly2/xYGxSVyL61cWw2Nr6BjeSaosN5kkqpHOs9TBxPU4ikOHEtfcLtbx8QLloqIE
UAqo9AZTPB1JbVSVGkoVD7FJjfAvCSi4tEdhYieEQvpQabGJtY8vF2l+XaF5SDRvTqmrTejstUs5tNhMOvvTCDoHPuJ0Suw4OctcxTPx3BUWu8tlOx4yBNKeWNGd
pocEsJx+f7X1QRCuPHsN2YIGsXVLo8NJo498o6lU4KjMSxnr+Gwve63Pv3DdTkCTQ+8xyc/ZO/eb6+wnjGax92qf/Gv/FxtdzqRGOSQ8J5w0B62Z9LZvlGAEGYXv
uW3fdxEb/l2vunJEP+PT2zgpkENH6sTdF4gI0SPnGFCG/m5saDMqyUAu4BSEHpO7jaaLbEqD54jPhpAV3IBXckoGBGNovJy6NV0lmrhhZBRkksZjLkK7xomueM0r
XGODHIYuB59Ano/ONetXJfkYDGdev7bXhNX+B6SIg+s=
"""


def test_a_pandas_2_pickle_loads(tmp_path):
    path = tmp_path / "embeddings_train.pkl"
    path.write_bytes(zlib.decompress(base64.b64decode(PANDAS_2_PICKLE)))
    expected = pd.DataFrame({"label": np.array([0, 1, 0], dtype=np.int64),
                             "class_name": pd.Series(["a", "b", "a"], dtype=object),
                             "path": pd.Series(["a/0.png", "b/1.png", "a/2.png"], dtype=object),
                             "e0": np.array([0, 2, 4], dtype=np.float32), "e1": np.array([1, 3, 5], dtype=np.float32)})
    expected.columns = expected.columns.astype(object)
    loaded = safepickle.load_dataframe(path)
    pd.testing.assert_frame_equal(loaded, expected)
    assert loaded.attrs == {"subset": "train", "class_names": ["a", "b"]}


# ---- crafted pickles -----------------------------------------------------------------------------

class Payload:
    """Pickles as the call func(*args): what a hostile writer puts in a file."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS = {  # name: (what to pickle, given the marker file it would create; the global refused)
    "exec in a column": (lambda m: with_column(Payload(exec, touch(m))), "builtins.exec"),
    "exec in attrs": (lambda m: with_attr(["ok", {"deep": Payload(exec, touch(m))}]), "builtins.exec"),
    "exec in the column labels": (lambda m: with_column(1.0, label=Payload(exec, touch(m))), "builtins.exec"),
    "exec as the whole pickle": (lambda m: Payload(exec, touch(m)), "builtins.exec"),
    "eval as the whole pickle": (lambda m: Payload(eval, touch(m)), "builtins.eval"),
    "os.system in attrs": (lambda m: with_attr(Payload(os.system, f"touch {m}")), f"{os.system.__module__}.system"),
    "subprocess.Popen in a column": (lambda m: with_column(Payload(subprocess.Popen, ["touch", str(m)])),
                                     "subprocess.Popen"),
    "getattr(__import__('os'), 'system'), raw opcodes": (
        lambda m: f"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(Vtouch {m}\ntR.".encode(),
        "builtins.getattr"),
}


@pytest.mark.parametrize("name", PAYLOADS)
def test_crafted_pickle_is_refused_and_never_run(tmp_path, name):
    build, refused = PAYLOADS[name]
    marker = tmp_path / "ran"
    message = refusal(write(tmp_path / "embeddings_train.pkl", build(marker)))
    assert f"refused global '{refused}'" in message
    assert not marker.exists()


@pytest.mark.parametrize("name", [name for name in PAYLOADS if "Popen" not in name])  # Popen would race
def test_read_pickle_runs_the_same_files(tmp_path, name):
    marker = tmp_path / "ran"
    path = write(tmp_path / "embeddings_train.pkl", PAYLOADS[name][0](marker))
    try:
        pd.read_pickle(path)
    except Exception:  # the payload has run by the time pandas trips over what it returned
        pass
    assert marker.exists()


def tampered(frame: pd.DataFrame, reduce) -> bytes:
    """pandas' own pickle of frame, except that reduce(obj) says how to write the objects it handles."""
    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            return reduce(obj)

    buffer = io.BytesIO()
    Pickler(buffer, protocol=5).dump(frame)
    return buffer.getvalue()


def block_past_the_last_column(obj):
    if not isinstance(obj, Block):
        return NotImplemented
    unpickle_block, (values, _, ndim) = obj.__reduce__()
    return unpickle_block, (values, slice(10**7, 10**7 + len(obj.mgr_locs)), ndim)


def string_array_left_half_built(obj):
    if not isinstance(obj, pd.arrays.StringArray):
        return NotImplemented
    return obj.__reduce_ex__(5)[:2]  # the constructor call without the state that fills it in


MEMORY_UNSAFE = {  # with only the globals pandas itself uses; pd.read_pickle would crash the process
    "a block placed past the last column": (lambda: tampered(embeddings_frame(), block_past_the_last_column),
                                            "placement does not match"),
    "a string array left half built": (
        lambda: tampered(embeddings_frame(strings="string[python]"), string_array_left_half_built), "NoneType"),
    "an object array made from raw bytes": (
        lambda: with_column(Payload(np.ndarray, (2,), np.dtype(object), b"\x41" * 16)), "not callable"),
}


@pytest.mark.parametrize("name", MEMORY_UNSAFE)
def test_memory_unsafe_frame_is_refused(tmp_path, name):
    build, reason = MEMORY_UNSAFE[name]
    assert reason in refusal(write(tmp_path / "embeddings_train.pkl", build()))


def test_read_pickle_crashes_on_forged_pointers(tmp_path):
    """The control (in a child process): printing the frame dereferences 0x4141414141414141."""
    path = write(tmp_path / "embeddings_train.pkl", MEMORY_UNSAFE["an object array made from raw bytes"][0]())
    code = f"import pandas as pd; print(pd.read_pickle({str(path)!r}))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode < 0  # killed by a signal


@pytest.mark.parametrize("module, name", [("pandas.core.indexes.range", "RangeIndex"),
                                          ("pandas.core.indexes.base", "Index"),
                                          ("pandas.core.indexes.base", "_new_Index"),
                                          ("pandas._libs.internals", "_unpickle_block"),
                                          (np.empty(0).__reduce_ex__(5)[0].__module__, "_frombuffer")])
def test_a_pickle_cannot_set_attributes_on_pandas(tmp_path, module, name):
    """BUILD with a (None, {'pwned': 1}) state on the global itself: setattr on a class or function."""
    path = write(tmp_path / "embeddings_train.pkl", f"c{module}\n{name}\n(N(Vpwned\nI1\ndtb.".encode())
    refusal(path)
    assert not hasattr(getattr(importlib.import_module(module), name), "pwned")


def test_pickle_loads_would_patch_pandas_index(tmp_path):
    """The control: plain unpickling sets the attribute on the class for the whole process."""
    try:
        pickle.loads(b"cpandas.core.indexes.range\nRangeIndex\n(N(Vpwned\nI1\ndtb.")
        assert pd.RangeIndex.pwned == 1
    finally:
        if hasattr(pd.RangeIndex, "pwned"):
            del pd.RangeIndex.pwned


# ---- other things that are not a frame of numbers and strings ------------------------------------

class Harmless:
    pass


@pytest.mark.parametrize("value, reason", [
    ({1, 2}, "column 'extra' holds set values"),
    ([1, 2], "column 'extra' holds list values"),
    ({"k": 1}, "column 'extra' holds dict values"),
    (Harmless(), "refused global '"),
])
def test_python_objects_in_a_column_are_refused(tmp_path, value, reason):
    assert reason in refusal(write(tmp_path / "embeddings_train.pkl", with_column(value)))


@pytest.mark.parametrize("value, reason", [
    ({1, 2}, "attrs['note'] holds a set"),
    ({"k": [1, frozenset()]}, "attrs['note']['k'][1] holds a frozenset"),
    ({1: "a"}, "attrs['note'] has a int key"),
    (np.float64(0.5), "refused global 'numpy"),
    (Harmless(), "refused global '"),
])
def test_attrs_must_be_json_like(tmp_path, value, reason):
    assert reason in refusal(write(tmp_path / "embeddings_train.pkl", with_attr(value)))


def test_other_dtypes_are_refused(tmp_path):
    frame = embeddings_frame()
    frame["z"] = np.ones(len(frame), dtype=np.complex128)
    assert "complex128" in refusal(write(tmp_path / "a.pkl", frame))
    frame = embeddings_frame()
    frame["when"] = pd.Timestamp("2024-01-01")
    assert "refused global" in refusal(write(tmp_path / "b.pkl", frame))


@pytest.mark.parametrize("thing, reason", [
    (pd.Series([1.0, 2.0]), "refused global 'pandas"),
    ([1, 2, 3], "holds a list, not a DataFrame"),
    ({"label": [1]}, "holds a dict, not a DataFrame"),
])
def test_other_pickles_are_refused(tmp_path, thing, reason):
    assert reason in refusal(write(tmp_path / "embeddings_train.pkl", thing))


def test_truncated_empty_or_text_files_are_refused(tmp_path):
    whole = write(tmp_path / "whole.pkl", embeddings_frame()).read_bytes()
    for name, content in [("truncated", whole[: len(whole) // 2]), ("empty", b""), ("text", b"label,path\n")]:
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(content)
        assert "not a readable pickle" in refusal(path)
