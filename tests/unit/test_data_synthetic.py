"""The synthetic generator: seeded determinism, schema, sizes, streaming, popularity skew, structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import engine.data.synthetic as synthetic
from engine.data.prepare import PRESETS, PrepareConfig, prepare
from engine.data.schema import read_items, read_meta, read_samples, read_split, sample_files, validate_prepared


def _gen(out: Path, **kw) -> dict:
    return prepare(PrepareConfig(format="synthetic", out=str(out), **kw))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "demo"
    _gen(out)
    return out


def test_demo_defaults_schema_and_sizes(demo):
    counts = validate_prepared(demo)
    meta = read_meta(demo)
    c = meta["counts"]
    assert c["users_total"] == PRESETS["demo"]["users"] == 1500
    assert counts["items"] == c["items"] == 400
    assert counts["samples"] == c["samples"] == c["users_total"] - c["dropped_users"]
    total = sum(c["interactions"].values())
    assert 6.5 <= total / c["users_total"] <= 9.5  # ~8 per user
    # global temporal split: ~8:1:1 of interactions, most users without valid/test items
    assert abs(c["interactions"]["train"] / total - 0.8) < 0.02
    assert 0 < counts["valid"] < 0.5 * c["users_total"] and 0 < counts["test"] < 0.5 * c["users_total"]
    assert c["dropped_users"] < 0.05 * c["users_total"]
    assert meta["source_format"] == "synthetic" and meta["seed"] == 0 and meta["input"] is None
    assert len(sample_files(demo)) > 1  # several part files even for the demo


def test_demo_counts_match_tables(demo):
    c = read_meta(demo)["counts"]
    s = read_samples(demo)
    hist_len = np.array([len(h) for h in s.column("history").to_pylist()])
    assert int(hist_len.sum()) + s.num_rows == c["interactions"]["train"]
    for split in ("valid", "test"):
        t = read_split(demo, split)
        assert t.num_rows == c[split]
        assert sum(len(x) for x in t.column("targets").to_pylist()) == c["interactions"][split]
        assert all(len(x) > 0 for x in t.column("targets").to_pylist())
    # test history = valid history + valid targets for users in both (train items precede the periods)
    v = {r["user_id"]: r for r in read_split(demo, "valid").to_pylist()}
    samples = {r["user_id"]: r for r in s.to_pylist()}
    for r in read_split(demo, "test").to_pylist():
        u = r["user_id"]
        train = samples[u]["history"] + [samples[u]["target"]] if u in samples else []
        expect = train + (v[u]["targets"] if u in v else [])
        assert r["history"] == expect


def test_titles_unique_readable_with_categories(demo):
    items = read_items(demo)
    titles = items.column("title").to_pylist()
    assert len(set(titles)) == len(titles)
    assert all(2 <= len(t.split()) <= 8 and t[0].isupper() for t in titles)
    assert any(t.split()[-1].isdigit() for t in titles)  # numbered series exist
    assert items.column("category").null_count == 0
    assert all(" > " in c for c in items.column("category").to_pylist())


def test_same_seed_identical_files_other_seed_differs(tmp_path, demo):
    _gen(tmp_path / "a")
    assert _files(tmp_path / "a") == _files(demo)
    _gen(tmp_path / "b", seed=1)
    assert _files(tmp_path / "b")["items.parquet"] != _files(demo)["items.parquet"]
    assert _files(tmp_path / "b")["samples/part-00000.parquet"] != _files(demo)["samples/part-00000.parquet"]


def test_popularity_skew_and_sequential_structure(demo):
    s = read_samples(demo)
    n_items = read_items(demo).num_rows
    hist = s.column("history").to_pylist()
    flat = np.concatenate([np.concatenate([h for h in hist if h]), s.column("target").to_numpy()])
    pop = np.sort(np.bincount(flat, minlength=n_items))[::-1]
    assert pop[: n_items // 10].sum() / pop.sum() > 0.3  # top 10% of items: > 3x their uniform share
    # consecutive items share a category far more often than independent draws would
    cat = np.array(read_items(demo).column("category").to_pylist())
    seqs = [h + [t] for h, t in zip(hist, s.column("target").to_pylist())]
    same = np.mean([cat[a] == cat[b] for q in seqs for a, b in zip(q, q[1:])])
    _, freq = np.unique(cat[flat], return_counts=True)
    baseline = float(((freq / freq.sum()) ** 2).sum())
    assert same > 2 * baseline and same > 0.5


def test_streaming_in_chunks(tmp_path, monkeypatch):
    # Chunks of 64 users: several chunks and several part files, same invariants.
    monkeypatch.setattr(synthetic, "CHUNK_USERS", 64)
    out = tmp_path / "chunked"
    summary = _gen(out, users=300, items=120, interactions_per_user=5, rows_per_file=50)
    assert summary["synthetic"]["chunk_users"] == 64
    counts = validate_prepared(out)
    assert summary["counts"]["users_total"] == 300 and counts["items"] == 120
    assert len(sample_files(out)) == -(-counts["samples"] // 50)
    users = read_samples(out).column("user_id").to_pylist()
    assert len(set(users)) == len(users) and users[-1] in {f"u{i}" for i in range(256, 300)}


def test_size_flags_override_preset(tmp_path):
    summary = _gen(tmp_path / "o", preset="book", users=200, items=300, seed=3)
    assert summary["counts"]["users_total"] == 200 and summary["counts"]["items"] == 300
    total = sum(summary["counts"]["interactions"].values())
    assert 40 < total / 200 < 80  # Book's ~60 per user from the preset
    assert summary["config"]["preset"] == "book" and summary["seed"] == 3


def test_read_split_subsample_is_the_seeded_rows_read_in_batches(tmp_path):
    """read_split(max_rows=k) keeps sample_rows(n, k, seed) of the file, across record batches."""
    import pyarrow.parquet as pq

    from engine.data.schema import SPLIT_SCHEMA, read_split, sample_rows

    n = 70_000  # more than one 65,536-row record batch
    rng = np.random.default_rng(0)
    table = pa.table({"user_id": [str(i) for i in range(n)],
                      "history": pa.array([[int(i % 97)] for i in range(n)], pa.list_(pa.int32())),
                      "targets": pa.array([[int(x)] for x in rng.integers(0, 97, n)], pa.list_(pa.int32()))},
                     schema=SPLIT_SCHEMA)
    pq.write_table(table, tmp_path / "valid.parquet", row_group_size=10_000)
    rows = sample_rows(n, 500, 7)
    assert len(rows) == 500 and (np.diff(rows) > 0).all() and rows[-1] > 65_536
    got = read_split(tmp_path, "valid", max_rows=500, seed=7)
    assert got.equals(table.take(pa.array(rows)))
    assert read_split(tmp_path, "valid", max_rows=n + 1).num_rows == n
    assert sample_rows(10, None, 0) is None and sample_rows(10, 10, 0) is None


def test_read_sample_rows_reads_only_the_selected_ids_file_by_file(tmp_path):
    from engine.data.schema import count_samples, read_sample_rows
    from engine.errors import DataError

    out = tmp_path / "d"
    _gen(out, users=300, items=50, rows_per_file=64)
    assert len(sample_files(out)) > 1
    full = read_samples(out)
    assert count_samples(out) == full.num_rows
    ids = np.array([full.num_rows - 1, 0, 70, 5, 130])
    got = read_sample_rows(out, ids)
    assert got.equals(full.take(pa.array(np.sort(ids))))
    with pytest.raises(DataError, match="sample id not in any samples file") as e:
        read_sample_rows(out, [3, full.num_rows + 7])
    assert str(full.num_rows + 7) in str(e.value)
