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

Other module types (:class:`_ExtraParams`; all parameters of a fully fine-tuned model, e.g. TIGER's
T5): instead of the fallback, parameters owned by these get exact per-sample gradients from the
same single backward (output gradients of their modules, as for Linear layers):

  * ``nn.Embedding`` (its own forward, no ``max_norm`` / ``scale_grad_by_freq``): sample i's
    gradient is the sum of its output gradients per distinct index; the squared norm is taken
    over (sample, index) groups (``torch.unique`` + ``index_add``), cost B*T*d, nothing of size
    V*d per sample. ``padding_idx`` positions get no gradient, as in torch.
  * normalisation layers (``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm`` and any module class
    named ``*LayerNorm`` / ``*RMSNorm``, e.g. transformers' ``T5LayerNorm``): per-sample
    vector-Jacobian products of the module's OWN forward (``torch.func.vmap`` over
    ``torch.func.vjp`` of ``functional_call``), so the formula (RMS or mean/variance, ``w`` or
    ``1 + w``) is the module's, not re-derived here; exact for any norm whose row i depends only
    on input row i.
  * T5-style relative-position biases (an ``nn.Embedding`` named ``relative_attention_bias`` on a
    module with ``compute_bias``, whose output ``[1, H, q, k]`` has no batch dim and is shared by
    every sample and layer): during the forward the module's ``compute_bias`` returns
    ``bias + probe`` with a zero ``probe`` of shape ``[B, H, q, k]``; the gradient w.r.t. the probe
    is each sample's gradient w.r.t. the bias (all layers that reuse it included), scattered to
    the buckets.
  * a weight shared by modules of different kinds (an embedding tied to the LM head) or used by
    several norm calls: the per-sample gradients of every use are materialised ([B, *shape]) and
    summed before the norm.

Nothing is silently lost: the same backward also returns the batch gradient of these parameters,
and the sum over samples of the per-sample gradients must match it (relative error <= 1e-3;
a use outside the hooked forwards would break it); a parameter that fails the check moves to the
fallback with a warning naming it. Models whose trainable parameters are all Linear (LoRA) run
exactly the code they ran before (no extra hooks, same backward).

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

__all__ = ["per_sample_grad_norms", "per_sample_grad_norms_loop", "per_sample_grad_dots", "per_sample_grad_dots_loop"]


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


# ------------------------------------------------------------ non-Linear parameter types
def _is_norm(mod: nn.Module) -> bool:
    return (isinstance(mod, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm))
            or type(mod).__name__.endswith(("LayerNorm", "RMSNorm")))


def _is_plain_embedding(mod: nn.Module) -> bool:
    return (type(mod).forward is nn.Embedding.forward and mod.max_norm is None
            and not mod.scale_grad_by_freq)


_COVERAGE_RTOL = 1e-3


