"""The parameters influence is taken over (every ``requires_grad`` one, flat <-> named) and the
conventions every stage shares: eval mode, per-sample losses of shape [B], sample dimension first."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn


LossFn = Callable[[nn.Module, Any], Tensor]


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """The parameters influence is taken over: ``{name: p}`` for every p with requires_grad."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def flatten_params(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (a name->tensor mapping in its order, or a sequence) into one flat vector."""
    ts = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0)


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into tensors shaped like ``like`` (same names, same order).

    Raises:
        ValueError: the vector length does not match the total size of ``like``.
    """
    total = sum(t.numel() for t in like.values())
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters have {total}")
    out, i = {}, 0
    for k, t in like.items():
        out[k] = flat[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class _LossModule(nn.Module):
    """Wraps (model, loss_fn) so that ``functional_call`` can substitute parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _check_losses(losses: Tensor) -> Tensor:
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-sample losses of shape [B], got shape {tuple(losses.shape)}")
    return losses


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for v in batch.values():
            if torch.is_tensor(v) and v.dim() >= 1:
                return int(v.shape[0])
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    raise ValueError("cannot tell the batch size: a batch must be a dict holding tensors with the sample dimension first")
