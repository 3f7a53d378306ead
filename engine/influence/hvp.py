"""The mean gradient g_bar and Hessian-vector products of R = (1/n) sum_i L_i (exact or Gauss-Newton)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from engine.errors import ConfigError
from engine.influence.params import (
    LossFn,
    _check_losses,
    _eval_mode,
    flatten_params,
    trainable_params,
    unflatten,
)

def mean_gradient(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any]) -> tuple[Tensor, int]:
    """g_bar = (1/n) sum_i grad L_i, accumulated batch by batch (eval mode).

    The ``nn.Embedding`` modules of the model hand back row-sparse gradients during the pass
    (:func:`_sparse_embeddings`), added into the accumulator by row: a batch touches a few
    thousand rows of a 250k-item table, and a dense gradient per batch (zero-fill, scatter,
    add, flatten: four passes over the whole table) made the pass memory-bound at large
    catalogues. The result is the same sum.

    Args:
        model: the trained model.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]``.
        batches: re-iterable batches covering the n training samples once.

    Returns:
        (flat g_bar in the parameters' dtype, n).

    Raises:
        ValueError: no samples.
    """
    params = trainable_params(model)
    plist = list(params.values())
    acc = torch.zeros(sum(p.numel() for p in plist), dtype=plist[0].dtype)
    views = list(unflatten(acc, params).values())
    n = 0
    with _eval_mode(model), _sparse_embeddings(model):
        for b in batches:
            losses = _check_losses(loss_fn(model, b))
            gs = torch.autograd.grad(losses.sum(), plist, allow_unused=True)
            for g, view in zip(gs, views):
                if g is None:
                    continue
                if g.is_sparse:  # rows of an embedding table (duplicates are summed by index_add_)
                    view.index_add_(0, g._indices()[0], g._values())
                else:
                    view.add_(g)
            n += losses.shape[0]
    if n == 0:
        raise ValueError("no samples in batches")
    return acc / n, n


@contextlib.contextmanager
def _sparse_embeddings(model: nn.Module) -> Iterator[None]:
    """Inside the block, the model's trainable ``nn.Embedding`` modules (without ``max_norm``)
    return sparse gradients; their ``sparse`` flags are restored afterwards. Only for
    first-order passes: double backward through a sparse embedding is not supported."""
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding) and not m.sparse
            and m.max_norm is None and m.weight.requires_grad]
    for m in embs:
        m.sparse = True
    try:
        yield
    finally:
        for m in embs:
            m.sparse = False


def _hvp_sum(model: nn.Module, loss_fn: LossFn, batch: Any, v: Tensor, params: dict[str, Tensor],
             gauss_newton: bool) -> tuple[Tensor, int]:
    """Sum over the batch's samples of (Hessian or GGN of L_i) @ v, and the batch size."""
    plist = list(params.values())
    if not gauss_newton:
        losses = _check_losses(loss_fn(model, batch))
        gs = torch.autograd.grad(losses.sum(), plist, create_graph=True, allow_unused=True)
        vs = unflatten(v, params)
        dot = sum((g * vv).sum() for g, vv in zip(gs, vs.values()) if g is not None)
        if not torch.is_tensor(dot) or not dot.requires_grad:
            return torch.zeros_like(v), losses.shape[0]
        hv = torch.autograd.grad(dot, plist, allow_unused=True)
        return flatten_params([h if h is not None else torch.zeros_like(p) for h, p in zip(hv, plist)]), losses.shape[0]
    split = getattr(loss_fn, "split", None)
    if split is None:
        raise ConfigError(["gauss_newton=True needs a loss_fn with a `split` attribute: "
                           "(outputs_fn(model, batch) -> z, loss_on_outputs(z, batch) -> Tensor[B])"],
                          config="cg solver")
    outputs_fn, loss_on_outputs = split
    wrapper = _OutputsModule(model, outputs_fn)
    names = {"model." + k: p for k, p in params.items()}
    tangents = {"model." + k: t for k, t in unflatten(v, params).items()}
    with torch.no_grad():
        z, jz = jvp(lambda p: functional_call(wrapper, p, (batch,)), (names,), (tangents,))
    zr = z.detach().requires_grad_(True)
    losses = _check_losses(loss_on_outputs(zr, batch))
    (gz,) = torch.autograd.grad(losses.sum(), zr, create_graph=True)
    (hz,) = torch.autograd.grad((gz * jz).sum(), zr)
    out = outputs_fn(model, batch)
    gv = torch.autograd.grad(out, plist, grad_outputs=hz, allow_unused=True)
    return flatten_params([g if g is not None else torch.zeros_like(p) for g, p in zip(gv, plist)]), losses.shape[0]


class _OutputsModule(nn.Module):
    def __init__(self, model: nn.Module, outputs_fn: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.model = model
        self.outputs_fn = outputs_fn

    def forward(self, batch: Any) -> Tensor:
        return self.outputs_fn(self.model, batch)


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], v: Tensor, *,
                           n: int | None = None, damping: float = 0.0, gauss_newton: bool = False) -> Tensor:
    """(H + damping I) v with H the Hessian (or Gauss-Newton matrix) of the mean loss over ``batches``.

    Args:
        model, loss_fn, batches: as in :func:`mean_gradient`.
        v: flat vector.
        n: number of samples in ``batches`` (counted when None).
        damping: added multiple of v.
        gauss_newton: use the generalised Gauss-Newton matrix (PSD; needs ``loss_fn.split``).

    Returns:
        flat vector like v.
    """
    params = trainable_params(model)
    acc = torch.zeros_like(v)
    count = 0
    with _eval_mode(model):
        for b in batches:
            hv, bs = _hvp_sum(model, loss_fn, b, v, params, gauss_newton)
            acc += hv
            count += bs
    n = count if n is None else n
    return acc / n + damping * v
