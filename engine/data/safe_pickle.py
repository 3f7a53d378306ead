"""Restricted loading of the pickled ``.npy`` maps shipped with the DEALRec release.

The release stores Python dicts as 0-d numpy object arrays (``np.save`` of a dict),
which numpy writes as a pickle. ``np.load(..., allow_pickle=True)`` would run any
code such a file names, so we unpickle with :class:`RestrictedUnpickler` instead.

What the real files reference (checked with ``pickletools`` on every ``.npy`` of
``../shared/data/games`` and ``../shared/data/book-partial``) is exactly three
globals, used in the standard numpy object-array recipe::

    numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')   # empty array
    numpy.dtype('O8', False, True)                                    # object dtype
    BUILD -> ndarray.__setstate__((1, (), dtype, False, [the dict]))

plus plain opcodes for dicts, lists, tuples, str, int, float, bool and None.
``find_class`` is the single gate through which a pickle can reach any callable
(GLOBAL, STACK_GLOBAL, INST, OBJ via a class, NEWOBJ via a class, EXT via the copyreg
registry all go through it), so refusing every other name there means a crafted file
cannot run code. The three accepted names are not handed out as such: each is
replaced by a guarded stand-in that checks its arguments (an ``ndarray`` marker that
cannot be called, a ``_reconstruct`` that only builds an empty 1-D ``ndarray``, and a
``dtype`` that only accepts a short type code), so that a file cannot allocate
arbitrary arrays either. Once loaded, the content is checked to be plain data,
recursively (exact types, not subclasses).

numpy 2 moved ``numpy.core`` to ``numpy._core``; both spellings are accepted and
resolved without importing the deprecated alias.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np

from engine.errors import DataError, UnsafePickleError

__all__ = ["RestrictedUnpickler", "check_plain", "load_npy_object", "load_pickle"]

PLAIN_TYPES = (dict, list, tuple, str, int, float, bool, type(None))
_DTYPE_CODE = re.compile(r"^[<>|=]?[a-zA-Z]\d{0,3}$")


class _Refused(Exception):
    """Internal: raised inside the unpickler, turned into UnsafePickleError with the file name."""

    def __init__(self, what: str, detail: str):
        super().__init__(what)
        self.what, self.detail = what, detail


class _NdarrayMarker:
    """Stands in for ``numpy.ndarray`` inside a pickle: may only be passed to ``_reconstruct``."""

    def __call__(self, *args, **kwargs):
        raise _Refused("numpy.ndarray", "numpy.ndarray may only be used through _reconstruct")

    def __reduce__(self):  # pragma: no cover - never pickled back
        raise TypeError("not picklable")


_NDARRAY = _NdarrayMarker()


def _safe_reconstruct(subtype, shape, dtype_code, *rest):
    """numpy's ``_reconstruct`` limited to the empty-array call numpy's own pickles make."""
    if subtype is not _NDARRAY or rest or tuple(shape) != (0,) or dtype_code != b"b":
        raise _Refused(
            "numpy.core.multiarray._reconstruct",
            f"unexpected arguments ({type(subtype).__name__}, {shape!r}, {dtype_code!r})",
        )
    return np.ndarray.__new__(np.ndarray, (0,), np.dtype("b"))


def _safe_dtype(code, align=False, copy=True, *rest):
    """``numpy.dtype`` limited to short type codes such as ``'O8'``, ``'<i8'``, ``'<U12'``."""
    flags_ok = all(type(x) in (bool, int) and x in (0, 1) for x in (align, copy))
    if rest or not isinstance(code, str) or not _DTYPE_CODE.match(code) or not flags_ok:
        raise _Refused("numpy.dtype", f"unexpected arguments ({code!r}, {align!r}, {copy!r})")
    return np.dtype(code, align=bool(align))


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _safe_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of numpy's object-array recipe.

    Every other global (``os.system``, ``builtins.eval``, ``collections.OrderedDict``,
    numpy scalars, ...) is refused before anything is called. Persistent ids are
    refused by the base class.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}", "global not in the allow-list") from None


def check_plain(obj: object, *, path: object = None) -> None:
    """Check that ``obj`` is plain dict/list/tuple/str/int/float/bool/None data, recursively.

    Args:
        obj: the loaded object.
        path: the file it came from (for the error message).

    Raises:
        UnsafePickleError: naming the first non-plain value's type and where it sits.
    """
    stack: list[tuple[object, str]] = [(obj, "<root>")]
    while stack:
        x, where = stack.pop()
        t = type(x)
        if t not in PLAIN_TYPES:
            raise UnsafePickleError(
                f"pickle content is not plain data: a {t.__module__}.{t.__qualname__} at {where}",
                path=path, field=where, value=t.__qualname__,
            )
        if t is dict:
            for k, v in x.items():
                stack.append((k, f"{where} key"))
                stack.append((v, f"{where}[{k!r}]"[:200]))
        elif t is list or t is tuple:
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(x))


def _unpickle(data: bytes, path: object) -> object:
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except _Refused as e:
        raise UnsafePickleError(
            f"refused to unpickle: the file references {e.what} ({e.detail}); only plain dict/list/str/int "
            "data saved by numpy is accepted. Re-save the map as plain data, or check where the file came from",
            path=path, field="global", value=e.what,
        ) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError,
            MemoryError, RecursionError) as e:
        raise DataError(f"not a valid pickle ({type(e).__name__}: {e})", path=path) from None


def load_pickle(path: str | os.PathLike) -> object:
    """Load a plain pickle file with :class:`RestrictedUnpickler` and check its content.

    Args:
        path: the pickle file.

    Returns:
        The plain Python object (dict/list/tuple/str/int/float/bool/None, nested).

    Raises:
        DataError: the file is missing or not a valid pickle.
        UnsafePickleError: the file references a refused global or holds non-plain data.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    obj = _unpickle(path.read_bytes(), path)
    check_plain(obj, path=path)
    return obj


def load_npy_object(path: str | os.PathLike) -> object:
    """Load a ``.npy`` file written by ``np.save(path, some_dict)`` without running code.

    The equivalent of ``np.load(path, allow_pickle=True).item()`` for 0-d object arrays
    (``.tolist()`` for other shapes), through :class:`RestrictedUnpickler`. Non-object
    arrays are read with ``allow_pickle=False`` and returned as nested lists.

    Args:
        path: the ``.npy`` file.

    Returns:
        Plain Python data (see :func:`check_plain`).

    Raises:
        DataError: missing file, not a ``.npy`` file, or a malformed pickle.
        UnsafePickleError: a refused global or non-plain content.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise DataError(f"not a .npy file ({e})", path=path) from None
        offset = f.tell()
    if not dtype.hasobject:
        return np.load(path, allow_pickle=False).tolist()
    with open(path, "rb") as f:
        f.seek(offset)
        arr = _unpickle(f.read(), path)
    if type(arr) is not np.ndarray or arr.dtype != np.dtype(object) or arr.shape != tuple(shape):
        raise UnsafePickleError(
            f"expected a numpy object array of shape {tuple(shape)}, got a {type(arr).__qualname__}",
            path=path, field="array", value=type(arr).__qualname__,
        )
    obj = arr.item() if arr.shape == () else arr.tolist()
    check_plain(obj, path=path)
    return obj
