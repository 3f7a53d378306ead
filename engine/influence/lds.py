"""The linear datamodeling score (LDS): do summed attributions predict retrained targets?

LDS (Park et al., TRAK, ICML'23; kronfluence, Grosse et al. 2023) measures attribution quality
without trusting any approximation: retrain the model on M seeded random subsets S_1..S_M of the
training set (here a fixed ``fraction`` of it), measure a target f on each retrained model, and
rank-correlate the measured f(S_m) with the additive prediction of the attributions.

Sign convention (the one every function here uses)::

    influence(s)   = (1/n) grad L_s . (H + dI)^-1 g_target     (engine.influence: the first-order
                      change of the target when s is REMOVED; positive = s is helpful)
    attribution(s) = -influence(s)                               the first-order change of the target
                      from INCLUDING s (a loss target: helpful samples have negative attributions)
    predicted(S)   = sum over s in S of attribution(s)
    LDS            = Spearman(predicted(S_m), measured f(S_m)) over the M subsets

So a perfect method has LDS = +1, and an attribution with the wrong sign has LDS near -1. To
first order, f(S) - f(all) = sum over s not in S of influence(s) = predicted(S) + const, which is
why the sum over the kept samples is the prediction.

Pure numpy; no Ray, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def attribution_from_influence(influence: np.ndarray) -> np.ndarray:
    """attribution(s) = -influence(s) (see the module docstring)."""
    return -np.asarray(influence, dtype=np.float64)


def subset_indices(n: int, j: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Sorted row positions of subset ``j``: round(fraction * n) of 0..n-1 without replacement,
    drawn by ``numpy.random.default_rng([seed, j])`` (so subset j never depends on the others)."""
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n={n!r}: must be an int >= 1")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction={fraction!r}: must be in (0, 1)")
    k = max(1, min(n - 1, int(round(fraction * n))))
    return np.sort(np.random.default_rng([int(seed), int(j)]).permutation(n)[:k])


def subset_masks(n: int, m: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean [m, n]: row j marks :func:`subset_indices` (n, j)."""
    out = np.zeros((m, n), dtype=bool)
    for j in range(m):
        out[j, subset_indices(n, j, fraction=fraction, seed=seed)] = True
    return out


def predicted_targets(attribution: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """predicted(S_j) = sum over s in S_j of attribution(s), for every row of ``masks`` [M, n]."""
    a = np.asarray(attribution, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != a.shape[0]:
        raise ValueError(f"masks of shape {masks.shape} do not match {a.shape[0]} attributions")
    return masks.astype(np.float64) @ a


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN when either side is constant
    or has fewer than 2 values."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if len(a) < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def bootstrap_ci(a: np.ndarray, b: np.ndarray, *, stat: Callable[[np.ndarray, np.ndarray], float] = spearman,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(a, b)``: the pairs (a_i, b_i) are resampled JOINTLY,
    with replacement, ``n_boot`` times (seeded). Replicates where the statistic is undefined
    (NaN: e.g. every resampled value equal) are dropped; (NaN, NaN) if all are."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"bootstrap_ci needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    n = len(a)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    reps = np.array([stat(a[idx], b[idx]) for idx in rng.integers(0, n, size=(int(n_boot), n))])
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return float("nan"), float("nan")
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(reps, [tail, 100.0 - tail])
    return float(lo), float(hi)


def lds(attribution: np.ndarray, masks: np.ndarray, measured: np.ndarray, *, n_boot: int = 2000,
        level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """LDS of one attribution vector against the targets measured on the retrained subsets.

    Args:
        attribution: [n] attributions (:func:`attribution_from_influence` of influence scores).
        masks: [M, n] booleans, row j = the samples kept in retrain j.
        measured: [M] the target measured on retrain j.
        n_boot, level, seed: of :func:`bootstrap_ci` (over the M subsets).

    Returns:
        ``{"spearman", "ci_low", "ci_high", "subsets"}``.
    """
    measured = np.asarray(measured, dtype=np.float64)
    pred = predicted_targets(attribution, masks)
    if pred.shape != measured.shape:
        raise ValueError(f"{pred.shape[0]} subsets but {measured.shape} measured targets")
    lo, hi = bootstrap_ci(pred, measured, n_boot=n_boot, level=level, seed=seed)
    return {"spearman": spearman(pred, measured), "ci_low": lo, "ci_high": hi, "subsets": int(len(measured))}


def bootstrap_diff_ci(pred_a: np.ndarray, pred_b: np.ndarray, measured: np.ndarray, *, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap of LDS(a) - LDS(b) on the same retrains: the subsets are resampled once per
    replicate for both methods (tighter than comparing two marginal CIs).

    Returns:
        ``{"diff", "ci_low", "ci_high"}`` (percentile CI; NaN replicates dropped).
    """
    a = np.asarray(pred_a, dtype=np.float64)
    b = np.asarray(pred_b, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    if not (a.shape == b.shape == y.shape and a.ndim == 1):
        raise ValueError(f"bootstrap_diff_ci needs three 1-d arrays of one length, got {a.shape}, {b.shape}, {y.shape}")
    rng = np.random.default_rng(seed)
    reps = np.array([spearman(a[i], y[i]) - spearman(b[i], y[i])
                     for i in rng.integers(0, len(y), size=(int(n_boot), len(y)))])
    reps = reps[np.isfinite(reps)]
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(reps, [tail, 100.0 - tail]) if reps.size else (float("nan"), float("nan"))
    return {"diff": spearman(a, y) - spearman(b, y), "ci_low": float(lo), "ci_high": float(hi)}


def ci_apart(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """Whether two LDS results' CIs do not overlap (a's lower bound above b's upper, or the reverse)."""
    return bool(a["ci_low"] > b["ci_high"] or b["ci_low"] > a["ci_high"])


def format_table(rows: Sequence[Mapping[str, Any]], targets: Sequence[str]) -> str:
    """A markdown table: one row per method, per target "Spearman [lo, hi]", then the wall time.

    Each row: ``{"method": str, "seconds": float | None, "note": str, <target>: lds dict or None}``;
    a missing target prints its note (e.g. why the method was skipped)."""
    head = "| method | " + " | ".join(f"LDS, {t} target [95% CI]" for t in targets) + " | wall time | note |"
    lines = [head, "|" + "---|" * (len(targets) + 3)]
    for r in rows:
        cells = []
        for t in targets:
            x = r.get(t)
            if not x or not np.isfinite(x.get("spearman", float("nan"))):
                cells.append("-")
            else:
                cells.append(f"{x['spearman']:+.3f} [{x['ci_low']:+.3f}, {x['ci_high']:+.3f}]")
        sec = r.get("seconds")
        wall = "-" if sec is None or not np.isfinite(sec) else (f"{sec:.0f} s" if sec >= 10 else f"{sec:.1f} s")
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {wall} | {r.get('note', '')} |")
    return "\n".join(lines)
