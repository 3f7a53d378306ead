"""The restricted unpickler: accepts numpy's object-array recipe of plain data, runs nothing else."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest

from engine.data.safe_pickle import check_plain, load_npy_object, load_pickle
from engine.errors import DataError, UnsafePickleError


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_dict_npy_roundtrip(tmp_path):
    d = {"seqid2title": {"1": "A", "2": "B"}, "nested": [1, 2.5, None, True, ("x", [3])]}
    p = tmp_path / "m.npy"
    np.save(p, d)
    assert load_npy_object(p) == d


def test_plain_pickle_roundtrip(tmp_path):
    p = tmp_path / "m.pkl"
    p.write_bytes(pickle.dumps({"a": [1, 2], "b": "c"}))
    assert load_pickle(p) == {"a": [1, 2], "b": "c"}


@pytest.mark.parametrize("wrap", ["pickle", "npy"])
def test_crafted_reduce_is_refused_and_runs_nothing(tmp_path, wrap):
    marker = tmp_path / "pwned"
    payload = {"seqid2title": {"1": _Evil(str(marker))}}
    p = tmp_path / ("evil.pkl" if wrap == "pickle" else "evil.npy")
    if wrap == "pickle":
        p.write_bytes(pickle.dumps(payload))
        load = load_pickle
    else:
        np.save(p, payload, allow_pickle=True)
        load = load_npy_object
    with pytest.raises(UnsafePickleError) as ei:
        load(p)
    msg = str(ei.value)
    assert "evil" in msg and "system" in msg  # names the file and the refused global
    assert not marker.exists()


@pytest.mark.parametrize("obj", [collections.OrderedDict(a=1), {"x": np.float64(1.5)}, {1, 2}])
def test_non_plain_globals_refused(tmp_path, obj):
    p = tmp_path / "x.npy"
    np.save(p, np.array(obj, dtype=object) if not isinstance(obj, dict) else obj, allow_pickle=True)
    with pytest.raises(UnsafePickleError):
        load_npy_object(p)


def test_allowed_globals_but_non_plain_content_refused(tmp_path):
    # Only numpy's own globals, but an object array nested inside the dict: not plain data.
    inner = np.empty(2, dtype=object)
    inner[:] = ["a", "b"]
    p = tmp_path / "nested.npy"
    np.save(p, {"k": inner}, allow_pickle=True)
    with pytest.raises(UnsafePickleError, match="ndarray"):
        load_npy_object(p)


def test_direct_ndarray_call_refused(tmp_path):
    # A hand-written pickle calling numpy.ndarray((10**12,)) would allocate; refused.
    data = b"\x80\x02cnumpy\nndarray\nq\x00J\x00\x10\xa5\xd4\x85q\x01\x85q\x02Rq\x03."
    p = tmp_path / "big.pkl"
    p.write_bytes(data)
    with pytest.raises(UnsafePickleError, match="ndarray"):
        load_pickle(p)


def test_garbage_and_missing_files(tmp_path):
    p = tmp_path / "junk.npy"
    p.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="junk.npy"):
        load_npy_object(p)
    q = tmp_path / "trunc.pkl"
    q.write_bytes(pickle.dumps({"a": list(range(100))})[:20])
    with pytest.raises(DataError, match="trunc.pkl"):
        load_pickle(q)
    with pytest.raises(DataError, match="not found"):
        load_pickle(tmp_path / "absent.pkl")


def test_check_plain_rejects_subclasses():
    class D(dict):
        pass

    check_plain({"a": [1, (2, "x")], "b": None})
    with pytest.raises(UnsafePickleError):
        check_plain({"a": D()})


@pytest.mark.realdata
def test_real_release_maps_match_numpy(games_dir, shared_data):
    for path in (games_dir / "title_maps.npy", games_dir / "category_map.npy",
                 shared_data / "book-partial" / "item_map.npy"):
        if path.exists():
            assert load_npy_object(path) == np.load(path, allow_pickle=True).item()
