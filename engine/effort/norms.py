"""Per-sample gradient norms in one pass (:func:`per_sample_grad_norms`, the effort score; the
method is in :mod:`engine.effort`) and their per-sample-loop reference."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from engine.effort.fallback import _fallback_sq_norms
from engine.effort.hooks import _eval_mode, _ExtraParams, _flat3, _split_params, _sq_norm_weight

__all__ = ["per_sample_grad_norms", "per_sample_grad_norms_loop"]


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
    extra = _ExtraParams(model, trainable, fallback)  # takes its parameters out of ``fallback``
    try:
        with _eval_mode(model), torch.enable_grad():
            handles += extra.install()
            losses = loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
        extra.uninstall()
    if losses.dim() != 1:
        raise ValueError(f"loss_fn must return per-sample losses of shape [B], got {tuple(losses.shape)}")
    B = losses.shape[0]

    # A hooked layer whose input does not carry the batch in dim 0 cannot be split per sample.
    bad_mods = {mid for mid, calls in records.items() if any(c[0].dim() < 2 or c[0].shape[0] != B for c in calls)}
    for pid, owners in list(linear_params.items()):
        if any(id(m) in bad_mods for m, _ in owners):
            fallback.add(pid)
            del linear_params[pid]
    fallback |= extra.drop_unbatched(B)

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
    extra_inputs = extra.grad_inputs()
    if extra_inputs:  # one backward for both; the graph is kept for a failed coverage check
        all_grads = torch.autograd.grad(losses.sum(), outs + extra_inputs, allow_unused=True, retain_graph=True)
        extra.set_grads(all_grads[len(outs):])
        all_grads = all_grads[:len(outs)]
    if outs:
        grads = all_grads if extra_inputs else torch.autograd.grad(losses.sum(), outs, allow_unused=True)
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
    if extra_inputs:
        extra_sq, failed = extra.sq_norms(B)
        sq += extra_sq
        if failed:
            names = sorted(trainable[pid][0] for pid in failed)
            warnings.warn(
                f"per_sample_grad_norms: the per-sample gradients of {len(names)} parameter(s) do not add up to "
                f"their batch gradient (a use outside the hooked module forward?); using the slower fallback "
                f"for: {', '.join(names)}", stacklevel=2)
            sq += _fallback_sq_norms(losses, [trainable[pid][1] for pid in sorted(failed, key=lambda p: trainable[p][0])])
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
