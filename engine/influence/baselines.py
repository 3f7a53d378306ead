"""Per-sample scores of the selection baselines, batched (no per-sample loop).

- GraNd (Paul et al. 2021): ||grad_theta L_s|| over every surrogate parameter, at the
  trained surrogate (eval mode), with the same deterministic per-sample loss as influence.
- EL2N (Paul et al. 2021): ||softmax(f(x_s)) - onehot(y_s)||_2 for the next-item prediction
  of the sample's target after its history.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from engine.influence.params import _eval_mode, _LossModule, trainable_params

__all__ = ["el2n_scores", "grand_scores"]


def grand_scores(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Mapping[str, Any], *,
                 chunk_size: int | None = 16) -> Tensor:
    """Per-sample gradient norms ||grad L_s||_2 over all trainable parameters, via vmap(grad).

    ``loss_fn`` is called on one-sample batches under ``torch.func.vmap`` (the surrogates'
    losses take a dense, index-free path for one-sample batches, so they are vmap-safe).

    Args:
        model: the surrogate (any module whose loss_fn is vmap-compatible on one-sample batches).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        batch: dict with tensors carrying the sample dimension first.
        chunk_size: samples per vectorised chunk (bounds memory; None = all at once).

    Returns:
        float Tensor [B], detached, in batch order.
    """
    params = {k: p.detach() for k, p in trainable_params(model).items()}
    size = next(int(v.shape[0]) for v in batch.values() if torch.is_tensor(v) and v.dim() >= 1)
    per = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size}
    rest = {k: v for k, v in batch.items() if k not in per}

    def one(p: dict[str, Tensor], sample: dict[str, Tensor]) -> Tensor:
        b = {k: t.unsqueeze(0) for k, t in sample.items()}
        b.update(rest)
        return functional_call(wrapper, {"model." + k: t for k, t in p.items()}, (b,))[0]

    wrapper = _LossModule(model, loss_fn)
    with _eval_mode(model):
        g = vmap(grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, per)
    sq = sum(t.reshape(size, -1).pow(2).sum(1) for t in g.values())
    return sq.sqrt().detach()


@torch.no_grad()
def el2n_scores(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """EL2N: ||softmax(score_next) - onehot(target)||_2 per sample (eval mode).

    Args:
        model: a surrogate with ``score_next(batch) -> [B, n_items]``.
        batch: a training batch from ``engine.surrogate.make_batches`` (needs ``target``).

    Returns:
        float Tensor [B].
    """
    with _eval_mode(model):
        p = F.softmax(model.score_next(batch).double(), dim=-1)
    t = batch["target"].long()
    pt = p.gather(1, t[:, None]).squeeze(1)
    # ||p - e_t||^2 = ||p||^2 - 2 p_t + 1
    return (p.pow(2).sum(1) - 2 * pt + 1).clamp_min(0).sqrt().float()
