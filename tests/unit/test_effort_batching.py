"""A sample's effort does not depend on which samples share its batch (engine.effort.batching).

The content-keyed score cache of ``dealrec prune --update`` hands out yesterday's value for an
unchanged sample; that is only invisible if a fresh computation in another batch gives exactly
that value. Before canonical micro-batches, neighbours decided the padding and 72 of 698
unchanged MovieLens samples moved in the 7th digit. Each backend is held to bit-identity (one
torch thread, CPU) across batch compositions: all at once, shuffled with other micro-batch
sizes, each sample alone, a subset among other neighbours.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.effort.batching import PAD_MULTIPLE, canonical_micro_batches, padded_length

WORDS = ["Alpha", "Bravo", "Delta", "Echo", "Omega", "Nova", "Zen", "Storm", "Ridge", "Vale", "Lunar", "Prime"]
N_ITEMS = 36
# titles of 1..6 words: prompts and texts of widely different lengths
TITLES = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 6)) for i in range(N_ITEMS)]
N = 14


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(5)
    hist = [rng.integers(0, N_ITEMS, int(k)).astype(np.int64) for k in rng.integers(0, 12, N)]
    hist[3] = np.zeros(0, dtype=np.int64)  # an empty history
    return np.arange(N), hist, rng.integers(0, N_ITEMS, N).astype(np.int64)


def test_groups_cover_every_row_once_and_share_one_padded_key():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 70, size=(50, 2))
    seen, lone = [], 0
    for idx, key in canonical_micro_batches(lengths, 4):
        assert 2 <= idx.size <= 4  # a lone row comes twice: [i, i]
        assert all(tuple(padded_length(lengths[i])) == key for i in idx)
        assert all(k % PAD_MULTIPLE == 0 and k >= PAD_MULTIPLE for k in key)
        if idx.size == 2 and idx[0] == idx[1]:
            lone += 1
            idx = idx[:1]
        seen.extend(idx.tolist())
    assert sorted(seen) == list(range(50)) and lone > 0
    # a row's key is its own: the same lengths among other rows give the same key
    key_of = {int(i): k for idx, k in canonical_micro_batches(lengths, 3) for i in idx}
    sub = [7, 3, 40]
    for idx, k in canonical_micro_batches(lengths[sub], 2):
        assert all(key_of[sub[int(i)]] == k for i in idx)
    assert list(canonical_micro_batches(np.zeros((0,), np.int64), 2)) == []
    assert [i.tolist() for i, _ in canonical_micro_batches([5], 1)] == [[0, 0]]
    with pytest.raises(ValueError, match="micro_batch"):
        list(canonical_micro_batches([3], 0))


def _compositions(effort, ids, hist, tgt):
    """(name, scores in input order) of the same samples in other batch compositions."""
    rng = np.random.default_rng(1)
    perm = rng.permutation(N)
    inv = np.argsort(perm)
    yield "shuffled, micro-batch 3", effort([ids[i] for i in perm], [hist[i] for i in perm], tgt[perm], 3)[inv]
    yield "each alone", np.concatenate([effort([ids[i]], [hist[i]], tgt[[i]], 1) for i in range(N)])
    sub = np.array([12, 0, 5, 9])  # among other neighbours, in another order
    got = np.full(N, np.nan)
    got[sub] = effort([ids[i] for i in sub], [hist[i] for i in sub], tgt[sub], 2)
    yield "subset", got


def _check(effort, samples):
    ids, hist, tgt = samples
    ref = effort(list(ids), hist, tgt, 8)
    assert np.all(ref > 0)
    for name, got in _compositions(effort, ids, hist, tgt):
        m = ~np.isnan(got)
        np.testing.assert_array_equal(got[m], ref[m], err_msg=name)


def test_bigrec_effort_is_bit_identical_in_any_batch(samples, tmp_path, one_torch_thread):
    from engine.llm import get_backend

    be = get_backend("bigrec", TITLES, llm={"cache_dir": str(tmp_path), "tiny_vocab": 400, "tiny_hidden": 32,
                                            "init_lora_weights": False})
    model = be.build_model()
    _check(lambda i, h, t, mb: be.effort(model, i, h, t, micro_batch=mb), samples)


def test_textrec_effort_is_bit_identical_in_any_batch(samples, tmp_path, one_torch_thread):
    from engine.llm import textrec as te

    path = te.build_tiny_encoder(tmp_path / "enc", TITLES * 2, seed=0)
    cfg = te.TextRecConfig(model=str(path), init_lora_weights=False, n_negatives=5, max_len_user=64,
                           max_len_item=12, lora_dropout=0.0, seed=1)
    model = te.build_model(cfg)
    cat = te.Catalogue.from_titles(TITLES)
    _check(lambda i, h, t, mb: te.effort_scores(model, cat, {"sample_id": np.asarray(i), "history": list(h),
                                                             "target": np.asarray(t)}, micro_batch=mb), samples)


def test_tiger_effort_is_bit_identical_in_any_batch(samples, one_torch_thread):
    from engine.llm import get_backend
    from engine.semantic_ids import build_semantic_ids

    rng = np.random.default_rng(0)
    sids = build_semantic_ids(TITLES, None, {"levels": 2, "codes": 4}, embeddings=rng.normal(size=(N_ITEMS, 8)))
    be = get_backend("tiger", TITLES, semantic_ids=sids,
                     config=dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=2, d_ff=64,
                                 n_user_tokens=16, max_items=10, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=16))
    model = be.build_model()
    _check(lambda i, h, t, mb: be.effort(model, i, h, t, micro_batch=mb), samples)
