"""Content-addressed sample keys (#21 item 1): stable across processes and runs, any change
to (user, history, target) changes the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import engine.samplekey as sk
from engine.errors import DataError
from engine.samplekey import KEY_DTYPE, key_hex, key_seeds, sample_keys, table_keys

USERS = ["1", "2", "u-é", "", "1"]
HISTS = [[1, 2, 3], [1, 2, 3], [], [7], [2, 1, 3]]
TARGETS = [4, 4, 0, 7, 4]

# Pinned: a change of the encoding or the hash must bump KEY_VERSION (and so every cache key).
GOLDEN = {("1", (1, 2, 3), 4): "67feae7ef6e58e96a2872368427ecfa9", ("", (), 0): "fd33cd3de3e7771fa457f19ab12c6bf3"}


def _one(u, h, t, **kw):
    return key_hex(sample_keys([u], [h], [t], **kw))[0]


def test_golden_keys_are_stable_across_runs():
    assert sk.KEY_VERSION == 1
    assert {k: _one(k[0], list(k[1]), k[2]) for k in GOLDEN} == GOLDEN


def test_same_sample_same_key_in_another_process():
    here = key_hex(sample_keys(USERS, HISTS, TARGETS))
    code = ("import json; from engine.samplekey import sample_keys, key_hex; "
            f"print(json.dumps(key_hex(sample_keys({USERS!r}, {HISTS!r}, {TARGETS!r}))))")
    root = str(Path(sk.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": root})
    assert json.loads(out.stdout) == here


def test_every_change_gives_another_key():
    base = _one("1", [1, 2, 3], 4)
    variants = {
        "target": _one("1", [1, 2, 3], 5),
        "first item": _one("1", [9, 2, 3], 4),
        "middle item": _one("1", [1, 9, 3], 4),
        "last item": _one("1", [1, 2, 9], 4),
        "order": _one("1", [2, 1, 3], 4),
        "longer": _one("1", [1, 2, 3, 4], 4),
        "shorter": _one("1", [1, 2], 4),
        "shifted into target": _one("1", [1, 2], 3),
        "user": _one("2", [1, 2, 3], 4),
        "user prefix": _one("11", [1, 2, 3], 4),
        "user empty": _one("", [1, 2, 3], 4),
        "salt": _one("1", [1, 2, 3], 4, salt="other"),
        "item 0 appended": _one("1", [1, 2, 3, 0], 4),
    }
    assert all(v != base for v in variants.values()), variants
    assert len(set(variants.values())) == len(variants)


def test_input_forms_and_chunks_agree(monkeypatch):
    ref = sample_keys(USERS, HISTS, TARGETS)
    assert ref.dtype == KEY_DTYPE and ref.shape == (5,)
    assert (ref[0] != ref[1]) and (ref[0] == sample_keys(["1"], [[1, 2, 3]], [4])[0])
    arrow = sample_keys(pa.array(USERS), pa.array(HISTS, pa.list_(pa.int32())), pa.array(TARGETS, pa.int32()))
    assert (arrow == ref).all()
    # sliced Arrow arrays (non-zero offsets) and a chunked column
    sl = sample_keys(pa.array(["x", *USERS]).slice(1), pa.array([[5, 5], *HISTS]).slice(1),
                     np.array([1, *TARGETS])[1:])
    assert (sl == ref).all()
    ch = sample_keys(pa.chunked_array([USERS[:2], USERS[2:]]),
                     pa.chunked_array([pa.array(HISTS[:3]), pa.array(HISTS[3:])]), np.array(TARGETS, np.int64))
    assert (ch == ref).all()
    monkeypatch.setattr(sk, "CHUNK_ROWS", 2)
    assert (sample_keys(USERS, HISTS, TARGETS) == ref).all()
    t = pa.table({"sample_id": np.arange(5), "user_id": USERS, "history": HISTS, "target": TARGETS})
    assert (table_keys(t) == ref).all()


def test_no_collisions_on_many_random_samples():
    rng = np.random.default_rng(0)
    n = 200_000
    lens = rng.integers(0, 6, n)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    hist = pa.ListArray.from_arrays(pa.array(off), pa.array(rng.integers(0, 30, int(off[-1])).astype(np.int32)))
    users = pa.array([f"u{i % 500}" for i in range(n)])
    tg = rng.integers(0, 30, n)
    keys = sample_keys(users, hist, tg)
    distinct_samples = len({(u, tuple(h), t) for u, h, t in zip(users.to_pylist(), hist.to_pylist(), tg.tolist())})
    assert len(np.unique(keys)) == distinct_samples
    assert len(np.unique(keys["hi"])) == distinct_samples  # even 64 bits alone do not collide here


def test_key_seeds_are_non_negative_int64():
    s = key_seeds(sample_keys(USERS, HISTS, TARGETS))
    assert s.dtype == np.int64 and (s >= 0).all() and len(set(s[:4].tolist())) == 4


def test_bad_inputs():
    with pytest.raises(DataError, match="differ in length"):
        sample_keys(["1", "2"], [[1]], [1])
    with pytest.raises(DataError, match="int32"):
        sample_keys(["1"], [[2**40]], [1])
    with pytest.raises(DataError, match="target"):
        sample_keys(["1"], [[1]], [2**31])
    with pytest.raises(DataError, match="user_id"):
        table_keys(pa.table({"history": [[1]], "target": [1]}))
