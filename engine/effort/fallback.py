"""Fallback of :func:`engine.effort.per_sample_grad_norms` for trainable parameters that neither
hooked path covers (:mod:`engine.effort.hooks`): not the weight/bias of an ``nn.Linear`` used
through its own forward nor of a supported embedding / norm / relative-position bias (peft's
LoRA-embedding matrices, a raw ``nn.Parameter``, a module whose input lacks the batch in dim 0,
a parameter that fails the coverage check). They get exact per-sample gradients from the same
forward graph with ``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward),
or a per-sample backward restricted to them when vmap cannot run; the caller warns naming them.
"""

from __future__ import annotations

import torch

_FALLBACK_BUDGET = 1 << 26  # elements of batched per-sample gradients held at once (256 MB fp32)


def _fallback_sq_norms(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Exact per-sample squared grad norms of ``params`` from the existing graph.

    Batched: vmap over the backward (``is_grads_batched``), in chunks of samples so that at most
    ``_FALLBACK_BUDGET`` gradient elements are alive (an embedding of a 7B model is 131M numbers
    per sample). Falls back to one backward per sample when an op has no vmap rule.
    """
    B = losses.shape[0]
    out = torch.zeros(B, dtype=torch.float32, device=losses.device)
    numel = max(1, sum(p.numel() for p in params))
    chunk = max(1, min(B, _FALLBACK_BUDGET // numel))
    eye = torch.eye(B, dtype=losses.dtype, device=losses.device)
    try:
        for s in range(0, B, chunk):
            rows = eye[s:s + chunk]
            grads = torch.autograd.grad(losses, params, grad_outputs=rows, is_grads_batched=True,
                                        retain_graph=True, allow_unused=True)
            for g in grads:
                if g is not None:
                    out[s:s + rows.shape[0]] += g.float().reshape(rows.shape[0], -1).pow(2).sum(dim=1)
        return out
    except RuntimeError:
        out.zero_()
    for i in range(B):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        for g in grads:
            if g is not None:
                out[i] += g.float().pow(2).sum()
    return out
