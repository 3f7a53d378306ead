"""Effort: batched per-sample gradient norms equal the naive loop, independent of batching."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop
from engine.llm.bigrec.effort import score_effort_batch
from engine.llm.bigrec.model import LLMConfig, load_llm
from engine.llm.bigrec.prompts import collate, encode_sample, get_prompt_config, per_sample_causal_lm_loss

TITLES = [f"Game {i} {w}" for i, w in enumerate(["Quest", "Racer", "Arena", "Legends", "Puzzle", "Saga"] * 10)]
RTOL = 1e-4


def rel_err(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "dealrec-cache"
    # A and B both non-zero (peft's default init has B = 0, which makes the A-gradient exactly 0).
    return load_llm(LLMConfig(cache_dir=str(cache), init_lora_weights=False, seed=1), titles=TITLES)


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, len(TITLES), rng.integers(0, 12)) for _ in range(11)]
    return hist, rng.integers(0, len(TITLES), 11)


def _batch(tok, hist, tgt, cfg):
    enc = [encode_sample(tok, [TITLES[j] for j in h], TITLES[t], cfg) for h, t in zip(hist, tgt)]
    return collate(enc, tok.pad_token_id)


@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_batched_equals_naive_loop(llm, samples, train_on_inputs):
    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:6], tgt[:6], get_prompt_config("games", train_on_inputs=train_on_inputs))
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # mixed lengths, padding present
    got = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    ref = per_sample_grad_norms_loop(model, per_sample_causal_lm_loss, batch)
    assert got.shape == (6,) and torch.all(got > 0)
    assert rel_err(got, ref) <= RTOL
    assert all(p.grad is None for p in model.parameters())  # no side effects on .grad


def test_a_and_b_both_count(llm, samples):
    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:3], tgt[:3], get_prompt_config("games"))
    full = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    a_params = [p for n, p in model.named_parameters() if "lora_A" in n]
    for p in a_params:
        p.requires_grad_(False)
    try:
        b_only = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    finally:
        for p in a_params:
            p.requires_grad_(True)
    assert torch.all(full > b_only * (1 + 1e-6))


def test_sample_alone_equals_in_any_batch(llm, samples):
    model, tok = llm
    hist, tgt = samples
    cfg = get_prompt_config("games")
    together = per_sample_grad_norms(model, per_sample_causal_lm_loss, _batch(tok, hist, tgt, cfg))
    for i in (0, 4, 10):
        alone = per_sample_grad_norms(model, per_sample_causal_lm_loss, _batch(tok, hist[i:i + 1], tgt[i:i + 1], cfg))
        assert rel_err(alone, together[i:i + 1]) <= RTOL


def test_dropout_is_off_and_mode_restored(llm, samples):
    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:4], tgt[:4], get_prompt_config("games"))
    ref = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    model.train()
    try:
        again = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(ref, again)


def test_score_batch_independent_of_batch_and_micro_batch(llm, samples):
    model, tok = llm
    hist, tgt = samples
    cfg = get_prompt_config("games")
    ref = score_effort_batch(model, tok, TITLES, hist, tgt, cfg, micro_batch_size=1)
    assert ref.dtype == np.float64 and ref.shape == (11,)
    for mb in (3, 16):
        np.testing.assert_allclose(score_effort_batch(model, tok, TITLES, hist, tgt, cfg, micro_batch_size=mb),
                                   ref, rtol=RTOL)
    split = np.concatenate([score_effort_batch(model, tok, TITLES, hist[:5], tgt[:5], cfg, micro_batch_size=2),
                            score_effort_batch(model, tok, TITLES, hist[5:], tgt[5:], cfg, micro_batch_size=4)])
    np.testing.assert_allclose(split, ref, rtol=RTOL)


def test_fallback_for_trainable_embedding_is_exact_and_warns(llm, samples, monkeypatch):
    import engine.effort.hooks as hooks  # where _ExtraParams looks _is_plain_embedding up

    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:4], tgt[:4], get_prompt_config("games"))
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        ref = per_sample_grad_norms_loop(model, per_sample_causal_lm_loss, batch)
        with warnings.catch_warnings():  # an embedding has its own hook path now (#19): no fallback
            warnings.simplefilter("error")
            hooked = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
        monkeypatch.setattr(hooks, "_is_plain_embedding", lambda mod: False)  # force the fallback
        with pytest.warns(UserWarning, match="embed_tokens"):
            got = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    finally:
        emb.requires_grad_(False)
    assert rel_err(got, ref) <= RTOL and rel_err(hooked, ref) <= RTOL


class _Toy(nn.Module):
    """Linear layers with biases, a layer used twice, a ghost-norm-sized layer and a raw Parameter."""

    def __init__(self, with_raw: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 96)
        self.shared = nn.Linear(96, 96)  # T*(96+96) < 96*96 for T=4: ghost norm when called once
        self.twice = nn.Linear(96, 96)
        self.out = nn.Linear(96, 3)
        self.scale = nn.Parameter(torch.randn(96)) if with_raw else None

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        if self.scale is not None:
            h = h * self.scale
        return self.out(h)


def _toy_loss(model, batch):
    y = model(batch["x"])  # [B, T, 3]
    return ((y - batch["y"]) ** 2).mean(dim=(1, 2))


@pytest.mark.parametrize("with_raw", [False, True])
def test_generic_module_matches_loop(with_raw):
    model = _Toy(with_raw)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(6, 4, 5, generator=g), "y": torch.randn(6, 4, 3, generator=g)}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = per_sample_grad_norms(model, _toy_loss, batch)
    assert any("scale" in str(x.message) for x in w) == with_raw
    ref = per_sample_grad_norms_loop(model, _toy_loss, batch)
    assert rel_err(got, ref) <= RTOL


def test_no_trainable_parameters_raises():
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        per_sample_grad_norms(m, lambda mod, b: mod(b["x"]).sum(1), {"x": torch.ones(3, 2)})


def test_fallback_chunked_and_loop_paths_agree(llm, samples, monkeypatch):
    import engine.effort.fallback as fallback  # where _fallback_sq_norms looks _FALLBACK_BUDGET up
    import engine.effort.hooks as hooks

    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:4], tgt[:4], get_prompt_config("games"))
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(True)
    try:
        ref = per_sample_grad_norms_loop(model, per_sample_causal_lm_loss, batch)
        monkeypatch.setattr(hooks, "_is_plain_embedding", lambda mod: False)  # the embedding takes the fallback
        monkeypatch.setattr(fallback, "_FALLBACK_BUDGET", emb.numel())  # one sample per vmap chunk
        real_grad = torch.autograd.grad
        chunks = []

        def counting(*a, **k):
            if k.get("is_grads_batched"):
                chunks.append(k["grad_outputs"].shape[0])
            return real_grad(*a, **k)

        monkeypatch.setattr(torch.autograd, "grad", counting)
        with pytest.warns(UserWarning, match="embed_tokens"):
            chunked = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
        assert chunks == [1, 1, 1, 1]  # the patched budget took effect: the vmap ran one sample at a time

        def no_vmap(*a, **k):
            if k.get("is_grads_batched"):
                raise RuntimeError("no batching rule")
            return real_grad(*a, **k)

        monkeypatch.setattr(torch.autograd, "grad", no_vmap)
        with pytest.warns(UserWarning, match="embed_tokens"):
            looped = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch)
    finally:
        emb.requires_grad_(False)
    assert rel_err(chunked, ref) <= RTOL and rel_err(looped, ref) <= RTOL
