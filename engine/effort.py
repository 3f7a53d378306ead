"""Effort score (DEALRec eq. 12): the L2 norm of each sample's loss gradient w.r.t. the LLM's
trainable (LoRA) parameters, at the pretrained model, computed for a whole batch in one pass.

Method (exact, no per-sample loop):
  * forward hooks on every ``nn.Linear`` whose weight/bias is trainable record the layer input
    ``a`` [B, T, d_in] and output ``z`` (LoRA's ``lora_A``/``lora_B`` are such Linears);
  * ONE backward of the SUM of the per-sample losses gives ``g = dL/dz`` [B, T, d_out]; since
    sample i's loss depends only on row i, ``g[i]`` is sample i's own output gradient;
  * per-sample weight gradient ``G_i = sum_t g[i,t] a[i,t]^T``; its squared norm is taken either
    materialised (``einsum('bto,bti->boi')``, cost B*T*d_in*d_out) or as a ghost norm
    (``sum_{t,s} (a_t.a_s)(g_t.g_s)``, cost B*T^2*(d_in+d_out)), whichever is cheaper for that
    layer; LoRA layers (d_out or d_in = r) always materialise. Bias: ``sum_t g[i,t]``.
  * the backward asks autograd for output gradients only (``torch.autograd.grad`` w.r.t. the
    recorded outputs), so no weight gradients are formed and ``.grad`` is never touched.

Fallback: trainable parameters that are not the weight/bias of an ``nn.Linear`` used through
its own forward (an embedding or norm made trainable, a weight tied to an embedding, peft's
LoRA-embedding matrices) get exact per-sample gradients from the same forward graph with
``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward), or a per-sample
backward restricted to them when vmap cannot run; a warning names them.

Assumptions: dim 0 of every hooked Linear input is the batch (true for HF models; a layer that
breaks it is moved to the fallback); no activation checkpointing (recomputed forwards would
fire hooks twice). The model is put in eval mode while scoring (restored after), so LoRA
dropout is OFF and scores are deterministic and batch-independent.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["per_sample_grad_norms", "per_sample_grad_norms_loop"]


@contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


def _split_params(model: nn.Module):
    """(hooked Linear modules, {param: [(module, kind)]}, fallback named params)."""
    trainable = {id(p): (n, p) for n, p in model.named_parameters() if p.requires_grad}
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    non_linear: set[int] = set()
    for mod in model.modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in trainable:
                continue
            if type(mod).forward is nn.Linear.forward and pname in ("weight", "bias"):
                owners.setdefault(id(p), []).append((mod, pname))
            else:
                non_linear.add(id(p))
    fallback = {pid for pid in trainable if pid in non_linear or pid not in owners}
    linear_params = {pid: owners[pid] for pid in owners if pid not in fallback}
    modules: dict[int, nn.Module] = {}
    for lst in linear_params.values():
        for mod, _ in lst:
            modules[id(mod)] = mod
    return trainable, list(modules.values()), linear_params, fallback


def _sq_norm_weight(calls, B: int) -> torch.Tensor:
    """Per-sample squared Frobenius norm of sum over calls of g^T a (each call: (a, g))."""
    if len(calls) == 1:
        a, g = calls[0]
        T, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
        if T * (d_in + d_out) < d_in * d_out:  # ghost norm is cheaper
            aa = torch.bmm(a, a.transpose(1, 2))
            gg = torch.bmm(g, g.transpose(1, 2))
            return (aa * gg).sum(dim=(1, 2))
    G = None
    for a, g in calls:
        Gc = torch.einsum("bto,bti->boi", g, a)
        G = Gc if G is None else G + Gc
    return G.pow(2).sum(dim=(1, 2))


def _flat3(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() != 2 else x.unsqueeze(1)


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


def per_sample_grad_norms(model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor], batch: dict) -> torch.Tensor:
    """Exact L2 norm of each sample's loss gradient w.r.t. all trainable parameters, in one pass.

    Args:
        model: any ``nn.Module`` (e.g. a peft-wrapped HF causal LM); the parameters with
            ``requires_grad`` define the gradient. Put in eval mode during the call (LoRA dropout
            off), its previous modes restored after.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` of per-sample losses, where sample i's loss
            depends only on row i of the batch (e.g. :func:`engine.llm.bigrec.prompts.per_sample_causal_lm_loss`).
        batch: whatever ``loss_fn`` takes (a dict of tensors with the batch in dim 0).

    Returns:
        float32 Tensor [B] (detached, on the losses' device): ``||grad_theta loss_i||_2``.

    Raises:
        ValueError: the model has no trainable parameter or ``loss_fn`` does not return shape [B].

    Warns:
        UserWarning naming parameters handled by the (slower) fallback path.
    """
    trainable, modules, linear_params, fallback = _split_params(model)
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True; nothing to take a gradient of")

    records: dict[int, list[list]] = {id(m): [] for m in modules}  # per module: [input, output]

    def fwd_hook(mod, inputs, output):
        if torch.is_grad_enabled() and output.requires_grad:
            records[id(mod)].append([inputs[0].detach(), output])

    handles = [m.register_forward_hook(fwd_hook) for m in modules]
    try:
        with _eval_mode(model), torch.enable_grad():
            losses = loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-sample losses of shape [B], got {tuple(losses.shape)}")
    B = losses.shape[0]

    # A hooked layer whose input does not carry the batch in dim 0 cannot be split per sample.
    bad_mods = {mid for mid, calls in records.items() if any(c[0].dim() < 2 or c[0].shape[0] != B for c in calls)}
    for pid, owners in list(linear_params.items()):
        if any(id(m) in bad_mods for m, _ in owners):
            fallback.add(pid)
            del linear_params[pid]

    sq = torch.zeros(B, dtype=torch.float32, device=losses.device)
    if fallback:
        names = sorted(trainable[pid][0] for pid in fallback)
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        warnings.warn(
            f"per_sample_grad_norms: {len(names)} trainable parameter(s) are not nn.Linear weights/biases "
            f"and use the slower fallback (batched vmap backward or a per-sample loop): {shown}",
            stacklevel=2,
        )
        sq += _fallback_sq_norms(losses, [trainable[pid][1] for pid in sorted(fallback, key=lambda p: trainable[p][0])])

    used_mods = {id(m) for owners in linear_params.values() for m, _ in owners}
    outs, keys = [], []
    for mid, calls in records.items():
        if mid not in used_mods:
            continue
        for k, c in enumerate(calls):
            outs.append(c[1])
            keys.append((mid, k))
    if outs:
        grads = torch.autograd.grad(losses.sum(), outs, allow_unused=True)
        for (mid, k), g in zip(keys, grads):
            rec = records[mid][k]
            rec[1] = torch.zeros_like(rec[1]) if g is None else g.detach()
        for pid, owners in linear_params.items():
            calls = []
            for mod, kind in owners:
                for a, g in records[id(mod)]:
                    if kind == "weight":
                        calls.append((_flat3(a), _flat3(g)))
                    else:
                        calls.append((None, _flat3(g)))
            if not calls:
                continue
            if owners[0][1] == "weight":
                sq += _sq_norm_weight(calls, B)
            else:
                gb = sum(g.sum(dim=1) for _, g in calls)
                sq += gb.pow(2).sum(dim=1)
    return sq.sqrt().detach()


def per_sample_grad_norms_loop(model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                               batch: dict) -> torch.Tensor:
    """Reference: one forward + backward per sample (slow; for tests and benchmarks).

    Args:
        model, loss_fn, batch: as :func:`per_sample_grad_norms`; every tensor of ``batch`` is
            sliced to one row per step.

    Returns:
        float32 Tensor [B] of gradient norms.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    B = next(v.shape[0] for v in batch.values() if torch.is_tensor(v))
    out = torch.zeros(B, dtype=torch.float32)
    with _eval_mode(model), torch.enable_grad():
        for i in range(B):
            one = {k: (v[i:i + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
            loss = loss_fn(model, one)[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            out[i] = torch.sqrt(sum(g.float().pow(2).sum() for g in grads if g is not None).cpu())
    return out
