"""Chunked top-k equals a dense stable argsort; grounding of hand-made embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.grounding import ground, index_titles, topk_l2


def _dense(q, x, k):
    d = ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("chunk,query_chunk", [(1, 1), (3, 2), (7, 5), (64, 100), (1000, 1000)])
def test_chunked_topk_equals_dense_argsort(chunk, query_chunk):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(13, 6))
    x = rng.normal(size=(57, 6))
    for k in (1, 5, 20, 57, 80):
        d, i = topk_l2(q, x, k, chunk=chunk, query_chunk=query_chunk)
        dd, di = _dense(q, x, min(k, 57))
        np.testing.assert_array_equal(i, di)
        np.testing.assert_allclose(d, dd, rtol=1e-9, atol=1e-9)


def test_ties_resolve_to_lower_index_like_stable_argsort():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(5, 4))
    x = np.concatenate([base, base, base])  # every row appears 3 times
    q = rng.normal(size=(4, 4))
    for chunk in (1, 2, 4, 6, 15):
        _, i = topk_l2(q, x, 9, chunk=chunk)
        d = ((q[:, None, :] - x[None]) ** 2).sum(-1)
        np.testing.assert_array_equal(i, np.argsort(d, axis=1, kind="stable")[:, :9])


def test_torch_float32_inputs():
    g = torch.Generator().manual_seed(0)
    q, x = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    d, i = topk_l2(q, x, 10, chunk=17)
    ref = torch.cdist(q.double(), x.double()).argsort(1)[:, :10].numpy()
    np.testing.assert_array_equal(i, ref)
    assert d.dtype == np.float32


def test_ground_hand_made_embeddings():
    # titles on a line: a at 0, b at 1, c at 5; item 3 duplicates title "b"
    titles = ["a", "b", "c", "b"]
    idx = index_titles(titles)
    emb = np.array([[0.0], [1.0], [5.0]])  # one row per distinct title a, b, c
    queries = np.array([[0.9], [4.0], [-3.0]])
    out = ground(queries, emb, idx, 3, chunk=1)
    assert out.tolist() == [[1, 3, 0], [2, 1, 3], [0, 1, 3]]
    # equals a stable dense argsort over the item-level matrix
    item_emb = emb[idx.item_title]
    _, dense = _dense(queries, item_emb, 3)
    np.testing.assert_array_equal(out, dense)


def test_ground_expansion_equals_item_level_argsort_random():
    rng = np.random.default_rng(3)
    titles = [f"t{rng.integers(0, 15)}" for _ in range(40)]
    idx = index_titles(titles)
    emb = rng.normal(size=(len(idx.titles), 3))
    q = rng.normal(size=(9, 3))
    for k in (1, 10, 40):
        out = ground(q, emb, idx, k, chunk=4)
        _, dense = _dense(q, emb[idx.item_title], k)
        np.testing.assert_array_equal(out, dense)


@pytest.mark.parametrize("query_chunk", [1, 4, 100])
def test_ground_exclude_equals_item_level_argsort_without_them(query_chunk):
    """Excluded items drop out and the rest move up: the dense stable argsort over the item
    embeddings with each user's excluded items removed, -1 where fewer than k remain."""
    rng = np.random.default_rng(4)
    titles = [f"t{rng.integers(0, 12)}" for _ in range(30)]
    idx = index_titles(titles)
    emb = rng.normal(size=(len(idx.titles), 3))
    q = rng.normal(size=(9, 3))
    exclude = [rng.choice(30, size=rng.integers(0, 12), replace=False).tolist() for _ in range(9)]
    _, dense = _dense(q, emb[idx.item_title], 30)
    for k in (1, 5, 25, 30):
        out = ground(q, emb, idx, k, chunk=3, query_chunk=query_chunk, exclude=exclude)
        assert out.shape == (9, k)
        for u in range(9):
            want = [int(i) for i in dense[u] if int(i) not in set(exclude[u])][:k]
            assert out[u].tolist() == want + [-1] * (k - len(want))
    # no exclusion at all is the plain grounding
    np.testing.assert_array_equal(ground(q, emb, idx, 7, exclude=[[]] * 9), ground(q, emb, idx, 7))
    assert ground(q, emb, idx, 40, pad=True)[:, 30:].tolist() == [[-1] * 10] * 9


def test_bad_arguments():
    with pytest.raises(ConfigError):
        topk_l2(np.zeros((2, 3)), np.zeros((4, 2)), 0)
    with pytest.raises(ConfigError):
        ground(np.zeros((2, 3)), np.zeros((4, 3)), index_titles(["a", "b"]), 2)
    with pytest.raises(ConfigError):
        ground(np.zeros((2, 3)), np.zeros((2, 3)), index_titles(["a", "b"]), 2, exclude=[[0]])
