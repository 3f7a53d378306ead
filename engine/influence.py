"""Influence scores on empirical risk (DEALRec eq. 9-11), solved once, applied in one pass.

Objective and sign convention (the one every function here refers to)::

    R(theta) = (1/n) sum_i L_i(theta)                 mean per-sample training loss
    J(theta) = R(theta) + (damping/2) ||theta||^2     the objective whose Hessian is used
    g_bar    = grad R(theta_hat),   H = hess R(theta_hat),   v = (H + damping I)^-1 g_bar
    influence(s) = (1/n) * grad L_s(theta_hat) . v

Removing sample s = dropping its (1/n) L_s term from J (penalty unchanged) and retraining;
first order: theta_{-s} - theta_hat ~= (1/n) (H + damping I)^-1 grad L_s, so the change of
R (still over all n samples) is ~= influence(s). Positive = removing s raises the training
loss (s is helpful). ``damping`` is exactly the weight-decay coefficient of the objective:
use the surrogate's ``weight_decay`` for a surrogate trained with coupled L2. At an exact
minimiser of an unregularised mean loss g_bar = 0 and every score is 0; with L2, g_bar =
-damping * theta_hat != 0.

Parameters are every ``requires_grad`` parameter of the model. The model runs in eval mode
(no dropout) for every quantity here; its previous mode is restored afterwards.

``loss_fn(model, batch) -> Tensor[B]`` returns per-sample losses that must not depend on
the other samples of the batch. Batches are dicts whose tensors carry the sample
dimension first (other values pass through unchanged when LiSSA slices mini-batches).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from engine.errors import ConfigError, SolverError

__all__ = [
    "DirectionalDerivatives",
    "InfluenceConfig",
    "SolveReport",
    "compute_ihvp_for_samples",
    "compute_ihvp_streaming",
    "hessian_rows",
    "score_surrogate_batch",
    "split_direction",
    "dense_hessian",
    "directional_derivatives",
    "flatten_params",
    "hessian_vector_product",
    "influence_scores",
    "mean_gradient",
    "solve_ihvp",
    "trainable_params",
    "unflatten",
]

LossFn = Callable[[nn.Module, Any], Tensor]
SOLVERS = ("cg", "lissa", "exact")


@dataclass
class SolveReport:
    """What an iHVP solve achieved.

    Attributes:
        solver: "cg", "lissa" or "exact".
        damping: the damping used (H + damping I).
        rel_residual: ||(H + damping I) v - g_bar|| / ||g_bar|| with H over the operator's samples.
        iterations: solver iterations (CG steps, LiSSA recursion steps x repeats, 1 for exact).
        hvps: Hessian-vector products evaluated (each over the operator's batches), incl. the check.
        seconds: wall time of the solve.
        converged: whether the solver's own stopping rule was met.
        extra: solver-specific numbers.
    """

    solver: str
    damping: float
    rel_residual: float
    iterations: int
    hvps: int
    seconds: float
    converged: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- parameters


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


# --------------------------------------------------------------------------- gradient / HVP


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


# --------------------------------------------------------------------------- solvers


def dense_hessian(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, n: int | None = None,
                  gauss_newton: bool = False) -> Tensor:
    """The dense Hessian (m x m, float64) of the mean loss over ``batches``, for small models.

    One vectorised double backward per batch (``is_grads_batched``); falls back to m
    Hessian-vector products when an op has no batching rule (and for Gauss-Newton).

    Args:
        model, loss_fn, batches: as in :func:`mean_gradient`.
        n: number of samples (counted when None).
        gauss_newton: dense Gauss-Newton matrix instead.

    Returns:
        symmetric float64 Tensor [m, m].
    """
    batches = list(batches)
    params = trainable_params(model)
    plist = list(params.values())
    m = sum(p.numel() for p in plist)
    dtype = plist[0].dtype
    eye = torch.eye(m, dtype=dtype)
    total = torch.zeros(m, m, dtype=torch.float64)
    count = 0
    with _eval_mode(model):
        for b in batches:
            done = False
            if not gauss_newton:
                losses = _check_losses(loss_fn(model, b))
                gs = torch.autograd.grad(losses.sum(), plist, create_graph=True, allow_unused=True)
                flat = flatten_params([g if g is not None else torch.zeros_like(p) for g, p in zip(gs, plist)])
                if flat.requires_grad:
                    try:
                        rows = torch.autograd.grad(flat, plist, grad_outputs=eye, is_grads_batched=True,
                                                   allow_unused=True)
                        total += torch.cat([(r if r is not None else torch.zeros(m, *p.shape, dtype=dtype))
                                            .reshape(m, -1) for r, p in zip(rows, plist)], 1).double()
                        done = True
                    except RuntimeError:
                        done = False
                else:
                    done = True
                count += losses.shape[0]
            if not done:
                cols = [_hvp_sum(model, loss_fn, b, eye[i], params, gauss_newton)[0] for i in range(m)]
                total += torch.stack(cols, 1).double()
                if gauss_newton:
                    count += _batch_len(b)
    h = total / (count if n is None else n)
    return 0.5 * (h + h.T)


def _solve_exact(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], g: Tensor, damping: float, n: int,
                 gauss_newton: bool, *, max_params: int = 20000, **unknown: Any) -> tuple[Tensor, dict[str, Any]]:
    _no_unknown("exact", unknown)
    m = g.numel()
    if m > max_params:
        raise SolverError(f"exact solver: {m} parameters > max_params={max_params}; a dense Hessian would be "
                          f"{m * m * 8 / 2**30:.1f} GiB. Use solver='cg' (or raise max_params for a small model)")
    h = dense_hessian(model, loss_fn, batches, n=n, gauss_newton=gauss_newton)
    h += damping * torch.eye(m, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(h)
    info = {"iterations": 1, "hvps": m, "converged": True, "min_eig": float(evals[0]), "max_eig": float(evals[-1])}
    tiny = 1e-12 * max(1.0, float(evals.abs().max()))
    if float(evals.abs().min()) <= tiny:
        raise SolverError(f"exact: H + damping I is singular (smallest |eigenvalue| {float(evals.abs().min()):.2e}; "
                          f"eigenvalues in [{info['min_eig']:.3e}, {info['max_eig']:.3e}]); raise damping "
                          f"(now {damping})")
    x = evecs @ ((evecs.T @ g.double()) / evals)
    return x.to(g.dtype), info


def _no_unknown(solver: str, unknown: Mapping[str, Any]) -> None:
    if unknown:
        raise ConfigError([f"unknown option {k!r} for solver={solver!r}" for k in unknown], config="iHVP solver")


def _solve_cg(op: Callable[[Tensor], Tensor], g: Tensor, damping: float, *, tol: float = 1e-6,
              max_iter: int = 200, log: Callable[[str], None] | None = None,
              **unknown: Any) -> tuple[Tensor, dict[str, Any]]:
    _no_unknown("cg", unknown)
    bad = []
    if not tol > 0:
        bad.append(f"tol={tol!r}: must be > 0")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        bad.append(f"max_iter={max_iter!r}: must be an int >= 1")
    if bad:
        raise ConfigError(bad, config="cg solver")
    x = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    gnorm = float(g.norm())
    rs = float(r @ r)
    hvps, it, converged = 0, 0, gnorm == 0.0
    while not converged and it < max_iter:
        ap = op(p)
        hvps += 1
        pap = float(p @ ap)
        if not math.isfinite(pap):
            raise SolverError(f"cg: non-finite curvature at iteration {it}; check the loss for NaN/inf "
                              f"or raise damping (now {damping})")
        if pap <= 0:
            raise SolverError(
                f"cg: H + damping I is not positive definite along a search direction at iteration {it} "
                f"(p'Ap = {pap:.3e}); raise damping (now {damping}) above -lambda_min(H), "
                f"or pass gauss_newton=True (PSD Gauss-Newton matrix)")
        alpha = rs / pap
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        it += 1
        rel = math.sqrt(rs_new) / gnorm
        if log is not None and (it % 10 == 0 or rel < tol):
            log(f"[cg] iteration {it}: relative residual {rel:.3e}")
        if rel < tol:
            converged = True
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x, {"iterations": it, "hvps": hvps, "converged": converged}


def _solve_lissa(model: nn.Module, loss_fn: LossFn, batches: Sequence[Any], g: Tensor, damping: float, *,
                 depth: int = 5000, scale: float = 25.0, hessian_batch_size: int = 1, repeats: int = 1,
                 seed: int = 0, gauss_newton: bool = False, max_growth: float = 1e6,
                 log: Callable[[str], None] | None = None, **unknown: Any) -> tuple[Tensor, dict[str, Any]]:
    """LiSSA (paper Algorithm 1 with scaling): h_t = g + h_{t-1} - (H_t + dI) h_{t-1} / scale; x = h_T/scale.

    The fixed point is (H + dI)^-1 g; it converges when every eigenvalue of the mini-batch
    (H_t + dI) lies in (0, 2*scale). Note: Koh & Liang's (and the authors') recursion
    ``h = g + (1-d') h - H h / scale`` has effective damping d' * scale in this notation.
    """
    _no_unknown("lissa", unknown)
    bad = []
    if not (isinstance(depth, int) and depth >= 1):
        bad.append(f"depth={depth!r}: must be an int >= 1")
    if not scale > 0:
        bad.append(f"scale={scale!r}: must be > 0")
    if not (isinstance(hessian_batch_size, int) and hessian_batch_size >= 1):
        bad.append(f"hessian_batch_size={hessian_batch_size!r}: must be an int >= 1")
    if not (isinstance(repeats, int) and repeats >= 1):
        bad.append(f"repeats={repeats!r}: must be an int >= 1")
    if bad:
        raise ConfigError(bad, config="lissa solver")
    params = trainable_params(model)
    sizes = [_batch_len(b) for b in batches]
    total = sum(sizes)
    cum = np.cumsum([0] + sizes)
    rng = np.random.default_rng(seed)
    gnorm = float(g.norm())
    est = torch.zeros_like(g)
    hvps = 0
    for rep in range(repeats):
        h = g.clone()
        for t in range(1, depth + 1):
            # a uniform random mini-batch of samples (with replacement across steps)
            if hessian_batch_size == 1:
                picks = rng.integers(0, total, size=1)
            else:
                picks = np.sort(rng.choice(total, size=min(hessian_batch_size, total), replace=False))
            hb = torch.zeros_like(g)
            cnt = 0
            for bi in np.unique(np.searchsorted(cum, picks, side="right") - 1):
                rows = picks[(picks >= cum[bi]) & (picks < cum[bi + 1])] - cum[bi]
                hv, bs = _hvp_sum(model, loss_fn, _slice_batch(batches[bi], rows, sizes[bi]), h, params, gauss_newton)
                hb += hv
                cnt += bs
            hvps += 1
            h = g + h - (hb / cnt + damping * h) / scale
            hn = float(h.norm())
            if not math.isfinite(hn) or hn > max_growth * max(gnorm, 1e-30) * scale:
                raise SolverError(
                    f"lissa diverged at step {t} of repeat {rep + 1} (||h|| = {hn:.3e}, ||g_bar|| = {gnorm:.3e}): "
                    f"an eigenvalue of the mini-batch Hessian + damping exceeds 2*scale or is negative; "
                    f"increase scale (now {scale}), increase damping (now {damping}), or increase "
                    f"hessian_batch_size (now {hessian_batch_size}) to reduce noise")
            if log is not None and t % max(1, depth // 10) == 0:
                log(f"[lissa] repeat {rep + 1} step {t}/{depth}: ||x|| = {hn / scale:.4e}")
        est += h / scale
    return est / repeats, {"iterations": depth * repeats, "hvps": hvps, "converged": True,
                           "scale": scale, "depth": depth, "hessian_batch_size": hessian_batch_size,
                           "repeats": repeats}


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Mapping):
        for v in batch.values():
            if torch.is_tensor(v) and v.dim() >= 1:
                return int(v.shape[0])
    if torch.is_tensor(batch):
        return int(batch.shape[0])
    raise ValueError("cannot tell the batch size: a batch must be a dict holding tensors with the sample dimension first")


def _slice_batch(batch: Any, rows: np.ndarray, size: int) -> Any:
    idx = torch.as_tensor(rows, dtype=torch.long)
    if torch.is_tensor(batch):
        return batch.index_select(0, idx)
    return {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v)
            for k, v in batch.items()}


def solve_ihvp(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], g_bar: Tensor, *,
               solver: str = "cg", damping: float = 0.0, gauss_newton: bool = False,
               hessian_batches: int | None = None, check_residual: bool = True,
               **opts: Any) -> tuple[Tensor, SolveReport]:
    """Solve (H + damping I) v = g_bar once, H the Hessian of the mean loss R.

    Args:
        model, loss_fn, batches: as in :func:`mean_gradient`.
        g_bar: flat mean gradient.
        solver: "cg" (exact HVPs by double backward; opts ``tol``=1e-6, ``max_iter``=200, ``log``),
            "lissa" (paper Algorithm 1; opts ``depth``=5000, ``scale``=25, ``hessian_batch_size``=1,
            ``repeats``=1, ``seed``, ``max_growth``, ``log``) or "exact" (dense Hessian and solve;
            opt ``max_params``=20000; the test oracle).
        damping: >= 0; the L2 weight of the objective.
        gauss_newton: use the Gauss-Newton matrix instead of H (needs ``loss_fn.split``).
        hessian_batches: use only the first k batches for H (a fixed subsampled Hessian, for
            large data); the residual then refers to that operator. None = all batches.
        check_residual: evaluate the achieved residual with one more full HVP (LiSSA / CG).

    Returns:
        (v, :class:`SolveReport`).

    Raises:
        ConfigError: unknown solver or option, bad option values.
        SolverError: divergence, NaN or indefinite curvature (the message names the knob).
    """
    if solver not in SOLVERS:
        raise ConfigError([f"solver={solver!r}: expected one of {SOLVERS}"], config="iHVP solver")
    if not (isinstance(damping, (int, float)) and damping >= 0 and math.isfinite(damping)):
        raise ConfigError([f"damping={damping!r}: must be a finite number >= 0"], config="iHVP solver")
    batches = list(batches)
    hb = batches if hessian_batches is None else batches[:hessian_batches]
    if not hb:
        raise ConfigError(["no batches for the Hessian"], config="iHVP solver")
    n_h = sum(_batch_len(b) for b in hb)

    def op(x: Tensor) -> Tensor:
        return hessian_vector_product(model, loss_fn, hb, x, n=n_h, damping=damping, gauss_newton=gauss_newton)

    t0 = time.perf_counter()
    if solver == "exact":
        v, info = _solve_exact(model, loss_fn, hb, g_bar, float(damping), n_h, gauss_newton, **opts)
    elif solver == "cg":
        v, info = _solve_cg(op, g_bar, damping, **opts)
    else:
        v, info = _solve_lissa(model, loss_fn, hb, g_bar, float(damping), gauss_newton=gauss_newton, **opts)
    if not bool(torch.isfinite(v).all()):
        raise SolverError(f"{solver}: solution has NaN/inf; raise damping (now {damping})"
                          + (" or scale" if solver == "lissa" else ""))
    hvps = info.pop("hvps")
    iters = info.pop("iterations")
    converged = info.pop("converged")
    gnorm = float(g_bar.norm())
    if check_residual or solver == "exact":
        res = op(v) - g_bar
        hvps += 1
        rel = float(res.norm()) / gnorm if gnorm > 0 else 0.0
    else:
        rel = float("nan")
    info["n_hessian_samples"] = n_h
    return v, SolveReport(solver=solver, damping=float(damping), rel_residual=rel, iterations=iters, hvps=hvps,
                          seconds=time.perf_counter() - t0, converged=converged, extra=info)


# --------------------------------------------------------------------------- per-sample products


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


def influence_scores(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], *, solver: str = "cg",
                     damping: float = 0.0, **solver_options: Any) -> np.ndarray:
    """Influence of removing each training sample on the mean training loss (DEALRec eq. 11).

    influence(s) = (1/n) g_bar^T (H + damping I)^-1 grad L_s, with g_bar and H the gradient and
    Hessian of R = (1/n) sum L_i at the model's parameters; positive = removing s raises R.

    Args:
        model: trained model; parameters with requires_grad are differentiated.
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` per-sample losses.
        batches: re-iterable batches of all n training samples.
        solver: "cg", "lissa" or "exact" (see :func:`solve_ihvp`).
        damping: L2 weight of the objective (>= 0).
        **solver_options: passed to :func:`solve_ihvp` (e.g. tol, max_iter, depth, scale,
            gauss_newton, hessian_batches, method="jvp"|"fd" for the per-sample products).

    Returns:
        float64 array [n], in the order of the batches' samples.

    Raises:
        ConfigError, SolverError: as :func:`solve_ihvp`.
    """
    batches = list(batches)
    method = solver_options.pop("method", "jvp")
    g_bar, n = mean_gradient(model, loss_fn, batches)
    v, _ = solve_ihvp(model, loss_fn, batches, g_bar, solver=solver, damping=damping, **solver_options)
    out = [directional_derivatives(model, loss_fn, b, v, method=method).double() / n for b in batches]
    return torch.cat(out).numpy()


# --------------------------------------------------------------------------- surrogate pipeline


@dataclass
class InfluenceConfig:
    """How the driver solves v = (H + damping I)^-1 g_bar for a surrogate (validated as a whole)."""

    solver: str = field(default="cg", metadata={"help": "iHVP solver: 'cg', 'lissa' or 'exact' (tiny models only)"})
    damping: float | None = field(
        default=None,
        metadata={"help": "damping = L2 weight of the objective; None = the surrogate's weight_decay"})
    gauss_newton: bool = field(
        default=True,
        metadata={"help": "use the PSD Gauss-Newton matrix instead of H (a trained transformer's H is indefinite)"})
    tol: float = field(default=1e-3, metadata={"help": "cg: stop at this relative residual"})
    max_iter: int = field(default=50, metadata={"help": "cg: maximum iterations"})
    depth: int = field(default=5000, metadata={"help": "lissa: recursion depth T (paper: 5000)"})
    scale: float = field(default=25.0, metadata={"help": "lissa: scale (paper code: 25)"})
    hessian_batch_size: int = field(default=1, metadata={"help": "lissa: samples per Hessian estimate (paper: 1)"})
    repeats: int = field(default=1, metadata={"help": "lissa: independent recursions averaged"})
    hessian_samples: int | None = field(
        default=4096,
        metadata={"help": "use a seeded random subset of this many samples (rounded up to batches) for H, a "
                          "fixed subsampled Hessian (each CG step is one pass over them); None = all samples"})
    batch_size: int = field(default=256, metadata={"help": "samples per batch of the g_bar / HVP passes"})
    method: str = field(default="jvp", metadata={"help": "directional derivatives: 'jvp' (exact) or 'fd'"})
    seed: int = field(default=0, metadata={"help": "seed of the Hessian subsample and of lissa's sampling"})

    def __post_init__(self) -> None:
        p: list[str] = []
        if self.solver not in SOLVERS:
            p.append(f"solver={self.solver!r}: expected one of {SOLVERS}")
        if self.damping is not None and not (self.damping >= 0 and math.isfinite(self.damping)):
            p.append(f"damping={self.damping!r}: must be a finite number >= 0 (or None)")
        if not self.tol > 0:
            p.append(f"tol={self.tol!r}: must be > 0")
        for name in ("max_iter", "depth", "hessian_batch_size", "repeats", "batch_size"):
            val = getattr(self, name)
            if not (isinstance(val, int) and val >= 1):
                p.append(f"{name}={val!r}: must be an int >= 1")
        if not self.scale > 0:
            p.append(f"scale={self.scale!r}: must be > 0")
        if self.hessian_samples is not None and not (isinstance(self.hessian_samples, int) and self.hessian_samples >= 1):
            p.append(f"hessian_samples={self.hessian_samples!r}: must be an int >= 1 or None")
        if self.method not in ("jvp", "fd"):
            p.append(f"method={self.method!r}: expected 'jvp' or 'fd'")
        if p:
            raise ConfigError(p, config="InfluenceConfig")

    def solver_options(self) -> dict[str, Any]:
        """Keyword options of :func:`solve_ihvp` for this config's solver."""
        opts: dict[str, Any] = {"gauss_newton": self.gauss_newton}
        if self.solver == "cg":
            opts.update(tol=self.tol, max_iter=self.max_iter)
        elif self.solver == "lissa":
            opts.update(depth=self.depth, scale=self.scale, hessian_batch_size=self.hessian_batch_size,
                        repeats=self.repeats, seed=self.seed)
        return opts


def hessian_rows(n: int, cfg: InfluenceConfig) -> np.ndarray | None:
    """Row positions (0..n-1, in the order samples are streamed) of the fixed Hessian subsample:
    a seeded random ``hessian_samples`` of them, sorted; None = all rows."""
    from engine.data.schema import sample_rows

    return sample_rows(n, cfg.hessian_samples, cfg.seed)


def _num_rows(chunk: Any) -> int:
    if hasattr(chunk, "num_rows"):
        return int(chunk.num_rows)
    return len(np.asarray(chunk["sample_id"]))


def _concat(parts: list[Any]) -> Any:
    if parts and hasattr(parts[0], "num_rows"):
        import pyarrow as pa

        return pa.concat_tables(parts)
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) if np.asarray(parts[0][k]).dtype != object
            else np.array([x for p in parts for x in p[k]], dtype=object) for k in parts[0]}


def compute_ihvp_streaming(model: nn.Module, chunks: Callable[[], Iterable[Any]], cfg: InfluenceConfig, *,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Driver step of the prune job with memory bounded by one chunk plus the Hessian subsample.

    Pass 1 streams every chunk (e.g. one Parquet file of samples) through length-sorted
    batches and accumulates the gradient sum, so g_bar never needs all samples at once.
    Pass 2 streams again and keeps only the rows of the fixed Hessian subsample
    (:func:`hessian_rows`: ``hessian_samples`` seeded random rows; all rows when None, which
    then holds every sample's batch in memory). Then v = (H + dI)^-1 g_bar is solved once.

    Args:
        model: trained surrogate (``engine.surrogate``).
        chunks: ``chunks()`` returns a fresh iterable of sample chunks (pyarrow Tables or dicts
            of numpy in the samples schema), the same rows in the same order each call.
        cfg: :class:`InfluenceConfig`.
        log: progress lines.

    Returns:
        dict with ``v`` (numpy [m]), ``n`` (samples), ``damping``, ``g_bar_norm`` and the
        :class:`SolveReport` fields (``rel_residual``, ``iterations``, ``hvps``, ``seconds``, ...).

    Raises:
        SolverError: the solve diverged or met negative curvature (message names the knob).
        ValueError: no samples.
    """
    from engine.data.schema import take_rows
    from engine.surrogate import make_batches, surrogate_loss

    damping = float(model.cfg.weight_decay if cfg.damping is None else cfg.damping)
    max_len = model.cfg.max_len
    t0 = last = time.perf_counter()
    acc: Tensor | None = None
    n = 0
    for i, chunk in enumerate(chunks()):
        if _num_rows(chunk) == 0:
            continue
        g, k = mean_gradient(model, surrogate_loss, make_batches(chunk, batch_size=cfg.batch_size,
                                                                  max_len=max_len, order="length"))
        acc = g * k if acc is None else acc + g * k
        n += k
        if time.perf_counter() - last > 30:  # long passes (millions of samples) show progress
            last = time.perf_counter()
            log(f"[ihvp] g_bar: {n} samples, {i + 1} chunk(s), {n / (last - t0):.0f} samples/s")
    if acc is None:
        raise ValueError("no samples in chunks")
    g_bar = acc / n
    log(f"[ihvp] g_bar over {n} samples (streamed, {i + 1} chunk(s)): ||g_bar|| = {float(g_bar.norm()):.4e} "
        f"({time.perf_counter() - t0:.1f}s)")
    rows = hessian_rows(n, cfg)
    parts, start = [], 0
    for chunk in chunks():
        m = _num_rows(chunk)
        if rows is None:
            parts.append(chunk)
        else:
            lo, hi = np.searchsorted(rows, [start, start + m])
            if hi > lo:
                parts.append(take_rows(chunk, rows[lo:hi] - start))
        start += m
    hbatches = make_batches(_concat(parts), batch_size=cfg.batch_size, max_len=max_len, order="length")
    opts = cfg.solver_options()
    if cfg.solver != "exact":
        opts["log"] = log
    v, rep = solve_ihvp(model, surrogate_loss, hbatches, g_bar, solver=cfg.solver, damping=damping, **opts)
    log(f"[ihvp] {cfg.solver}: relative residual {rep.rel_residual:.3e} after {rep.iterations} iterations, "
        f"{rep.hvps} HVPs, {rep.seconds:.1f}s (H on {rep.extra.get('n_hessian_samples')} samples)")
    return {"v": v.detach().cpu().numpy(), "n": n, "damping": damping, "g_bar_norm": float(g_bar.norm()),
            **{k: val for k, val in rep.to_dict().items() if k != "damping"}}


def compute_ihvp_for_samples(model: nn.Module, samples: Any, cfg: InfluenceConfig, *,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`compute_ihvp_streaming` over one in-memory samples table (or dict of numpy)."""
    return compute_ihvp_streaming(model, lambda: [samples], cfg, log=log)


def score_surrogate_batch(model: nn.Module, batch: Any, *, v: Any = None, n_train: int | None = None,
                          what: Sequence[str] = ("influence", "grand", "el2n"), batch_size: int = 256,
                          max_len: int | None = None, method: str = "jvp",
                          directional: DirectionalDerivatives | None = None) -> dict[str, np.ndarray]:
    """Per-sample surrogate scores of one Ray Data batch (what ``actors.influence`` delegates to).

    Args:
        model: surrogate (eval mode is enforced).
        batch: dict of numpy (``sample_id``, ``history``, ``target``) or a samples Table.
        v: iHVP solution (numpy or tensor, or its :func:`split_direction`), needed for "influence".
        n_train: n, needed for "influence".
        what: subset of ("influence", "grand", "el2n").
        batch_size, max_len: engine batching (max_len None = the surrogate's). Rows are sorted
            by length into engine batches of ``batch_size`` (less padding; results unchanged).
        method: "jvp" or "fd" directional derivatives.
        directional: a :class:`DirectionalDerivatives` for (model, surrogate_loss, v) built once
            by the caller (the actors: v split and the pass compiled once); replaces v/method.

    Returns:
        ``{"sample_id": int64, <what>: float64}`` arrays in input order.
    """
    from engine.baseline_scores import el2n_scores, grand_scores
    from engine.surrogate import make_batches, pad_to_bucket, surrogate_loss

    rows: list[np.ndarray] = []

    def by_length(lengths: np.ndarray) -> np.ndarray:
        rows.append(np.argsort(lengths, kind="stable"))
        return rows[0]

    max_len = max_len or model.cfg.max_len
    batches = make_batches(batch, batch_size=batch_size, max_len=max_len, order=by_length)
    dd = None
    if "influence" in what:
        if (v is None and directional is None) or not n_train:
            raise ValueError("influence needs v (or directional) and n_train")
        # v split once for every micro-batch
        dd = directional or DirectionalDerivatives(model, surrogate_loss, v, method=method)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("sample_id", *what)}
    for b in batches:
        out["sample_id"].append(b["sample_id"].numpy().astype(np.int64))
        if "influence" in what:
            # few shapes for a compiled pass: rows and length padded to buckets, padding dropped
            d = dd(pad_to_bucket(b, batch_size, max_len))[:len(b["sample_id"])] if dd.compiled else dd(b)
            out["influence"].append(d.double().numpy() / n_train)
        if "grand" in what:
            out["grand"].append(grand_scores(model, surrogate_loss, b).double().numpy())
        if "el2n" in what:
            out["el2n"].append(el2n_scores(model, b).double().numpy())
    inverse = np.empty(len(rows[0]), dtype=np.int64)
    inverse[rows[0]] = np.arange(len(rows[0]))
    return {k: (np.concatenate(vs)[inverse] if vs else np.zeros(0, dtype=np.int64 if k == "sample_id" else np.float64))
            for k, vs in out.items()}
