"""Influence end to end: :func:`influence_scores` in memory, and the surrogate pipeline of prune
(:class:`InfluenceConfig`, the streamed iHVP solved once on the driver, :func:`score_surrogate_batch`
that the influence actors call per Ray Data batch)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from engine.errors import ConfigError
from engine.influence.baselines import el2n_scores, grand_scores
from engine.influence.directional import DirectionalDerivatives, directional_derivatives
from engine.influence.hvp import mean_gradient
from engine.influence.params import LossFn
from engine.influence.solvers import SOLVERS, solve_ihvp
from engine.influence.target import TARGETS, valid_mean_gradient

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


@dataclass
class InfluenceConfig:
    """How the driver solves v = (H + damping I)^-1 g_bar for a surrogate (validated as a whole)."""

    solver: str = field(default="cg", metadata={"help": "iHVP solver: 'cg', 'lissa', 'exact' (tiny models only) or 'identity' "
                                                         "(v = g_bar: plain gradient alignment, no inverse Hessian)"})
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
    seed: int = field(default=0, metadata={"help": "seed of the Hessian subsample, of lissa's sampling and of the "
                                                   "target_users subset"})
    target: str = field(
        default="train",
        metadata={"help": "what influence is measured on: 'train' (g_bar = the mean training gradient, DEALRec) or "
                          "'valid' (g_bar = the mean gradient of the validation period's loss: every validation "
                          "user's items after their training sequence; engine.influence.target)"})
    target_users: int | None = field(
        default=None,
        metadata={"help": "target 'valid': a seeded random subset of this many validation users (None = all)"})

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
        if self.target not in TARGETS:
            p.append(f"target={self.target!r}: expected one of {TARGETS}")
        if self.target_users is not None and not (isinstance(self.target_users, int) and self.target_users >= 1):
            p.append(f"target_users={self.target_users!r}: must be an int >= 1 or None")
        if p:
            raise ConfigError(p, config="InfluenceConfig")

    def hash_dict(self) -> dict[str, Any]:
        """The config as the iHVP stage's fingerprint: every field, the target fields only when the
        target is not the default 'train' (so run folders of before the target keep their hash)."""
        from engine.config import to_dict

        d = to_dict(self)
        if self.target == "train":
            d.pop("target")
            d.pop("target_users")
        return d

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
                           target_rows: Any = None, log: Callable[[str], None] = print,
                           solve_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Driver step of the prune job with memory bounded by one chunk plus the Hessian subsample.

    Pass 1 streams every chunk (e.g. one Parquet file of samples) through length-sorted
    batches and accumulates the gradient sum, so g_bar never needs all samples at once
    (``cfg.target == "valid"``: g_bar is instead the mean gradient of the validation loss over
    ``target_rows``, :func:`engine.influence.target.valid_mean_gradient`, and pass 1 only counts n).
    Pass 2 streams again and keeps only the rows of the fixed Hessian subsample
    (:func:`hessian_rows`: ``hessian_samples`` seeded random rows; all rows when None, which
    then holds every sample's batch in memory). Then v = (H + dI)^-1 g_bar is solved once.

    Args:
        model: trained surrogate (``engine.surrogate``).
        chunks: ``chunks()`` returns a fresh iterable of sample chunks (pyarrow Tables or dicts
            of numpy in the samples schema), the same rows in the same order each call.
        cfg: :class:`InfluenceConfig`.
        target_rows: with ``cfg.target == "valid"``: the validation users
            (:func:`engine.influence.target.read_target_rows`).
        log: progress lines.
        solve_options: more keyword options of :func:`solve_ihvp` (an update run's warm start:
            ``x0`` = yesterday's v, ``cold_reference``).

    Returns:
        dict with ``v`` (numpy [m]), ``n`` (samples), ``damping``, ``g_bar_norm``, ``target``
        (and ``n_target_users`` for "valid") and the :class:`SolveReport` fields
        (``rel_residual``, ``iterations``, ``hvps``, ``seconds``, ...).

    Raises:
        SolverError: the solve diverged or met negative curvature (message names the knob).
        ValueError: no samples, or target "valid" without ``target_rows``.
    """
    from engine.data.schema import take_rows
    from engine.surrogate import make_batches, surrogate_loss

    if cfg.target == "valid" and target_rows is None:
        raise ValueError("target='valid' needs target_rows (engine.influence.target.read_target_rows)")
    train_target = cfg.target == "train"
    damping = float(model.cfg.weight_decay if cfg.damping is None else cfg.damping)
    max_len = model.cfg.max_len
    t0 = last = time.perf_counter()
    acc: Tensor | None = None
    n = 0
    extra: dict[str, Any] = {"target": cfg.target}
    for i, chunk in enumerate(chunks()):
        if _num_rows(chunk) == 0:
            continue
        if not train_target:  # only n is needed from the training samples
            n += _num_rows(chunk)
            continue
        g, k = mean_gradient(model, surrogate_loss, make_batches(chunk, batch_size=cfg.batch_size,
                                                                  max_len=max_len, order="length"))
        acc = g * k if acc is None else acc + g * k
        n += k
        if time.perf_counter() - last > 30:  # long passes (millions of samples) show progress
            last = time.perf_counter()
            log(f"[ihvp] g_bar: {n} samples, {i + 1} chunk(s), {n / (last - t0):.0f} samples/s")
    if n == 0:
        raise ValueError("no samples in chunks")
    if train_target:
        g_bar = acc / n
        log(f"[ihvp] g_bar over {n} samples (streamed, {i + 1} chunk(s)): ||g_bar|| = {float(g_bar.norm()):.4e} "
            f"({time.perf_counter() - t0:.1f}s)")
    else:
        g_bar, u = valid_mean_gradient(model, target_rows, batch_size=cfg.batch_size)
        extra["n_target_users"] = u
        log(f"[ihvp] g_bar = mean gradient of the validation loss over {u} validation users: "
            f"||g_bar|| = {float(g_bar.norm()):.4e} ({time.perf_counter() - t0:.1f}s)")
    rows = hessian_rows(n, cfg)
    parts, start = [], 0
    for chunk in (chunks() if cfg.solver != "identity" else ()):  # identity: v = g_bar, no Hessian
        m = _num_rows(chunk)
        if rows is None:
            parts.append(chunk)
        else:
            lo, hi = np.searchsorted(rows, [start, start + m])
            if hi > lo:
                parts.append(take_rows(chunk, rows[lo:hi] - start))
        start += m
    hbatches = make_batches(_concat(parts), batch_size=cfg.batch_size, max_len=max_len, order="length") if parts else []
    opts = cfg.solver_options()
    if cfg.solver in ("cg", "lissa"):
        opts["log"] = log
    opts.update(solve_options or {})
    v, rep = solve_ihvp(model, surrogate_loss, hbatches, g_bar, solver=cfg.solver, damping=damping, **opts)
    log(f"[ihvp] {cfg.solver}: relative residual {rep.rel_residual:.3e} after {rep.iterations} iterations, "
        f"{rep.hvps} HVPs, {rep.seconds:.1f}s (H on {rep.extra.get('n_hessian_samples')} samples)")
    return {"v": v.detach().cpu().numpy(), "n": n, "damping": damping, "g_bar_norm": float(g_bar.norm()), **extra,
            **{k: val for k, val in rep.to_dict().items() if k != "damping"}}


def compute_ihvp_for_samples(model: nn.Module, samples: Any, cfg: InfluenceConfig, *, target_rows: Any = None,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`compute_ihvp_streaming` over one in-memory samples table (or dict of numpy)."""
    return compute_ihvp_streaming(model, lambda: [samples], cfg, target_rows=target_rows, log=log)


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
