"""Effort engine on non-Linear parameters (issue #19 item 4): embeddings (with padding_idx, used
twice), LayerNorm, RMSNorm, a ``1 + w`` RMSNorm of its own, GroupNorm, a weight tied between an
embedding and a Linear head, all from one backward = the naive loop; a use outside the hooked
forwards is caught by the batch-gradient check (warning, fallback, still exact); LoRA-only models
keep the old path (tests/unit/test_effort.py, benchmarks/equivalence.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop

V, D, T, B = 23, 8, 6, 5


class GemmaLikeRMSNorm(nn.Module):  # scales by (1 + w): the engine takes the formula from forward
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(0.1 * torch.randn(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class Toy(nn.Module):
    def __init__(self, tie=False, outside=False):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.ln = nn.LayerNorm(D)
        self.rms = nn.RMSNorm(D)
        self.gemma = GemmaLikeRMSNorm(D)
        self.gn = nn.GroupNorm(2, D)
        self.lin = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        if tie:
            self.head.weight = self.emb.weight
        self.outside = outside
        with torch.no_grad():
            for m in (self.ln, self.rms):
                m.weight.mul_(1 + 0.2 * torch.randn(D))
            self.ln.bias.normal_()

    def forward(self, ids):
        h = self.emb(ids) + 0.5 * self.emb(ids.flip(1))  # the embedding used twice
        h = self.ln(h)
        h = torch.tanh(self.lin(h))
        h = self.rms(h)
        h = self.gemma(h)
        h = self.gn(h.transpose(1, 2)).transpose(1, 2)
        logits = self.head(h)
        if self.outside:  # the embedding weight used outside its module's forward
            logits = logits + h @ self.emb.weight.T
        return logits


def loss_fn(model, batch):
    logits = model(batch["ids"])
    return nn.functional.cross_entropy(logits.reshape(-1, V), batch["y"].reshape(-1), reduction="none").view(-1, T).mean(1)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    ids[0, :3] = 0  # padding_idx positions: no gradient to row 0
    return {"ids": ids, "y": torch.randint(0, V, (B, T), generator=g)}


def _assert_exact_without_fallback(model):
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no parameter may take the fallback
        got = per_sample_grad_norms(model, loss_fn, batch)
    ref = per_sample_grad_norms_loop(model, loss_fn, batch)
    assert float(((got - ref).abs() / ref).max()) <= 1e-4


@pytest.mark.parametrize("tie", [False, True])
def test_every_module_type_equals_the_loop(tie):
    torch.manual_seed(0)
    model = Toy(tie=tie)
    _assert_exact_without_fallback(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["emb", "ln", "rms", "gemma", "gn", "head"])
def test_each_type_alone(name):
    torch.manual_seed(1)
    model = Toy()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(name + "."))
    _assert_exact_without_fallback(model)


def test_a_use_outside_the_module_forward_is_caught():
    torch.manual_seed(2)
    model = Toy(outside=True)
    batch = _batch()
    with pytest.warns(UserWarning, match="do not add up.*emb.weight"):
        got = per_sample_grad_norms(model, loss_fn, batch)
    ref = per_sample_grad_norms_loop(model, loss_fn, batch)
    assert float(((got - ref).abs() / ref).max()) <= 1e-4
