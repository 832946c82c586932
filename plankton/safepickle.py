"""Read a pickled DataFrame of numbers and strings without running code from the file.

    frame = safepickle.load_dataframe("outputs/embeddings_train.pkl")
    safepickle.save_dataframe(frame, path)  # to_pickle, with pyarrow-backed strings made python-backed

pd.read_pickle calls whatever a pickle names, so a crafted embeddings_*.pkl runs code when a stage
opens it. load_dataframe reads the files DataFrame.to_pickle writes (pandas 2.2-3.1, numpy 1.26-2.x)
the way torch.load(weights_only=True) reads checkpoints: find_class resolves only the globals that
such a frame needs (recorded from frames with a RangeIndex or Index; int64, float32, float64, bool,
object and pandas string columns; attrs) and refuses every other one: builtins.exec, posix.system,
functools.partial, numpy scalars, pyarrow-backed strings, categoricals, datetimes, Series.
pandas 3 backs strings with pyarrow where pyarrow is installed, even the column labels; pyarrow's
own reconstructors are not allowed, so such frames are written with save_dataframe.

Even pandas' own globals are kept from pandas while the file is read: with them alone a crafted
file can make an object array from raw bytes (np.ndarray(shape, object, buffer): forged pointers),
leave a string array half built (segfault on use), place a block past the last column (pandas 3.1
writes out of bounds in its Cython block index) or BUILD attributes onto pandas.Index itself.
So each allowed global resolves to something inert:
  builtins.slice, numpy.dtype     themselves: immutable types whose constructors parse ints and
                                  type codes and call nothing; BUILD on numpy's shared built-in
                                  dtypes is ignored by numpy.
  numpy _reconstruct, _frombuffer numpy's array reconstructors (_reconstruct for 'ndarray' only).
                                  Both refuse object arrays from raw bytes, so the elements of an
                                  object array come through this same unpickler.
  numpy.ndarray, pandas Index, RangeIndex, StringArray
                                  their names (str), never the classes.
  pandas DataFrame, StringDtype, __pyx_unpickle_NDArrayBacked
                                  a _Record that keeps its arguments and BUILD state, no more.
  BlockManager, _unpickle_block, _new_Index
                                  a tuple of their arguments, tagged 'manager', 'block', 'index'.
  pandas NA                       the NA singleton: stateless, BUILD on it does nothing.
Functions go out as a fresh wrapper per lookup, so BUILD can only decorate that wrapper. Once the
whole file is read, public pandas constructors make the frame from these parts, after checking
that the blocks tile the columns exactly, arrays are bool/int/float/object, object and string
values are str/int/float/bool/None/NA and attrs hold only JSON-like values.
"""
import pickle
from pathlib import Path

import numpy as np
import pandas as pd


class UnsafePickle(ValueError):
    """The file is not a pickled DataFrame of numbers and strings, or not a pickle at all."""


_PLAIN_VALUES = {str, int, float, bool, type(None), type(pd.NA)}
_JSON_SCALARS = (str, int, float, bool, type(None))
_reconstruct = np.empty(0).__reduce__()[0]  # numpy.core.multiarray or numpy._core.multiarray
_frombuffer = np.empty(0).__reduce_ex__(5)[0]  # numpy.core.numeric or numpy._core.numeric


class _Record:
    """Stands in for a pandas object while the file is read."""
    args, state = (), None

    def __init__(self, *args):
        self.args = args

    def __setstate__(self, state):
        self.state = state


class _Frame(_Record): pass
class _StringDtype(_Record): pass
class _StringArray(_Record): pass


def _tagged(tag: str):
    return lambda *args: (tag, *args)


def _reconstruct_ndarray(subtype, shape, typecode):
    if not isinstance(subtype, str) or subtype != "ndarray":
        raise UnsafePickle(f"an array of class {subtype if isinstance(subtype, str) else type(subtype).__name__}")
    return _reconstruct(np.ndarray, shape, typecode)


