"""Solvers of v = (H + damping I)^-1 g_bar: CG (default), LiSSA (the paper's), exact (tiny models)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import ConfigError, SolverError
from engine.influence.hvp import _hvp_sum, hessian_vector_product
from engine.influence.params import LossFn, _batch_len, _check_losses, _eval_mode, flatten_params, trainable_params

SOLVERS = ("cg", "lissa", "exact", "identity")


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
              max_iter: int = 200, log: Callable[[str], None] | None = None, x0: Tensor | None = None,
              **unknown: Any) -> tuple[Tensor, dict[str, Any]]:
    """CG on (H + dI) x = g, from x0 (a warm start, e.g. yesterday's v; scaled by the factor that
    minimises the A-norm error along it) or from 0. The stopping rule is the same either way:
    ||g - (H + dI) x|| / ||g|| < tol; a warm start costs one more HVP (its initial residual) and
    saves the iterations it starts closer."""
    _no_unknown("cg", unknown)
    bad = []
    if not tol > 0:
        bad.append(f"tol={tol!r}: must be > 0")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        bad.append(f"max_iter={max_iter!r}: must be an int >= 1")
    if bad:
        raise ConfigError(bad, config="cg solver")
    gnorm = float(g.norm())
    hvps, extra = 0, {}
    if x0 is None:
        x = torch.zeros_like(g)
        r = g.clone()
    else:
        x0 = torch.as_tensor(x0)
        if x0.shape != g.shape:
            raise ConfigError([f"x0 has shape {tuple(x0.shape)}, g_bar {tuple(g.shape)}: a warm start needs the "
                               "same parameters (the same surrogate architecture)"], config="cg solver")
        x = x0.to(dtype=g.dtype, device=g.device).clone()
        if not bool(torch.isfinite(x).all()):
            raise ConfigError(["x0 holds NaN/inf"], config="cg solver")
        ax = op(x)
        hvps += 1
        # start from the best multiple of x0 (it minimises the A-norm error along x0, so the start
        # is never worse than 0 in that norm): g_bar's scale moves from day to day with the data
        xax = float(x @ ax)
        scale = float(x @ g) / xax if xax > 0 and math.isfinite(xax) else 0.0
        x, r = x * scale, g - scale * ax
        extra["x0_scale"] = scale
        extra["x0_rel_residual"] = float(r.norm()) / gnorm if gnorm > 0 else 0.0
        if log is not None:
            log(f"[cg] warm start: x0 scaled by {scale:.4g}, initial relative residual "
                f"{extra['x0_rel_residual']:.3e}")
    p = r.clone()
    rs = float(r @ r)
    it = 0
    converged = gnorm == 0.0 or math.sqrt(rs) / gnorm < tol
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
    return x, {"iterations": it, "hvps": hvps, "converged": converged, **extra}


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


def _slice_batch(batch: Any, rows: np.ndarray, size: int) -> Any:
    idx = torch.as_tensor(rows, dtype=torch.long)
    if torch.is_tensor(batch):
        return batch.index_select(0, idx)
    return {k: (v.index_select(0, idx) if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == size else v)
            for k, v in batch.items()}


def solve_ihvp(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], g_bar: Tensor, *,
               solver: str = "cg", damping: float = 0.0, gauss_newton: bool = False,
               hessian_batches: int | None = None, check_residual: bool = True,
               cold_reference: bool = False, **opts: Any) -> tuple[Tensor, SolveReport]:
    """Solve (H + damping I) v = g_bar once, H the Hessian of the mean loss R.

    Args:
        model, loss_fn, batches: as in :func:`mean_gradient`.
        g_bar: flat mean gradient.
        solver: "cg" (exact HVPs by double backward; opts ``tol``=1e-6, ``max_iter``=200, ``log``),
            "lissa" (paper Algorithm 1; opts ``depth``=5000, ``scale``=25, ``hessian_batch_size``=1,
            ``repeats``=1, ``seed``, ``max_growth``, ``log``) or "exact" (dense Hessian and solve;
            opt ``max_params``=20000; the test oracle) or "identity" (v = g_bar, no Hessian: the
            plain gradient alignment g_bar . grad L_s that the inverse Hessian is measured against).
        damping: >= 0; the L2 weight of the objective.
        gauss_newton: use the Gauss-Newton matrix instead of H (needs ``loss_fn.split``).
        hessian_batches: use only the first k batches for H (a fixed subsampled Hessian, for
            large data); the residual then refers to that operator. None = all batches.
        check_residual: evaluate the achieved residual with one more full HVP (LiSSA / CG).
        cold_reference: with a warm-started CG (option ``x0``), also solve from zero on the same
            operator and report its iterations, residual and time in ``extra["cold"]`` (what the
            warm start saved; the returned v is the warm one).

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
    if solver == "identity":  # plain gradient alignment: no Hessian, v = g_bar
        _no_unknown(solver, {k: x for k, x in opts.items() if k != "log"})
        return g_bar.detach().clone(), SolveReport(solver=solver, damping=float(damping), rel_residual=float("nan"),
                                                   iterations=0, hvps=0, seconds=0.0, converged=True, extra={})
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
        if cold_reference and opts.get("x0") is not None:
            t1 = time.perf_counter()
            v_cold, cold = _solve_cg(op, g_bar, damping, **{k: o for k, o in opts.items() if k != "x0"})
            gn = float(g_bar.norm())
            info["cold"] = {"iterations": cold["iterations"], "hvps": cold["hvps"] + 1,
                            "converged": cold["converged"], "seconds": time.perf_counter() - t1,
                            "rel_residual": float((op(v_cold) - g_bar).norm()) / gn if gn > 0 else 0.0,
                            "rel_diff_to_warm": float((v_cold - v).norm()) / max(float(v_cold.norm()), 1e-30)}
    elif opts.get("x0") is not None:
        raise ConfigError([f"x0 (a warm start) is an option of solver='cg', not {solver!r}"], config="iHVP solver")
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
