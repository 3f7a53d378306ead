"""Per-sample directional derivatives grad L_s . v for a whole batch in one pass (no per-sample loop)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from engine.errors import ConfigError
from engine.influence.params import (
    LossFn,
    _batch_len,
    _check_losses,
    _eval_mode,
    _LossModule,
    trainable_params,
    unflatten,
)

def split_direction(model: nn.Module, v: Any) -> dict[str, Tensor]:
    """A flat direction v as one contiguous tensor per trainable parameter (parameters' dtype).

    Pass the result as ``v`` of :func:`directional_derivatives` when the same v scores many
    batches (the actors do): a tangent that is a view into a flat v does not match its
    parameter's storage, and forward AD then zero-fills and copies a parameter-sized buffer on
    every call (measured: 20 ms per call for a 250k-item embedding, half of the whole pass).
    """
    params = trainable_params(model)
    dtype = next(iter(params.values())).dtype
    if torch.is_tensor(v):
        vt = v
    else:  # a v from the object store is read-only: copy it rather than alias it (and warn)
        a = np.asarray(v)
        vt = torch.from_numpy(a) if a.flags.writeable else torch.tensor(a)
    return {k: t.clone() for k, t in unflatten(vt.to(dtype), params).items()}


class DirectionalDerivatives:
    """grad L_s . v for every sample s of a batch, for one fixed (model, loss_fn, v).

    Build once, call once per batch (the influence actors hold one): v is split into
    per-parameter tangents once, and with ``compile=True`` the forward-mode pass is compiled
    by ``torch.compile`` once per batch shape. Feed it few shapes: :func:`score_surrogate_batch`
    pads every micro-batch to ``batch_size`` rows and a power-of-two length (at most 4-5 graphs
    for max_len 50). Dynamic shapes do not help here: under forward AD a tensor-times-scalar
    (SASRec's embedding scale) makes dynamo specialise batch size and length anyway (torch 2.13).

    Args:
        model, loss_fn: as in :func:`mean_gradient`.
        v: flat direction (e.g. the iHVP solution), or its :func:`split_direction`.
        method: "jvp" (forward-mode ``torch.func.jvp`` over ``functional_call``: one forward
            with tangents; exact to float rounding) or "fd" (central finite difference
            (L(theta + h v) - L(theta - h v)) / 2h, two plain forwards, h = eps * max(1, ||theta||) / ||v||).
        eps: relative step of "fd". In float32 the error is float rounding amplified by 1/h for
            small steps and curvature for large ones; on the Games SASRec (1.16M parameters,
            both losses) the max error relative to a float64 JVP was 2e-4 at 3e-3..1e-2, 5e-4
            to 2e-3 at 1e-3, 8e-3 to 2e-2 at 1e-4, 2e-2 at 0.1 (benchmarks/influence.py prints it).
        compile: compile the "jvp" pass with ``torch.compile`` (inductor; needs a C++ compiler on
            CPU). Same values to float rounding; on the Games SASRec (micro-batches of 64) the pass
            is 2.3-2.7x faster, after a one-off compile of ~60 s per process (~11 s with inductor's
            on-disk cache warm). Worth it from a few hundred thousand samples per actor.

    Raises:
        ConfigError: unknown method, compile with "fd", or a split v whose names are not the
            trainable parameters.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, v: Tensor | Mapping[str, Tensor], *,
                 method: str = "jvp", eps: float = 5e-3, compile: bool = False):
        problems = []
        if method not in ("jvp", "fd"):
            problems.append(f"method={method!r}: expected 'jvp' or 'fd'")
        if compile and method != "jvp":
            problems.append(f"compile=True needs method='jvp' (got {method!r}): 'fd' is two plain forwards")
        if not (eps > 0 and math.isfinite(eps)):
            problems.append(f"eps={eps!r}: must be a finite number > 0")
        if problems:
            raise ConfigError(problems, config="directional_derivatives")
        self.model, self.loss_fn, self.method, self.eps, self.compiled = model, loss_fn, method, float(eps), bool(compile)
        self.params = trainable_params(model)
        if isinstance(v, Mapping):
            if set(v) != set(self.params):
                raise ConfigError([f"v has tensors for {sorted(set(v) ^ set(self.params))[:5]} that are not (or not "
                                   "all) the trainable parameters; build it with split_direction(model, v)"],
                                  config="directional_derivatives")
            self.v = dict(v)
        else:
            self.v = split_direction(model, v)
        self.dtype = next(iter(self.v.values())).dtype
        if method == "jvp":
            wrapper = _LossModule(model, loss_fn)

            def pass_(prim: dict[str, Tensor], tang: dict[str, Tensor], batch: Any) -> Tensor:
                return jvp(lambda p: functional_call(wrapper, p, (batch,)), (prim,), (tang,))[1]

            self._prim = {"model." + k: p.detach() for k, p in self.params.items()}
            self._tang = {"model." + k: self.v[k] for k in self.params}
            self._jvp = torch.compile(pass_, dynamic=False, fullgraph=True) if compile else pass_

    def __call__(self, batch: Any) -> Tensor:
        """Tensor [B] (detached), in batch order."""
        with _eval_mode(self.model), torch.no_grad():
            if self.method == "fd":
                return self._fd(batch)
            if not self.compiled:
                return _check_losses(self._jvp(self._prim, self._tang, batch)).detach()
            # one graph per batch shape; every instance shares pass_'s code object, whose default
            # limit of 8 graphs would silently fall back to eager
            with torch._dynamo.config.patch(recompile_limit=64):
                try:
                    return _check_losses(self._jvp(self._prim, self._tang, batch)).detach()
                except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as e:
                    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ConfigError([
                        f"compile=True: the loss does not compile as one graph ({first}); use compile=False "
                        "(e.g. a full-softmax surrogate loss indexes by data-dependent shapes: use loss='sampled' "
                        "to compile)"], config="directional_derivatives") from e

    def _fd(self, batch: Any) -> Tensor:
        params, vs = self.params, self.v
        vn = math.hypot(*(float(torch.linalg.vector_norm(t)) for t in vs.values()))
        if vn == 0:
            return torch.zeros(_batch_len(batch), dtype=self.dtype)
        theta_norm = math.hypot(*(float(torch.linalg.vector_norm(p.detach())) for p in params.values()))
        h = self.eps * max(1.0, theta_norm) / vn
        backup = {k: p.detach().clone() for k, p in params.items()}
        try:
            for k, p in params.items():
                p.add_(vs[k], alpha=h)
            lp = self.loss_fn(self.model, batch).double()
            for k, p in params.items():
                p.add_(vs[k], alpha=-2 * h)
            lm = self.loss_fn(self.model, batch).double()
        finally:
            for k, p in params.items():
                p.copy_(backup[k])
        return ((lp - lm) / (2 * h)).to(self.dtype)


def directional_derivatives(model: nn.Module, loss_fn: LossFn, batch: Any, v: Tensor | Mapping[str, Tensor], *,
                            method: str = "jvp", eps: float = 5e-3) -> Tensor:
    """grad L_s . v for every sample s of the batch, in one pass (no per-sample loop).

    One call of :class:`DirectionalDerivatives` (see it for ``method`` and ``eps``; build that
    once instead when the same v scores many batches, or to compile the pass).

    Returns:
        Tensor [B] (detached), in batch order.
    """
    return DirectionalDerivatives(model, loss_fn, v, method=method, eps=eps)(batch)