class _ExtraParams:
    """Per-sample gradient norms of trainable parameters owned by embeddings, norms and T5
    relative-position biases (and of Linear weights tied to them), from the output gradients of
    the one backward of :func:`per_sample_grad_norms` (see the module docstring)."""

    def __init__(self, model: nn.Module, trainable: dict, fallback: set):
        self.trainable = trainable
        relbias: dict[int, nn.Module] = {}  # id(embedding) -> its compute_bias owner
        for mod in model.modules():
            emb = getattr(mod, "relative_attention_bias", None)
            if isinstance(emb, nn.Embedding) and callable(getattr(mod, "compute_bias", None)) \
                    and type(emb).forward is nn.Embedding.forward:
                relbias[id(emb)] = mod
        owners: dict[int, list[tuple[nn.Module, str, str]]] = {}
        unsupported: set[int] = set()
        for mod in model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                pid = id(p)
                if pid not in fallback:
                    continue
                if id(mod) in relbias and pname == "weight":
                    kind = "relbias"
                elif type(mod).forward is nn.Linear.forward and pname in ("weight", "bias"):
                    kind = "linear"
                elif isinstance(mod, nn.Embedding) and _is_plain_embedding(mod) and pname == "weight":
                    kind = "embedding"
                elif _is_norm(mod):
                    kind = "norm"
                else:
                    unsupported.add(pid)
                    continue
                owners.setdefault(pid, []).append((mod, pname, kind))
        self.params = {pid: own for pid, own in owners.items() if pid not in unsupported}
        fallback -= set(self.params)
        self.modules: dict[int, tuple[nn.Module, str]] = {}
        for own in self.params.values():
            for mod, _, kind in own:
                self.modules[id(mod)] = (mod, kind)
        self.relbias_owner = {mid: relbias[mid] for mid, (_, k) in self.modules.items() if k == "relbias"}
        self.records: dict[int, list[list]] = {mid: [] for mid in self.modules}
        self._patched: list[nn.Module] = []
        self._grads_in: list[torch.Tensor] = []

    # -- forward
    def install(self) -> list:
        handles = []
        for mid, (mod, kind) in self.modules.items():
            if kind == "relbias":
                handles.append(mod.register_forward_hook(self._relbias_index_hook(mid)))
                owner = self.relbias_owner[mid]
                handles.append(owner.register_forward_pre_hook(self._batch_size_hook(owner), with_kwargs=True))
                self._patch_compute_bias(owner, mid)
            else:
                handles.append(mod.register_forward_hook(self._hook(mid)))
        return handles

    def uninstall(self) -> None:
        for owner in self._patched:
            owner.__dict__.pop("compute_bias", None)
            owner.__dict__.pop("_effort_batch", None)
        self._patched = []

    def _hook(self, mid):
        def hook(mod, inputs, output):
            if torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad and inputs:
                self.records[mid].append([inputs[0].detach(), output])
        return hook

    def _relbias_index_hook(self, mid):
        def hook(mod, inputs, output):
            self._last_index = inputs[0].detach()
        return hook

    @staticmethod
    def _batch_size_hook(owner):
        def pre(mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            owner.__dict__["_effort_batch"] = int(h.shape[0]) if torch.is_tensor(h) and h.dim() >= 2 else None
        return pre

    def _patch_compute_bias(self, owner: nn.Module, mid: int) -> None:
        orig = owner.compute_bias  # the bound method of its class
        records = self.records[mid]

        def compute_bias(*args, **kwargs):
            self._last_index = None
            values = orig(*args, **kwargs)
            b = owner.__dict__.get("_effort_batch")
            if not (torch.is_grad_enabled() and values.requires_grad and b and self._last_index is not None
                    and values.dim() == 4 and values.shape[0] == 1):
                return values
            probe = torch.zeros((b,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device,
                                requires_grad=True)
            records.append([self._last_index, probe])
            return values + probe

        owner.__dict__["compute_bias"] = compute_bias
        self._patched.append(owner)

    def drop_unbatched(self, B: int) -> set:
        """Parameters whose module inputs lack the batch in dim 0 (they go to the fallback)."""
        bad = set()
        for mid, (mod, kind) in self.modules.items():
            for a, out in self.records[mid]:
                if kind == "relbias":
                    ok = out.shape[0] == B
                else:
                    ok = a.dim() >= 1 and a.shape[0] == B and out.dim() >= 1 and out.shape[0] == B
                if not ok:
                    bad.add(mid)
        out = {pid for pid, own in self.params.items() if any(id(m) in bad for m, _, _ in own)}
        for pid in out:
            del self.params[pid]
        return out

    # -- backward
    def grad_inputs(self) -> list[torch.Tensor]:
        """Module outputs (and probes) to differentiate, then the parameters (batch gradient check)."""
        if not self.params:
            return []
        used = {id(m) for own in self.params.values() for m, _, _ in own}
        self._outs = [(mid, k) for mid in self.modules if mid in used for k in range(len(self.records[mid]))]
        self._pids = list(self.params)
        return [self.records[mid][k][1] for mid, k in self._outs] + [self.trainable[pid][1] for pid in self._pids]

    def set_grads(self, grads) -> None:
        n = len(self._outs)
        for (mid, k), g in zip(self._outs, grads[:n]):
            rec = self.records[mid][k]
            rec[1] = (torch.zeros_like(rec[1]) if g is None else g.detach(), rec[1])  # (grad, output)
        self._batch_grads = {pid: g for pid, g in zip(self._pids, grads[n:])}
        self._norm_cache: dict = {}

    def _dense(self, pid: int, B: int) -> torch.Tensor:
        """Per-sample gradient [B, *shape] of one parameter, summed over all its uses."""
        p = self.trainable[pid][1]
        G = torch.zeros((B,) + tuple(p.shape), dtype=torch.float32, device=p.device)
        for mod, pname, kind in self.params[pid]:
            for a, (g, out) in self.records[id(mod)]:
                if kind == "linear":
                    a3, g3 = _flat3(a), _flat3(g)
                    G += torch.einsum("bto,bti->boi", g3, a3) if pname == "weight" else g3.sum(dim=1)
                elif kind == "embedding":
                    idx, gg = self._embedding_rows(mod, a, g)
                    V = p.shape[0]
                    key = (torch.arange(B, device=idx.device)[:, None] * V + idx).reshape(-1)
                    G.view(B * V, -1).index_add_(0, key, gg.reshape(key.numel(), -1))
                elif kind == "relbias":
                    Gp = g.float().permute(0, 2, 3, 1).reshape(B, -1, g.shape[1])  # [B, q*k, H]
                    G.index_add_(1, a.reshape(-1).to(G.device), Gp)
                else:  # norm
                    key = (id(mod), id(g))
                    if key not in self._norm_cache:
                        self._norm_cache[key] = self._norm_grads(mod, a, g)
                    G += self._norm_cache[key][pname]
        return G

    @staticmethod
    def _embedding_rows(mod, idx, g):
        B = idx.shape[0]
        idx = idx.reshape(B, -1).long()
        gg = g.float().reshape(B, idx.shape[1], -1)
        if mod.padding_idx is not None:
            gg = gg * (idx != mod.padding_idx).unsqueeze(-1)
        return idx, gg

    @staticmethod
    def _norm_grads(mod, x, g) -> dict:
        from torch.func import functional_call, vjp, vmap

        names = [n for n, q in mod.named_parameters(recurse=False) if q.requires_grad]
        params = {n: getattr(mod, n).detach() for n in names}

        def one(x1, g1):
            _, pull = vjp(lambda pd: functional_call(mod, pd, (x1.unsqueeze(0),)), params)
            return pull(g1.unsqueeze(0).to(x1.dtype))[0]

        out = vmap(one)(x, g)
        return {n: v.float() for n, v in out.items()}

    def sq_norms(self, B: int) -> tuple[torch.Tensor, set]:
        """(per-sample squared norms over these parameters, ids that failed the coverage check)."""
        sq, failed = None, set()
        for pid, own in self.params.items():
            p = self.trainable[pid][1]
            if all(kind == "embedding" for _, _, kind in own):  # no [B, V, d]: group by (sample, index)
                keys, rows = [], []
                V = p.shape[0]
                for mod, _, _ in own:
                    for a, (g, out) in self.records[id(mod)]:
                        idx, gg = self._embedding_rows(mod, a, g)
                        keys.append((torch.arange(B, device=idx.device)[:, None] * V + idx).reshape(-1))
                        rows.append(gg.reshape(-1, gg.shape[-1]))
                if keys:
                    key, row = torch.cat(keys), torch.cat(rows)
                    uniq, inv = torch.unique(key, return_inverse=True)
                    S = torch.zeros(len(uniq), row.shape[1], dtype=torch.float32, device=row.device).index_add_(0, inv, row)
                    s_p = torch.zeros(B, dtype=torch.float32, device=row.device).index_add_(0, uniq // V, S.pow(2).sum(1))
                    total = torch.zeros(V, row.shape[1], dtype=torch.float32, device=row.device).index_add_(0, uniq % V, S)
                else:
                    s_p = torch.zeros(B, dtype=torch.float32, device=p.device)
                    total = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            else:
                G = self._dense(pid, B)
                s_p = G.reshape(B, -1).pow(2).sum(dim=1)
                total = G.sum(dim=0)
            ref = self._batch_grads.get(pid)
            ref = torch.zeros_like(total) if ref is None else ref.float().reshape(total.shape)
            err = (total - ref).norm()
            if err > _COVERAGE_RTOL * ref.norm() + 1e-8 * max(1.0, float(total.norm())):
                failed.add(pid)
                continue
            sq = s_p if sq is None else sq + s_p
        self._norm_cache = {}
        if sq is None:
            sq = torch.zeros(B, dtype=torch.float32, device=next(iter(self.trainable.values()))[1].device)
        return sq, failed


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
