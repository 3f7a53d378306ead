"""TIGER backend (issue #19 items 2-5): registered, encoding, batch-independent loss, effort over
ALL parameters = the naive loop for every parameter type, constrained beam search = exhaustive
scoring on a tiny catalogue, exclusion, checkpoints, a short fine-tune lowers validation loss."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop
from engine.errors import ConfigError
from engine.llm import LLMBackend, get_backend
from engine.llm.tiger import TigerConfig, per_sample_loss
from engine.llm.tiger.backend import TigerBackend
from engine.semantic_ids import build_semantic_ids

N_ITEMS = 30
TITLES = [f"item {i}" for i in range(N_ITEMS)]
TINY = dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=2, d_ff=64, n_user_tokens=16,
            max_items=5, beam_width=N_ITEMS, relative_attention_num_buckets=8, relative_attention_max_distance=16)
RTOL = 1e-4


def rel_err(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def sids():
    rng = np.random.default_rng(0)
    # 2 levels x 4 codes over 30 items: collisions, so the de-duplication token is used
    return build_semantic_ids(TITLES, None, {"levels": 2, "codes": 4}, embeddings=rng.normal(size=(N_ITEMS, 8)))


def backend(sids, **kw):
    return get_backend("tiger", TITLES, config={**TINY, **kw}, semantic_ids=sids)


@pytest.fixture(scope="module")
def be(sids):
    return backend(sids)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(1)
    hist = [rng.integers(0, N_ITEMS, rng.integers(0, 9)).tolist() for _ in range(7)]
    hist[0] = []  # an empty history
    return list(range(7)), hist, rng.integers(0, N_ITEMS, 7).tolist()


def test_registered_and_protocol(be, sids):
    assert isinstance(be, LLMBackend) and be.name == "tiger"
    assert be.layout.level_sizes == tuple(sids.level_sizes) and be.layout.length == 3
    with pytest.raises(ConfigError, match="semantic-ids"):
        get_backend("tiger", TITLES, config=TINY)
    with pytest.raises(ConfigError, match="catalogue of 29"):
        get_backend("tiger", TITLES[:-1], config=TINY, semantic_ids=sids)
    with pytest.raises(ConfigError, match="unknown field"):
        get_backend("tiger", TITLES, config={"layers": 3}, semantic_ids=sids)


def test_defaults_are_the_papers_model(sids):
    cfg = TigerConfig()
    assert (cfg.num_layers, cfg.num_decoder_layers, cfg.num_heads, cfg.d_model, cfg.d_ff, cfg.dropout) == \
        (4, 4, 6, 128, 1024, 0.1)
    m = get_backend("tiger", TITLES, semantic_ids=sids).build_model()
    c = m.config
    assert (c.num_layers, c.num_decoder_layers, c.num_heads, c.d_model, c.d_ff, c.dropout_rate) == (4, 4, 6, 128, 1024, 0.1)
    assert all(p.requires_grad for p in m.parameters())
    # one token embedding for encoder and decoder (no dead ``shared``), an untied head
    assert m.encoder.embed_tokens.weight is m.shared.weight is m.decoder.embed_tokens.weight
    assert m.lm_head.weight is not m.shared.weight
    assert c.vocab_size == 2 + sum(sids.level_sizes) + 2000


def test_encoding_keeps_the_most_recent_items(be):
    hist = list(range(12))
    b = be.encode_samples([0], [hist], [3])
    L = be.layout.length
    ids = b["input_ids"][0].tolist()
    assert len(ids) == 1 + 5 * L + 1 and ids[-1] == 1  # user token, 5 most recent items, eos
    assert be.layout.user_offset <= ids[0] < be.layout.vocab_size
    assert ids[1:-1] == be.item_tokens[7:12].reshape(-1).tolist()
    assert b["labels"].tolist() == [be.item_tokens[3].tolist()]
    # the user token depends on the oldest item only: the same in a longer (later) history
    assert be.encode_samples([0], [hist + [20]], [3])["input_ids"][0, 0] == ids[0]


def test_per_sample_loss_is_batch_independent(be, samples):
    model = be.build_model().eval()
    sid, hist, tgt = samples
    b = be.encode_samples(sid, hist, tgt)
    assert len(set(b["attention_mask"].sum(1).tolist())) > 2  # padding present
    with torch.no_grad():
        whole = be.per_sample_loss(model, b)
        one = torch.cat([be.per_sample_loss(model, be.encode_samples(sid[i:i + 1], hist[i:i + 1], tgt[i:i + 1]))
                         for i in range(len(tgt))])
        rev = be.per_sample_loss(model, be.encode_samples(sid[::-1], hist[::-1], tgt[::-1])).flip(0)
    assert torch.allclose(whole, one, rtol=1e-5, atol=1e-6) and torch.allclose(whole, rev, rtol=1e-5, atol=1e-6)


PARAM_TYPES = {
    "embedding": lambda n, m: isinstance(m, nn.Embedding) and "relative_attention_bias" not in n,
    "relative_bias": lambda n, m: "relative_attention_bias" in n,
    "t5_layer_norm": lambda n, m: type(m).__name__ == "T5LayerNorm",
    "attention_linear": lambda n, m: isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in "qkvo",
    "mlp_linear": lambda n, m: isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("wi", "wo"),
    "lm_head": lambda n, m: n == "lm_head",
}


def _only(model, kind):
    """Make trainable only the parameters owned by modules of ``kind`` (None: all)."""
    keep = set()
    for n, m in model.named_modules():
        if kind is None or PARAM_TYPES[kind](n, m):
            keep |= {id(p) for p in m.parameters(recurse=False)}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    assert keep
    return model


@pytest.mark.parametrize("kind", [None, *PARAM_TYPES])
def test_effort_equals_the_naive_loop_for_every_parameter_type(be, samples, kind):
    model = _only(be.build_model(), kind)
    with torch.no_grad():  # non-trivial norm weights (T5 initialises them to 1)
        for n, m in model.named_modules():
            if type(m).__name__ == "T5LayerNorm":
                m.weight.mul_(1 + 0.1 * torch.randn_like(m.weight))
    sid, hist, tgt = samples
    b = be.encode_samples(sid, hist, tgt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter may take the fallback
        got = per_sample_grad_norms(model, per_sample_loss, b)
    ref = per_sample_grad_norms_loop(model, per_sample_loss, b)
    assert got.shape == (7,) and torch.all(got > 0)
    assert rel_err(got, ref) <= RTOL, (kind, got, ref)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_effort_tied_embeddings_and_micro_batches(sids, samples):
    be = backend(sids, tie_embeddings=True)
    model = be.build_model()
    assert model.lm_head.weight is model.shared.weight
    sid, hist, tgt = samples
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = be.effort(model, sid, hist, tgt, micro_batch=7)
        b = be.effort(model, sid, hist, tgt, micro_batch=3)
    ref = per_sample_grad_norms_loop(model, per_sample_loss, be.encode_samples(sid, hist, tgt)).double().numpy()
    assert a.dtype == np.float64 and np.allclose(a, ref, rtol=RTOL) and np.allclose(a, b, rtol=1e-5)


def _exhaustive(be, model, hist, k, exclude=()):
    with torch.no_grad():
        b = be.encode_samples(range(N_ITEMS), [hist] * N_ITEMS, list(range(N_ITEMS)))
        lp = -be.per_sample_loss(model, b) * be.layout.length  # log p(tuple)
    lp[list(exclude)] = -torch.inf
    return torch.argsort(lp, descending=True, stable=True)[:k].tolist(), lp


def test_beam_search_equals_scoring_every_item(be, samples):
    model = be.build_model()
    _, hist, _ = samples
    items, scores = be.rank_with_scores(model, hist, 6, exclude=[[]] * len(hist))
    assert model.training  # modes restored
    model.eval()
    for u, h in enumerate(hist):
        top, lp = _exhaustive(be, model, h, 6)
        assert items[u].tolist() == top
        assert np.allclose(scores[u], lp[top].numpy(), atol=1e-4)


def test_beam_search_returns_distinct_catalogue_items_and_excludes_history(sids, samples):
    be = backend(sids, beam_width=4)  # narrower than the catalogue: still only real, distinct items
    model = be.build_model()
    _, hist, _ = samples
    items = be.rank_items(model, hist, 8)  # k > beam_width: the width is raised to k
    assert items.shape == (7, 8) and items.dtype == np.int64
    for row, h in zip(items.tolist(), hist):
        assert len(set(row)) == 8 and all(0 <= i < N_ITEMS for i in row) and not set(row) & set(h)
    be_w = backend(sids)  # full width: exact top-k among the non-excluded items
    model.eval()
    ex = [list(range(0, N_ITEMS, 2))] * 2
    got = be_w.rank_items(model, hist[:2], 5, exclude=ex)
    for u in range(2):
        assert got[u].tolist() == _exhaustive(be_w, model, hist[u], 5, exclude=ex[u])[0]
    # excluding all but three items leaves -1 after them
    left = be_w.rank_items(model, [[]], 5, exclude=[list(range(3, N_ITEMS))])
    assert sorted(left[0, :3].tolist()) == [0, 1, 2] and left[0, 3:].tolist() == [-1, -1]


def test_checkpoint_round_trip(be, sids, tmp_path):
    model = be.build_model()
    with torch.no_grad():
        model.shared.weight.add_(1.0)
    be.save_model(model, tmp_path / "ckpt")
    again = backend(sids, checkpoint=str(tmp_path / "ckpt")).build_model()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    loaded = be.load_model(str(tmp_path / "ckpt"))
    assert not loaded.training and torch.equal(loaded.shared.weight, model.shared.weight)
    other = build_semantic_ids(TITLES, None, {"levels": 3, "codes": 4},
                               embeddings=np.random.default_rng(5).normal(size=(N_ITEMS, 8)))
    with pytest.raises(ConfigError, match="layout"):
        get_backend("tiger", TITLES, config={**TINY, "checkpoint": str(tmp_path / "ckpt")},
                    semantic_ids=other).build_model()
    # seeded init: the same seed gives the same model
    a, b = be.build_model(), be.build_model()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_short_finetune_lowers_validation_loss(be):
    """Plain AdamW over backend.train_loss: users walk the catalogue (next = last + 1)."""
    rng = np.random.default_rng(0)

    def walks(n):
        starts = rng.integers(0, N_ITEMS, n)
        lens = rng.integers(1, 6, n)
        hist = [[(s + j) % N_ITEMS for j in range(n_)] for s, n_ in zip(starts, lens)]
        return hist, [(h[-1] + 1) % N_ITEMS for h in hist]

    tr_h, tr_t = walks(256)
    va_h, va_t = walks(64)
    torch.manual_seed(0)
    model = be.build_model()
    val = be.encode_samples(range(64), va_h, va_t)

    def val_loss():
        model.eval()
        with torch.no_grad():
            v = float(be.per_sample_loss(model, val).mean())
        model.train()
        return v

    before = val_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for epoch in range(4):
        for s in range(0, 256, 32):
            loss = be.train_loss(model, be.encode_train(tr_h[s:s + 32], tr_t[s:s + 32]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = val_loss()
    assert after < 0.7 * before, (before, after)
    hits = TigerBackend(TITLES, config={**TINY, "beam_width": 8}, semantic_ids=be.semantic_ids).rank_items(
        model, va_h, 5)
    recall = np.mean([t in row for t, row in zip(va_t, hits.tolist())])
    assert recall > 0.3, recall
