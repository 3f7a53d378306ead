"""The score cache (#21 item 1): round trip by (sample key, config key), another config sees
nothing, duplicates first-wins, clean resume after an interrupted write, corrupt files named."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import engine.score_cache as scm
from engine.errors import ConfigError, DataError
from engine.samplekey import KEY_DTYPE, sample_keys
from engine.score_cache import ScoreCache, catalogue_key, config_key, keys_from_arrow, keys_to_arrow

CFG = {"backend": "bigrec", "llm": {"model": "tiny-gpt2", "lora_r": 8, "dtype": "float32"},
       "prompt": {"template": "v1", "max_len": 64}, "catalogue": "abc"}


def _keys(n, start=0):
    return sample_keys([str(i) for i in range(start, start + n)], [[i, i + 1] for i in range(start, start + n)],
                       list(range(start, start + n)))


def test_round_trip_and_persistence(tmp_path):
    k = _keys(50)
    eff = np.random.default_rng(0).random(50)
    c = ScoreCache(tmp_path, CFG)
    _, found = c.lookup(k)
    assert not found.any() and len(c) == 0 and not (tmp_path / c.key).exists()  # nothing written yet
    r = c.add(k[:30], {"effort": eff[:30]})
    assert (r.written, r.already_cached, r.conflicts) == (30, 0, 0)
    vals, found = c.lookup(k)
    assert found.tolist() == [True] * 30 + [False] * 20
    assert np.array_equal(vals["effort"][:30], eff[:30]) and np.isnan(vals["effort"][30:]).all()
    # a later run (another instance) reads them back bit for bit, and adds only the missing ones
    c2 = ScoreCache(tmp_path, json.loads(json.dumps(CFG)))
    assert c2.key == c.key and len(c2) == 30
    _, f2 = c2.lookup(k)
    r = c2.add(k[~f2], eff[~f2])
    assert r.written == 20
    v2, f2 = ScoreCache(tmp_path, CFG).lookup(k[::-1])
    assert f2.all() and v2["effort"].tobytes() == eff[::-1].tobytes()
    rec = json.loads((c.dir / "config.json").read_text())
    assert rec["config"] == CFG and rec["columns"] == ["effort"]


def test_another_config_key_sees_nothing(tmp_path):
    k = _keys(10)
    ScoreCache(tmp_path, CFG).add(k, np.ones(10))
    for change in ({"backend": "textrec"}, {"llm": {**CFG["llm"], "lora_r": 16}},
                   {"prompt": {**CFG["prompt"], "template": "v2"}}, {"catalogue": "abd"}):
        other = ScoreCache(tmp_path, {**CFG, **change})
        assert other.key != config_key(CFG)
        assert not other.lookup(k)[1].any(), change
    assert not ScoreCache(tmp_path, CFG, stage="llm_influence").lookup(k)[1].any()
    # key order and tuples vs lists do not matter; values do
    reordered = {kk: CFG[kk] for kk in reversed(list(CFG))}
    assert config_key(reordered) == config_key(CFG)
    assert config_key({"a": (1, 2)}) == config_key({"a": [1, 2]}) != config_key({"a": [2, 1]})
    assert ScoreCache(tmp_path, reordered).lookup(k)[1].all()
    with pytest.raises(ConfigError, match="not a plain config value"):
        config_key({"model": object()})


def test_duplicates_first_wins_and_conflicts_counted(tmp_path):
    k = _keys(4)
    c = ScoreCache(tmp_path, CFG)
    r = c.add(np.concatenate([k[:2], k[:1]]), [1.0, 2.0, 9.0])  # k0 twice in the batch
    assert (r.written, r.repeated_in_batch, r.conflicts) == (2, 1, 1)
    r = c.add(k, [5.0, 2.0, 3.0, 4.0])  # k0 cached with another value, k1 identical
    assert (r.written, r.already_cached, r.conflicts) == (2, 2, 1)
    assert c.lookup(k)[0]["effort"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert c.add(k, [1.0, 2.0, 3.0, 4.0]).written == 0  # nothing new: no file written
    assert len(c.part_files()) == 2
    assert ScoreCache(tmp_path, CFG).lookup(k)[0]["effort"].tolist() == [1.0, 2.0, 3.0, 4.0]


def test_two_writers_and_refresh(tmp_path):
    a, b = ScoreCache(tmp_path, CFG), ScoreCache(tmp_path, CFG)
    k = _keys(6)
    a.add(k[:3], np.arange(3.0))
    assert not b.lookup(k[:3])[1].any()
    assert b.refresh() == 1 and b.lookup(k[:3])[1].all()
    r = b.add(k, np.arange(6.0) + 10)  # k0..2 came from a: not written twice
    assert r.written == 3 and r.already_cached == 3
    a.refresh()
    assert a.lookup(k)[0]["effort"].tolist() == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]


def test_resume_after_an_interrupted_write_is_clean(tmp_path, monkeypatch):
    k = _keys(8)
    c = ScoreCache(tmp_path, CFG)
    c.add(k[:4], np.arange(4.0))
    real = pq.write_table

    def killed(table, where, *a, **kw):  # the process dies half way through writing the part file
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(scm.pq, "write_table", killed)
    with pytest.raises(KeyboardInterrupt):
        c.add(k[4:], np.arange(4.0, 8.0))
    monkeypatch.setattr(scm.pq, "write_table", real)
    assert not c.lookup(k[4:])[1].any()  # nothing half-cached in memory either
    # a stray temporary file of a writer killed harder (no clean-up ran) is ignored
    (c.dir / ".part-00000000000000000001-1-deadbeef.parquet.tmp-999").write_bytes(b"PAR1 garbage")
    resumed = ScoreCache(tmp_path, CFG)
    assert len(resumed) == 4 and len(resumed.stray_files()) == 1 and len(resumed.part_files()) == 1
    r = resumed.add(k, np.arange(8.0))
    assert (r.written, r.already_cached) == (4, 4)
    v, f = ScoreCache(tmp_path, CFG).lookup(k)
    assert f.all() and v["effort"].tolist() == list(np.arange(8.0))


def test_corrupt_or_foreign_files_are_named(tmp_path):
    c = ScoreCache(tmp_path, CFG)
    c.add(_keys(3), np.ones(3))
    part = c.part_files()[0]
    part.write_bytes(b"PAR1 truncated")
    with pytest.raises(DataError) as ei:
        ScoreCache(tmp_path, CFG)
    assert part.name in str(ei.value) and "delete the file" in str(ei.value)
    pq.write_table(pa.table({"key": pa.array([b"x" * 16], pa.binary(16)), "score": [1.0]}), part)
    with pytest.raises(DataError, match="effort"):
        ScoreCache(tmp_path, CFG)
    pq.write_table(pa.table({"key": ["not bytes"], "effort": [1.0]}), part)
    with pytest.raises(DataError, match="fixed_size_binary"):
        ScoreCache(tmp_path, CFG)
    part.unlink()
    (c.dir / "config.json").write_text(json.dumps({"stage": "effort", "config": {"llm": "other"},
                                                   "columns": ["effort"]}))
    with pytest.raises(DataError, match="config.json"):
        ScoreCache(tmp_path, CFG)
    (c.dir / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="config.json"):
        ScoreCache(tmp_path, CFG)


def test_columns_values_and_refusals(tmp_path):
    c = ScoreCache(tmp_path, CFG, columns=("effort", "llm_influence"))
    k = _keys(3)
    c.add(k, {"effort": [1.0, 2.0, 3.0], "llm_influence": [-1.0, 0.0, 1.0]})
    v, f = c.lookup(k[[2, 0]])
    assert f.all() and v["effort"].tolist() == [3.0, 1.0] and v["llm_influence"].tolist() == [1.0, -1.0]
    with pytest.raises(DataError, match="non-finite"):
        c.add(_keys(1, 10), {"effort": [np.nan], "llm_influence": [0.0]})
    with pytest.raises(DataError, match="do not match"):
        c.add(_keys(1, 10), {"effort": [1.0]})
    with pytest.raises(DataError, match="shape"):
        c.add(_keys(2, 10), np.ones(3))
    with pytest.raises(DataError, match="columns"):  # another column set under the same key
        ScoreCache(tmp_path, CFG, columns=("effort",)).add(_keys(1, 20), [1.0])
    with pytest.raises(ConfigError):
        ScoreCache(tmp_path, CFG, columns=())


def test_lookup_with_equal_high_halves(tmp_path):
    """Keys whose 64-bit high halves collide are still told apart by the low half."""
    k = np.zeros(5, KEY_DTYPE)
    k["hi"] = [7, 7, 7, 3, 9]
    k["lo"] = [30, 10, 20, 10, 10]
    c = ScoreCache(tmp_path, CFG)
    c.add(k, np.arange(5.0))
    q = np.zeros(4, KEY_DTYPE)
    q["hi"], q["lo"] = [7, 7, 7, 3], [20, 15, 30, 20]
    v, f = ScoreCache(tmp_path, CFG).lookup(q)
    assert f.tolist() == [True, False, True, False] and v["effort"][[0, 2]].tolist() == [2.0, 0.0]
    assert (keys_from_arrow(keys_to_arrow(k)) == k).all()


def test_catalogue_key_follows_titles(tmp_path):
    from engine.data.schema import ITEMS_SCHEMA

    t = pa.Table.from_pydict({"item_id": [0, 1], "title": ["A", "B"], "category": [None, "x"]}, schema=ITEMS_SCHEMA)
    t2 = pa.Table.from_pydict({"item_id": [0, 1], "title": ["A", "B2"], "category": [None, "x"]}, schema=ITEMS_SCHEMA)
    assert catalogue_key(t) == catalogue_key(t.select(["item_id", "title", "category"])) != catalogue_key(t2)


def test_many_adds_agree_with_a_dict(tmp_path):
    """Random overlapping batches (with shared 64-bit high halves) against a first-wins dict."""
    rng = np.random.default_rng(1)
    pool = np.zeros(400, KEY_DTYPE)
    pool["hi"] = rng.integers(0, 40, 400)  # many keys share a high half
    pool["lo"] = rng.integers(0, 2**63, 400, dtype=np.uint64)
    c = ScoreCache(tmp_path, CFG)
    ref: dict = {}
    for _ in range(30):
        idx = rng.integers(0, 400, rng.integers(0, 40))
        vals = rng.random(idx.size)
        r = c.add(pool[idx], vals)
        fresh = 0
        for i, v in zip(idx.tolist(), vals.tolist()):
            if pool[i].tobytes() not in ref:
                ref[pool[i].tobytes()] = v
                fresh += 1
        assert r.written == fresh and r.written + r.already_cached + r.repeated_in_batch == idx.size
    for cache in (c, ScoreCache(tmp_path, CFG)):
        v, f = cache.lookup(pool)
        assert f.tolist() == [k.tobytes() in ref for k in pool]
        assert v["effort"][f].tolist() == [ref[k.tobytes()] for k in pool[f]]
        assert len(cache) == len(ref)
    # compaction: one file, same content, safe to reopen
    n_files = len(c.part_files())
    assert c.compact() == n_files and len(c.part_files()) == 1
    v2, f2 = ScoreCache(tmp_path, CFG).lookup(pool)
    assert (f2 == f).all() and np.array_equal(v2["effort"][f2], v["effort"][f])
