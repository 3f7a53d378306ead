"""engine.effort.per_sample_grad_dots: per-sample gradients dotted with one vector u, exact against
a one-backward-per-sample loop, for a LoRA causal LM (BIGRec) and for a model whose trainable
parameters include an embedding, a norm and biases (TIGER-like: every parameter trains)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.effort import per_sample_grad_dots, per_sample_grad_dots_loop
from engine.llm.bigrec.prompts import get_prompt_config, per_sample_causal_lm_loss
from tests.unit.test_effort import TITLES, _batch, llm, samples  # noqa: F401  (fixtures)

RTOL = 1e-4


def _u(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return torch.randn(n, generator=g)


def _check(got, ref):
    assert got.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-12)
    assert float((got - ref).abs().max() / scale) <= RTOL, (got, ref)


def test_lora_llm_dots_equal_the_loop(llm, samples):  # noqa: F811
    model, tok = llm
    hist, tgt = samples
    batch = _batch(tok, hist[:6], tgt[:6], get_prompt_config("games"))
    u = _u(model)
    got = per_sample_grad_dots(model, per_sample_causal_lm_loss, batch, u)
    _check(got, per_sample_grad_dots_loop(model, per_sample_causal_lm_loss, batch, u))
    assert torch.all(got != 0) and all(p.grad is None for p in model.parameters())
    # batch-independent: a sample's dot is the same alone
    one = {k: v[2:3] for k, v in batch.items()}
    alone = per_sample_grad_dots(model, per_sample_causal_lm_loss, one, u)
    assert abs(float(alone[0] - got[2])) <= 1e-4 * float(got.abs().max())


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.norm = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 20)

    def forward(self, ids):
        return self.lin(self.norm(self.emb(ids)))


def test_every_parameter_type_and_bad_u():
    torch.manual_seed(0)
    m = Tiny()
    ids = torch.randint(0, 20, (5, 4))
    ids[0, 2:] = 0
    tgt = torch.randint(1, 20, (5, 4))

    def loss_fn(model, batch):
        logits = model(batch["ids"])
        tok = nn.functional.cross_entropy(logits.transpose(1, 2), batch["tgt"], reduction="none")
        return (tok * (batch["ids"] != 0)).sum(1)

    batch = {"ids": ids, "tgt": tgt}
    u = _u(m, 1)
    _check(per_sample_grad_dots(m, loss_fn, batch, u), per_sample_grad_dots_loop(m, loss_fn, batch, u))
    with pytest.raises(ValueError, match="flat vector over the trainable parameters"):
        per_sample_grad_dots(m, loss_fn, batch, u[:-1])