def _aliases(modules: str, name: str, value) -> dict:
    return {(module, name): value for module in modules.split()}


_ALLOWED = {  # (module, name) as pandas 2.x / numpy 1.x and pandas 3.x / numpy 2.x write them
    ("builtins", "slice"): slice,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): "ndarray",
    **_aliases("numpy.core.multiarray numpy._core.multiarray", "_reconstruct", _reconstruct_ndarray),
    **_aliases("numpy.core.numeric numpy._core.numeric", "_frombuffer", _frombuffer),
    **_aliases("pandas pandas.core.frame", "DataFrame", _Frame),
    ("pandas.core.internals.managers", "BlockManager"): _tagged("manager"),
    ("pandas._libs.internals", "_unpickle_block"): _tagged("block"),
    ("pandas.core.indexes.base", "_new_Index"): _tagged("index"),
    **_aliases("pandas pandas.core.indexes.base", "Index", "Index"),
    **_aliases("pandas pandas.core.indexes.range", "RangeIndex", "RangeIndex"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"): _StringArray,
    **_aliases("pandas.arrays pandas.core.arrays.string_", "StringArray", "StringArray"),
    ("pandas.core.arrays.string_", "StringArrayNumpySemantics"): "StringArray",  # pandas 2.3
    **_aliases("pandas pandas.core.arrays.string_", "StringDtype", _StringDtype),
    **_aliases("pandas pandas._libs.missing", "NA", pd.NA),
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise UnsafePickle(f"refused global '{module}.{name}'")
        found = _ALLOWED[module, name]
        return (lambda *args: found(*args)) if callable(found) and not isinstance(found, type) else found


def load_dataframe(path: str | Path) -> pd.DataFrame:
    """The DataFrame pickled at path; UnsafePickle (one line) for anything else."""
    path = Path(path)
    with open(path, "rb") as f:
        try:
            record = _Unpickler(f).load()
        except UnsafePickle as err:
            raise UnsafePickle(f"{path}: {err}") from None
        except Exception as err:  # truncated, not a pickle, or opcodes that misuse an allowed global
            raise UnsafePickle(f"{path}: not a readable pickle ({_first_line(err)})") from None
    try:
        return _build_frame(record)
    except UnsafePickle as err:
        raise UnsafePickle(f"{path}: {err}") from None
    except Exception as err:  # allowed parts put together in a shape pandas never writes
        raise UnsafePickle(f"{path}: not a plain DataFrame ({_first_line(err)})") from None


def save_dataframe(frame: pd.DataFrame, path: str | Path) -> None:
    """frame.to_pickle(path) in the form load_dataframe reads: strings backed by pyarrow (pandas 3's
    default where pyarrow is installed) are stored backed by Python objects, same values."""
    frame = frame.copy(deep=False)
    for i in range(frame.shape[1]):
        frame.isetitem(i, _python_strings(frame.iloc[:, i]))
    frame.columns, frame.index = _python_strings(frame.columns), _python_strings(frame.index)
    frame.to_pickle(path, compression=None)


def _python_strings(values):
    dtype = values.dtype
    if isinstance(dtype, pd.StringDtype) and dtype.storage != "python":
        return values.astype(_python_string_dtype(dtype.na_value))
    return values


def _python_string_dtype(na_value) -> pd.StringDtype:
    return pd.StringDtype("python") if na_value is pd.NA else pd.StringDtype("python", np.nan)


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _build_frame(record) -> pd.DataFrame:
    if type(record) is not _Frame:
        raise UnsafePickle(f"holds a {type(record).__name__}, not a DataFrame")
    blocks, axes = _parts(record.state["_mgr"], "manager", 2)
    columns, index = (_index(axis) for axis in axes)
    by_position = [None] * len(columns)
    for block in blocks:
        values, placement, _ = _parts(block, "block", 3)
        data, dtype = _values(values, ndim=2)
        rows = data if data.ndim == 2 else [data]
        if type(placement) is slice:
            locs = range(len(columns))[placement]
        elif type(placement) is np.ndarray and placement.dtype.kind in "iu":
            locs = placement.tolist()
        else:
            raise UnsafePickle(f"a block placed by a {type(placement).__name__}")
        if len(rows) != len(locs):
            raise UnsafePickle("a block's placement does not match its values")
        for loc, row in zip(locs, rows):
            if not 0 <= loc < len(columns) or by_position[loc] is not None or len(row) != len(index):
                raise UnsafePickle("the blocks do not tile the frame")
            if row.dtype == object:
                _check_plain(f"column {columns[loc]!r}", row)
            by_position[loc] = pd.Series(row, index=index, dtype=dtype, copy=False)
    missing = [label for label, column in zip(columns, by_position) if column is None]
    if missing:
        raise UnsafePickle(f"column {missing[0]!r} has no values")
    frame = pd.DataFrame(dict(enumerate(by_position)), index=index)
    frame.columns = columns
    attrs = record.state.get("attrs", {})
    if type(attrs) is not dict:
        raise UnsafePickle(f"attrs is a {type(attrs).__name__}")
    _check_json("attrs", attrs)
    frame.attrs = attrs
    return frame


def _parts(value, tag: str, count: int) -> tuple:
    """The arguments of the tuple that _tagged(tag) made."""
    if type(value) is not tuple or len(value) != count + 1 or value[0] != tag:
        raise UnsafePickle(f"a {type(value).__name__} where pandas writes its {tag}")
    return value[1:]


def _index(axis) -> pd.Index:
    class_name, state = _parts(axis, "index", 2)
    name = state.get("name")
    _check_plain("an index name", [name])
    if class_name == "RangeIndex":
        bounds = [state["start"], state["stop"], state["step"]]
        if any(type(bound) is not int for bound in bounds):
            raise UnsafePickle("a RangeIndex with non-integer bounds")
        return pd.RangeIndex(*bounds, name=name)
    if class_name != "Index":
        raise UnsafePickle(f"an index of class {class_name!r}")
    data, dtype = _values(state["data"], ndim=1)
    if data.dtype == object:
        _check_plain("the labels", data)
    return pd.Index(data, dtype=dtype, name=name)


def _values(values, ndim: int) -> tuple:
    """(numpy array, pandas dtype) of a block's or an index's values; strings as an object array."""
    if type(values) is _StringArray and values.args[:1] == ("StringArray",):
        dtype, data = values.state[:2]  # pandas 3 may add {'_readonly': ...}
        if type(data) is np.ndarray and data.ndim == 1 and data.dtype == object:
            return data, _string_dtype(dtype)
    elif type(values) is np.ndarray and values.ndim == ndim and (values.dtype.kind in "biuf" or values.dtype == object):
        return values, values.dtype
    raise UnsafePickle(f"values of {type(values).__name__} {getattr(values, 'dtype', '')}".rstrip())


def _string_dtype(record) -> pd.StringDtype:
    if type(record) is not _StringDtype:
        raise UnsafePickle(f"a string array of dtype {type(record).__name__}")
    storage, na_value = record.args if record.args else (record.state["storage"], pd.NA)  # pandas 2.2: BUILD
    if storage != "python" or not (na_value is pd.NA or (type(na_value) is float and na_value != na_value)):
        raise UnsafePickle(f"refused string dtype (storage {storage!r}, missing value {na_value!r})")
    return _python_string_dtype(na_value)


def _check_plain(where: str, values) -> None:
    odd = {type(value) for value in values} - _PLAIN_VALUES
    if odd:
        raise UnsafePickle(f"{where} holds {', '.join(sorted(t.__name__ for t in odd))} values")


def _check_json(where: str, value) -> None:
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_json(f"{where}[{i}]", item)
    elif type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise UnsafePickle(f"{where} has a {type(key).__name__} key")
            _check_json(f"{where}[{key!r}]", item)
    elif type(value) not in _JSON_SCALARS:
        raise UnsafePickle(f"{where} holds a {type(value).__name__}")
