"""The per-module-type machinery of :func:`engine.effort.per_sample_grad_norms`: which trainable
parameters the one-backward path hooks, and their per-sample squared gradient norms.

``nn.Linear`` (:func:`_split_params`, :func:`_sq_norm_weight`): trainable weights/biases of a
Linear used through its own forward; see :mod:`engine.effort` for the method.

Other module types (:class:`_ExtraParams`; all parameters of a fully fine-tuned model, e.g. TIGER's
T5): instead of the fallback (:mod:`engine.effort.fallback`), parameters owned by these get exact
per-sample gradients from the same single backward (output gradients of their modules, as for
Linear layers):

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
and the sum over samples of the per-sample gradients must match it (relative error <= 1e-3,
``_COVERAGE_RTOL``; a use outside the hooked forwards would break it); a parameter that fails the
check moves to the fallback with a warning naming it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


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
