"""Per-sample gradient dot products with one vector (:func:`per_sample_grad_dots`, the LLM-side
influence) and their per-sample-loop reference."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.effort.hooks import _eval_mode

__all__ = ["per_sample_grad_dots", "per_sample_grad_dots_loop"]


def _flat_u(u: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """``u`` (flat, over ``params`` in order) cut into one tensor per parameter."""
    total = sum(p.numel() for p in params)
    u = torch.as_tensor(u)
    if u.dim() != 1 or u.numel() != total:
        raise ValueError(f"u must be a flat vector over the trainable parameters ({total} entries, "
                         f"[p for p in model.parameters() if p.requires_grad] in that order), got shape {tuple(u.shape)}")
    out, k = [], 0
    for p in params:
        out.append(u[k:k + p.numel()].view_as(p).to(device=p.device, dtype=p.dtype))
        k += p.numel()
    return out


def per_sample_grad_dots(model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor], batch: dict,
                         u: torch.Tensor) -> torch.Tensor:
    """Exact ``<grad_theta loss_i, u>`` of every sample of a batch, in one pass (any parameter type).

    The LLM-side influence of issue #20: u is one broadcast vector (e.g. the mean gradient of the
    validation-period loss), and each sample's score is its gradient's dot product with u. Method:
    with per-sample weights ``w`` (ones), ``g(w) = grad_theta sum_i w_i loss_i`` is one backward
    with ``create_graph``; ``<g(w), u>`` is linear in w, so its gradient w.r.t. w is exactly the
    vector of per-sample dots (a second backward). No per-sample gradient is materialised, and
    every trainable parameter (LoRA Linears, embeddings, norms, biases) is covered alike.

    Args:
        model: any ``nn.Module``; put in eval mode during the call (dropout off), modes restored.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``, sample i's loss depending on row i only.
        batch: what ``loss_fn`` takes.
        u: flat vector over ``[p for p in model.parameters() if p.requires_grad]`` in that order.

    Returns:
        float32 Tensor [B] (detached).

    Raises:
        ValueError: no trainable parameter, ``loss_fn`` not of shape [B], or ``u`` of the wrong size.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True; nothing to take a gradient of")
    us = _flat_u(u, params)
    with _eval_mode(model), torch.enable_grad():
        losses = loss_fn(model, batch)
        if losses.dim() != 1:
            raise ValueError(f"loss_fn must return per-sample losses of shape [B], got {tuple(losses.shape)}")
        w = torch.ones_like(losses, requires_grad=True)
        grads = torch.autograd.grad((w * losses).sum(), params, create_graph=True, allow_unused=True)
        s = sum((g * x).sum() for g, x in zip(grads, us) if g is not None)
        if not torch.is_tensor(s) or not s.requires_grad:  # no parameter reaches the loss
            return torch.zeros(losses.shape[0], dtype=torch.float32)
        (dots,) = torch.autograd.grad(s, w)
    return dots.detach().float()


def per_sample_grad_dots_loop(model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor], batch: dict,
                              u: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`per_sample_grad_dots`: one forward + backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    us = _flat_u(u, params)
    B = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    out = torch.zeros(B, dtype=torch.float32)
    with _eval_mode(model), torch.enable_grad():
        for i in range(B):
            one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
            grads = torch.autograd.grad(loss_fn(model, one)[0], params, allow_unused=True)
            out[i] = float(sum((g.double() * x.double()).sum() for g, x in zip(grads, us) if g is not None))
    return out
