"""LLM-side influence (issue #20; docs/method.md#llm-side-influence): no surrogate, no inverse Hessian.

At the pretrained model that effort is taken at (LoRA fresh, eval mode: dropout off), with phi the
trainable parameters ``[p for p in model.parameters() if p.requires_grad]`` (LoRA A and B; every
parameter of a fully fine-tuned backend such as TIGER)::

    u                 = (1/U) sum_u (1/|T_u|) sum_{t in T_u} grad_phi L_LLM(x_u -> t)
    llm_influence(s)  = grad_phi L_LLM(s) . u

L_LLM is the backend's own batch-independent per-sample loss (``backend.per_sample_loss`` over
``backend.encode_samples``, the loss effort differentiates), x_u a validation user's history
before the period (their whole training sequence) and T_u their items in the period
(:func:`engine.influence.target.read_target_rows`). u is one vector, computed once
(:func:`valid_gradient`) and broadcast; each sample then costs one
:func:`engine.effort.per_sample_grad_dots` over its micro-batch (:func:`llm_influence_scores`).
A positive score means that a gradient step on s lowers the validation loss to first order (s is
helpful), the sign of the surrogate's influence. This is gradient alignment (TracIn / LESS at one
checkpoint, without optimizer state); the constant 1/n of the surrogate's influence is left out
(the selection min-max normalises each term).

Validation pairs reach the backend as samples with ids ``id_offset + pair index``
(:func:`validation_pairs`): ids no training sample has, fixed by the file order, so a backend that
keys per-sample randomness on the id (textrec's fixed negatives) gives every pair its own fixed draw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.effort.hooks import _eval_mode

__all__ = ["llm_influence_scores", "trainable_parameters", "valid_gradient", "validation_pairs"]


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """``[p for p in model.parameters() if p.requires_grad]``: the order u is flat over."""
    return [p for p in model.parameters() if p.requires_grad]


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def validation_pairs(rows: Any, *, id_offset: int) -> dict[str, Any]:
    """One (history, target) pair per item of every validation user, with its weight in u.

    Args:
        rows: validation rows (``history``, ``targets``; a table or a dict of columns), every row
            with at least one target (:func:`engine.influence.target.read_target_rows`).
        id_offset: the first pair's sample id (pass the number of training samples n).

    Returns:
        ``sample_id`` int64 [P] (``id_offset + 0..P-1``), ``history`` (list of int64 arrays),
        ``target`` int64 [P], ``weight`` float64 [P] (1 / (U * |T_u|): the weights sum to 1) and
        ``n_users`` U.

    Raises:
        ValueError: no rows, or a row without targets.
    """
    cols = {c: rows.column(c).to_pylist() for c in ("history", "targets")} if hasattr(rows, "column") else rows
    hists, tgts = list(cols["history"]), list(cols["targets"])
    if not hists:
        raise ValueError("no validation rows")
    if any(len(t) == 0 for t in tgts):
        raise ValueError("a validation row has no target; pass the rows of read_target_rows")
    n_users = len(hists)
    ph, pt, pw = [], [], []
    for h, ts in zip(hists, tgts):
        h = np.asarray(h, dtype=np.int64)
        for t in ts:
            ph.append(h)
            pt.append(int(t))
            pw.append(1.0 / (n_users * len(ts)))
    p = len(pt)
    return {"sample_id": np.arange(int(id_offset), int(id_offset) + p, dtype=np.int64), "history": ph,
            "target": np.asarray(pt, dtype=np.int64), "weight": np.asarray(pw, dtype=np.float64), "n_users": n_users}


def _length_order(histories: Sequence[Sequence[int]]) -> np.ndarray:
    """Rows by history length (stable): micro-batches of similar length pad less (results unchanged)."""
    return np.argsort(np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories)), kind="stable")


def valid_gradient(backend: Any, model: nn.Module, pairs: dict[str, Any], *, micro_batch: int = 16) -> np.ndarray:
    """u = sum_p weight_p grad_phi L_LLM(pair p): the mean gradient of the validation loss.

    Args:
        backend: an :class:`engine.llm.protocol.LLMBackend` (``encode_samples``, ``per_sample_loss``).
        model: its model (``backend.build_model()``), put in eval mode for the call.
        pairs: :func:`validation_pairs`.
        micro_batch: pairs per forward/backward (u does not depend on it, up to float rounding).

    Returns:
        float64 [m], flat over :func:`trainable_parameters` in order.

    Raises:
        ValueError: ``micro_batch < 1``, or no trainable parameter.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    params = trainable_parameters(model)
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    sizes = [p.numel() for p in params]
    acc = torch.zeros(sum(sizes), dtype=torch.float64)
    dev = params[0].device
    ids, hists, tgts, w = pairs["sample_id"], pairs["history"], pairs["target"], pairs["weight"]
    order = _length_order(hists)
    with _eval_mode(model), torch.enable_grad():
        for s in range(0, len(order), micro_batch):
            idx = order[s:s + micro_batch]
            batch = _to(backend.encode_samples(ids[idx], [hists[i] for i in idx], tgts[idx]), dev)
            losses = backend.per_sample_loss(model, batch)
            wt = torch.as_tensor(w[idx], dtype=losses.dtype, device=losses.device)
            grads = torch.autograd.grad((wt * losses).sum(), params, allow_unused=True)
            k = 0
            for g, size in zip(grads, sizes):
                if g is not None:
                    acc[k:k + size] += g.detach().reshape(-1).double().cpu()
                k += size
    return acc.numpy()


