"""LLM-side influence (issue #20 item 3), engine level, every backend (bigrec, textrec, tiger):
u = the weighted mean validation gradient equals a one-backward-per-pair loop, and
llm_influence(s) = grad L(s) . u equals per-sample gradients (one backward per sample, each
sample encoded alone) dotted with u, for any micro-batch size."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.influence.llm import llm_influence_scores, trainable_parameters, valid_gradient, validation_pairs
from engine.llm import get_backend

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TITLES = [f"Game {i} {w}" for i, w in enumerate(["Quest", "Racer", "Arena", "Legends", "Puzzle", "Saga"] * 5)]
N_ITEMS = len(TITLES)
RTOL = 1e-4


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    n = 9
    hist = [rng.integers(0, N_ITEMS, rng.integers(0, 8)).astype(np.int64) for _ in range(n)]
    tgt = rng.integers(0, N_ITEMS, n).astype(np.int64)
    rows = pa.table({"user_id": [f"u{i}" for i in range(4)],
                     "history": pa.array([rng.integers(0, N_ITEMS, k).tolist() for k in (3, 0, 6, 2)],
                                         pa.list_(pa.int32())),
                     "targets": pa.array([[1], [4, 7, 7], [2, 9], [11]], pa.list_(pa.int32()))})
    return np.arange(n, dtype=np.int64), hist, tgt, rows


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """name -> (backend, model): tiny models with every trainable parameter non-zero."""
    from engine.llm import textrec as te
    from engine.llm.bigrec.model import LLMConfig
    from engine.semantic_ids import build_semantic_ids

    out = {}
    cache = tmp_path_factory.getbasetemp() / "dealrec-cache"
    be = get_backend("bigrec", TITLES, llm=LLMConfig(cache_dir=str(cache), init_lora_weights=False, seed=1).to_dict(),
                     prompt="games")
    out["bigrec"] = (be, be.build_model())
    enc = te.build_tiny_encoder(tmp_path_factory.mktemp("enc"), TITLES + ["The user has purchased the following"])
    be = get_backend("textrec", TITLES, config=te.TextRecConfig(model=str(enc), n_negatives=4,
                                                                 init_lora_weights=False, seed=1).to_dict())
    out["textrec"] = (be, be.build_model())
    sids = build_semantic_ids(TITLES, None, {"levels": 2, "codes": 4},
                              embeddings=np.random.default_rng(0).normal(size=(N_ITEMS, 8)))
    tiny = dict(num_layers=1, num_decoder_layers=1, d_model=16, d_kv=8, num_heads=2, d_ff=32, n_user_tokens=8,
                max_items=5, relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout=0.0)
    be = get_backend("tiger", TITLES, config=tiny, semantic_ids=sids)
    out["tiger"] = (be, be.build_model())
    return out


def _grad(backend, model, sid, hist, tgt) -> torch.Tensor:
    """One sample alone: its own forward and backward (the naive reference)."""
    params = trainable_parameters(model)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        batch = backend.encode_samples([int(sid)], [hist], [int(tgt)])
        dev = params[0].device
        batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
        loss = backend.per_sample_loss(model, batch)[0]
        gs = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for m, t in modes.items():
            m.training = t
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(gs, params)])


def test_validation_pairs_weigh_every_user_the_same(data):
    _, _, _, rows = data
    pairs = validation_pairs(rows, id_offset=100)
    assert pairs["n_users"] == 4 and pairs["target"].tolist() == [1, 4, 7, 7, 2, 9, 11]
    assert pairs["sample_id"].tolist() == list(range(100, 107))
    np.testing.assert_allclose(pairs["weight"], [1 / 4, 1 / 12, 1 / 12, 1 / 12, 1 / 8, 1 / 8, 1 / 4])
    assert pairs["history"][2].tolist() == rows.column("history")[1].as_py() == []
    with pytest.raises(ValueError, match="no target"):
        validation_pairs({"history": [[1]], "targets": [[]]}, id_offset=0)


@pytest.mark.parametrize("name", ["bigrec", "textrec", "tiger"])
def test_u_and_llm_influence_equal_the_per_sample_loop(backends, data, name):
    backend, model = backends[name]
    ids, hist, tgt, rows = data
    pairs = validation_pairs(rows, id_offset=len(ids))
    ref_u = sum(w * _grad(backend, model, s, h, t)
                for s, h, t, w in zip(pairs["sample_id"], pairs["history"], pairs["target"], pairs["weight"]))
    assert float(ref_u.norm()) > 0
    for mb in (1, 3, 16):
        u = valid_gradient(backend, model, pairs, micro_batch=mb)
        assert u.dtype == np.float64 and u.shape == ref_u.shape
        assert float(np.abs(u - ref_u.numpy()).max() / ref_u.abs().max()) <= 1e-5, (name, mb)
    ref = torch.stack([_grad(backend, model, s, h, t) @ ref_u for s, h, t in zip(ids, hist, tgt)]).numpy()
    assert np.abs(ref).max() > 0
    for mb in (1, 4, 16):
        got = llm_influence_scores(backend, model, ids, hist, tgt, u, micro_batch=mb)
        assert got.dtype == np.float64 and got.shape == (len(ids),)
        assert float(np.abs(got - ref).max() / np.abs(ref).max()) <= RTOL, (name, mb, got, ref)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="trainable parameters"):
        llm_influence_scores(backend, model, ids, hist, tgt, u[:-1])