def llm_influence_scores(backend: Any, model: nn.Module, sample_ids: Sequence[int],
                         histories: Sequence[Sequence[int]], targets: Sequence[int], u: Any, *,
                         micro_batch: int = 16) -> np.ndarray:
    """``grad_phi L_LLM(s) . u`` of every sample, in input order, one
    :func:`engine.effort.per_sample_grad_dots` per micro-batch (rows sorted by history length).

    Args:
        backend, model: as :func:`valid_gradient`.
        sample_ids, histories, targets: the samples (item ids, history oldest first).
        u: flat vector over :func:`trainable_parameters` (numpy or tensor; cast to the parameters'
            dtype and device once).
        micro_batch: samples per pass (scores do not depend on it, up to float rounding).

    Returns:
        float64 [n].

    Raises:
        ValueError: ``micro_batch < 1``, lengths that differ, or ``u`` of the wrong size.
    """
    from engine.effort import per_sample_grad_dots

    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    n = len(targets)
    if not (len(sample_ids) == len(histories) == n):
        raise ValueError(f"sample_ids ({len(sample_ids)}), histories ({len(histories)}) and targets ({n}) differ")
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    params = trainable_parameters(model)
    ut = u if torch.is_tensor(u) else torch.from_numpy(np.array(u, copy=True))
    ut = ut.to(device=params[0].device, dtype=params[0].dtype)
    ids, tgts = np.asarray(sample_ids, dtype=np.int64), np.asarray(targets, dtype=np.int64)
    order = _length_order(histories)
    # per_sample_grad_dots differentiates a gradient (double backward): the fused SDPA kernels
    # (flash / memory-efficient, CPU and CUDA) have no second derivative, the math kernel has
    with _double_backward_attention():
        for s in range(0, n, micro_batch):
            idx = order[s:s + micro_batch]
            batch = _to(backend.encode_samples(ids[idx], [histories[i] for i in idx], tgts[idx]), params[0].device)
            out[idx] = per_sample_grad_dots(model, backend.per_sample_loss, batch, ut).double().cpu().numpy()
    return out


@contextlib.contextmanager
def _double_backward_attention() -> Iterator[None]:
    """``scaled_dot_product_attention`` on its math kernel only (same values to float rounding):
    e.g. BERT's SDPA on CPU otherwise raises "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield
