"""Sample selection: DEALRec's coverage-enhanced stratified sampling (paper Alg. 2) and baselines.

Pure numpy, seeded through one ``numpy.random.Generator``; no torch, no Ray. Every
selector returns positions ``0..n-1`` into the score arrays (the ``sample_id`` of the
canonical samples table, which is dense).

Directions (what "top" means), per method:

- ``dealrec``: score = minmax(influence) + lam * minmax(effort). Influence is the
  first-order change of the empirical risk when the sample is removed (paper Eq. 11):
  high = removing it hurts = important. Effort is the LLM's gradient norm: high = hard
  for the LLM. The top ``hard_prune`` fraction is dropped first (the authors' code: the
  very highest scores are the hardest / noisiest samples), then Algorithm 2 samples
  over K score strata, so the rest of the range is covered rather than its top.
- ``influence-only`` / ``effort-only``: the paper's ablations "w/o delta_s" and "w/o IS":
  the same pipeline (hard prune + Algorithm 2) on one min-max normalised term.
- ``greedy``: the paper's ablation "Greedy": the top-``budget`` samples by the DEALRec
  combined score, highest first; no hard prune, no strata.
- ``grand`` / ``el2n``: Paul et al. (NeurIPS'21) keep the samples with the largest
  gradient norm / error L2 norm (hard samples): top-``budget``, highest first; no
  hard prune. The arrays are computed on the surrogate (paper Sec. 4.1.3).
- ``ccs``: Coverage-Centric Coreset Selection (Zheng et al., ICLR'23) with EL2N as the
  importance metric (as the paper does): prune the hardest ``beta`` fraction (highest
  EL2N; ``beta`` is ``hard_prune`` here), then the same stratified smallest-group-first
  sampling over K equal-width strata of EL2N.
- ``random``: uniform without replacement; no scores needed.

Ties are broken by position (lower ``sample_id`` first) wherever an order is needed,
so every selection is a pure function of (scores, config, seed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from engine.errors import ConfigError, DataError, check

__all__ = [
    "METHODS",
    "SelectionConfig",
    "SelectionResult",
    "StrataStats",
    "combine_scores",
    "minmax",
    "select",
    "stratified_select",
]

METHODS = ("dealrec", "random", "grand", "el2n", "ccs", "influence-only", "effort-only", "greedy")

# score arrays each method reads
REQUIRED_SCORES: dict[str, tuple[str, ...]] = {
    "dealrec": ("influence", "effort"),
    "greedy": ("influence", "effort"),
    "influence-only": ("influence",),
    "effort-only": ("effort",),
    "grand": ("grand",),
    "el2n": ("el2n",),
    "ccs": ("el2n",),
    "random": (),
}
# methods that drop the top ``hard_prune`` fraction before stratifying
HARD_PRUNING_METHODS = frozenset({"dealrec", "influence-only", "effort-only", "ccs"})
STRATIFIED_METHODS = HARD_PRUNING_METHODS


def _floor_fraction(x: float, n: int) -> int:
    """floor(x * n) with x read as the decimal the user typed (0.29 * 100 -> 29, not 28)."""
    return math.floor(Fraction(repr(float(x))) * n)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


@dataclass
class SelectionConfig:
    """How to pick the fine-tuning subset. Call :meth:`validate` once n is known."""

    method: str = field(
        default="dealrec",
        metadata={"help": "selector: " + ", ".join(METHODS)},
    )
    budget: int | None = field(
        default=None,
        metadata={"help": "number of samples to select (give exactly one of budget / ratio)"},
    )
    ratio: float | None = field(
        default=None,
        metadata={"help": "fraction of all n samples to select, in (0, 1]; budget = max(1, floor(ratio*n))"},
    )
    lam: float = field(
        default=0.3,
        metadata={"help": "lambda, weight of the min-max normalised effort score (paper: 0.3 Games, 1.0 Book)"},
    )
    groups: int = field(
        default=50,
        metadata={"help": "K, number of equal-width score strata of Algorithm 2 (paper searches 25/50/75)"},
    )
    hard_prune: float = field(
        default=0.1,
        metadata={
            "help": "fraction of the highest scores removed before stratifying (the authors' code; "
            "CCS's beta for method=ccs); 0 disables; in [0, 1)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random draws (random, and within strata)"})

    def uses_hard_prune(self) -> bool:
        """True when ``method`` drops the top ``hard_prune`` fraction before selecting."""
        return self.method in HARD_PRUNING_METHODS

    def validate(self, n: int | None = None) -> None:
        """Check every field (and, with ``n``, the budget against the data) at once.

        Args:
            n: number of samples, when known; enables the budget-vs-data checks.

        Raises:
            ConfigError: listing every problem found.
        """
        p: list[str] = []
        check(p, self.method in METHODS, f"method={self.method!r} is unknown; use one of {', '.join(METHODS)}")
        n_ok = n is None or (_is_int(n) and n >= 0)
        check(p, n_ok, f"n={n!r} must be a non-negative integer")
        has_b, has_r = self.budget is not None, self.ratio is not None
        check(p, has_b != has_r,
              f"give exactly one of budget / ratio (got budget={self.budget!r}, ratio={self.ratio!r})")
        size_ok = has_b != has_r
        if has_b:
            ok = _is_int(self.budget)
            check(p, ok, f"budget={self.budget!r} must be an integer")
            if ok:
                check(p, self.budget >= 1, f"budget={self.budget} must be >= 1")
                if n is not None and n_ok:
                    check(p, self.budget <= n, f"budget={self.budget} exceeds the number of samples n={n}; "
                          "lower budget or use ratio")
            size_ok = size_ok and ok and self.budget >= 1 and (n is None or not n_ok or self.budget <= n)
        if has_r:
            ok = _is_real(self.ratio) and math.isfinite(self.ratio) and 0 < self.ratio <= 1
            check(p, ok, f"ratio={self.ratio!r} must be in (0, 1]")
            if ok and n is not None and n_ok:
                check(p, n >= 1, f"ratio={self.ratio} of n={n} samples: there is nothing to select")
            size_ok = size_ok and ok and (n is None or not n_ok or n >= 1)
        check(p, _is_real(self.lam) and math.isfinite(self.lam) and self.lam >= 0,
              f"lam={self.lam!r} must be a finite number >= 0")
        check(p, _is_int(self.groups) and self.groups >= 1, f"groups={self.groups!r} (K) must be an integer >= 1")
        hp_ok = _is_real(self.hard_prune) and 0 <= self.hard_prune < 1
        check(p, hp_ok, f"hard_prune={self.hard_prune!r} must be in [0, 1) (0 disables)")
        check(p, _is_int(self.seed), f"seed={self.seed!r} must be an integer")
        # the budget against what is left after the hard prune, whenever those parts are sound
        if n is not None and n_ok and size_ok and hp_ok and self.uses_hard_prune() and self.hard_prune > 0:
            b = self.resolve_budget(n)
            left = n - _floor_fraction(self.hard_prune, n)
            check(p, b <= left,
                  f"budget={b} exceeds the {left} samples left after hard_prune={self.hard_prune} removes "
                  f"{n - left} of n={n}; lower hard_prune or the budget")
        if p:
            raise ConfigError(p, config="SelectionConfig")

    def resolve_budget(self, n: int) -> int:
        """The number of samples to select out of ``n``.

        Args:
            n: number of samples.

        Returns:
            ``budget`` when given, else ``max(1, floor(ratio * n))`` with ``ratio`` taken as
            the decimal written (so 0.29 of 100 is 29).

        Raises:
            ConfigError: when neither budget nor ratio is set.
        """
        if self.budget is not None:
            return int(self.budget)
        if self.ratio is None:
            raise ConfigError(["give exactly one of budget / ratio (both are None)"], config="SelectionConfig")
        return max(1, _floor_fraction(self.ratio, n))


@dataclass(frozen=True)
class StrataStats:
    """What Algorithm 2 did, per stratum (arrays of length K, stratum 0 = lowest scores).

    Attributes:
        edges: K+1 nominal stratum bounds, lo + (hi-lo)*k/K (display only; membership is
            computed without float edges, see :func:`stratified_select`).
        size: samples in each stratum (after the hard prune).
        budget: per-stratum budget floor(remaining / strata_left) when the stratum was
            visited (0 for empty strata, which are never visited).
        taken: samples drawn from each stratum, min(size, budget).
        order: rank in which strata were visited (smallest first; -1 = empty).
        n_hard_pruned: samples removed before stratifying.
        hard_prune_threshold: lowest score among the pruned samples (None when none).
    """

    edges: np.ndarray
    size: np.ndarray
    budget: np.ndarray
    taken: np.ndarray
    order: np.ndarray
    n_hard_pruned: int = 0
    hard_prune_threshold: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict (lists and plain numbers)."""
        return {
            "edges": [float(x) for x in self.edges],
            "size": [int(x) for x in self.size],
            "budget": [int(x) for x in self.budget],
            "taken": [int(x) for x in self.taken],
            "order": [int(x) for x in self.order],
            "n_hard_pruned": int(self.n_hard_pruned),
            "hard_prune_threshold": self.hard_prune_threshold,
        }


@dataclass(frozen=True)
class SelectionResult:
    """Output of :func:`select`.

    Attributes:
        indices: selected positions (sample_ids), sorted ascending, int64.
        groups: stratum of every sample, int64 of length n; -1 = in no stratum (hard
            pruned, or a method without strata).
        score: the array the method ranked or stratified by (length n), None for random.
        stats: per-stratum statistics for stratified methods, else None.
        method: the method that produced it.
    """

    indices: np.ndarray
    groups: np.ndarray
    score: np.ndarray | None
    stats: StrataStats | None
    method: str = ""


def _as_scores(x: object, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise DataError(f"score array must be 1-D, got shape {a.shape}", field=name)
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{int(bad.sum())} non-finite score(s) (NaN/inf), first at position {i}; "
                        "fix the scoring stage or drop those samples", field=name, value=float(a[i]))
    return a


def minmax(x: np.ndarray, *, field: str = "score") -> np.ndarray:
    """Min-max normalise to [0, 1].

    Args:
        x: 1-D scores.
        field: name used in error messages.

    Returns:
        float64 array; all zeros when ``x`` is constant (or empty).

    Raises:
        DataError: ``x`` is not 1-D or holds NaN/inf, naming ``field``.
    """
    a = _as_scores(x, field)
    if a.size == 0:
        return a.copy()
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.zeros_like(a)
    span = hi - lo
    if math.isfinite(span):
        out = (a - lo) / span
    else:  # range overflows float64: halve everything (exact) first
        out = (a * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)
    return np.clip(out, 0.0, 1.0)


def combine_scores(influence: np.ndarray, effort: np.ndarray, lam: float) -> np.ndarray:
    """DEALRec's overall score, minmax(influence) + lam * minmax(effort) (paper Eq. 13, normalised).

    Args:
        influence: per-sample influence scores (high = important).
        effort: per-sample effort scores (high = hard for the LLM).
        lam: weight of the effort term, >= 0.

    Returns:
        float64 array in [0, 1 + lam].

    Raises:
        DataError: NaN/inf values or different lengths.
        ConfigError: ``lam`` negative or not finite.
    """
    if not (_is_real(lam) and math.isfinite(lam) and lam >= 0):
        raise ConfigError([f"lam={lam!r} must be a finite number >= 0"], config="combine_scores")
    i = minmax(influence, field="influence")
    e = minmax(effort, field="effort")
    if i.shape != e.shape:
        raise DataError(f"influence has {i.size} scores but effort has {e.size}; both need one per sample",
                        field="effort")
    return i + float(lam) * e


def _assign_strata(s: np.ndarray, k: int) -> np.ndarray:
    """Stratum of each score: floor((s-lo)/(hi-lo) * K), clipped to K-1; no float edges.

    (s-lo)/(hi-lo) is monotone in s, exactly 0 at the min and exactly 1 at the max
    (x/x == 1 in IEEE arithmetic), so every score lands in exactly one of 0..K-1, the min
    in 0 and the max in K-1, whatever the rounding of (hi-lo)/K.
    """
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = float(s.min()), float(s.max())
    if hi == lo:
        return np.zeros(s.size, dtype=np.int64)
    span = hi - lo
    if math.isfinite(span):
        frac = (s - lo) / span
    else:
        frac = (s * 0.5 - lo * 0.5) / (hi * 0.5 - lo * 0.5)
    g = np.floor(np.clip(frac, 0.0, 1.0) * k).astype(np.int64)
    return np.minimum(g, k - 1)


def _hard_prune_order(scores: np.ndarray, n_prune: int) -> np.ndarray:
    """Positions of the ``n_prune`` highest scores (ties: lower position pruned first)."""
    if n_prune <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.arange(scores.size), -scores))
    return order[:n_prune].astype(np.int64)


def stratified_select(
    scores: np.ndarray,
    budget: int,
    groups: int,
    rng: np.random.Generator | int,
    *,
    hard_prune: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, StrataStats]:
    """Coverage-enhanced sample selection, paper Algorithm 2 (lines 5-10).

    1. Drop the ``floor(hard_prune * n)`` highest scores (ties: lower position first).
    2. Split the rest into K strata of equal score-range width over [min, max] of the
       remaining scores: stratum = min(floor((s - lo) / (hi - lo) * K), K - 1), so the
       max is in stratum K-1 and no sample falls between strata. All-equal scores go to
       stratum 0.
    3. Repeatedly visit the smallest non-empty stratum (ties: lower stratum first), draw
       min(|G|, floor(remaining_budget / strata_left)) of its samples uniformly without
       replacement, and remove it. Empty strata are skipped: the paper visits them first
       (they are smallest) and takes 0 from each, which yields the same selection.
       The total is exactly ``budget``: remaining <= samples left is invariant, and the
       last stratum gets floor(remaining / 1) = remaining.

    Args:
        scores: 1-D finite scores, one per sample.
        budget: samples to select, 0 <= budget <= n - floor(hard_prune * n).
        groups: K >= 1.
        rng: numpy Generator (or an int seed) for the draws within strata.
        hard_prune: fraction in [0, 1) of the highest scores removed first.

    Returns:
        (selected positions sorted ascending int64, stratum of each sample int64 with -1
        for hard-pruned ones, :class:`StrataStats`).

    Raises:
        DataError: scores not 1-D or not finite.
        ConfigError: budget / groups / hard_prune out of range (all problems at once).
    """
    s = _as_scores(scores, "score")
    n = s.size
    p: list[str] = []
    check(p, _is_int(groups) and groups >= 1, f"groups={groups!r} (K) must be an integer >= 1")
    hp_ok = _is_real(hard_prune) and 0 <= hard_prune < 1
    check(p, hp_ok, f"hard_prune={hard_prune!r} must be in [0, 1)")
    n_prune = _floor_fraction(hard_prune, n) if hp_ok else 0
    left = n - n_prune
    check(p, _is_int(budget) and 0 <= budget <= left,
          f"budget={budget!r} must be an integer in [0, {left}] (n={n}, {n_prune} hard-pruned)")
    if p:
        raise ConfigError(p, config="stratified_select")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    k = int(groups)

    group_of = np.full(n, -1, dtype=np.int64)
    pruned = _hard_prune_order(s, n_prune)
    keep = np.ones(n, dtype=bool)
    keep[pruned] = False
    kept = np.flatnonzero(keep)
    group_of[kept] = _assign_strata(s[kept], k)

    size = np.bincount(group_of[kept], minlength=k).astype(np.int64)
    members = [np.flatnonzero(group_of == g) for g in range(k)]  # ascending positions
    per_budget = np.zeros(k, dtype=np.int64)
    taken = np.zeros(k, dtype=np.int64)
    order = np.full(k, -1, dtype=np.int64)

    visit = [g for g in np.argsort(size, kind="stable") if size[g] > 0]  # smallest first, ties by stratum
    remaining = int(budget)
    chosen: list[np.ndarray] = []
    for rank, g in enumerate(visit):
        b = remaining // (len(visit) - rank)
        t = min(int(size[g]), b)
        per_budget[g], taken[g], order[g] = b, t, rank
        if t:
            chosen.append(gen.choice(members[g], size=t, replace=False))
        remaining -= t
    # the invariant of the docstring; a failure here is a bug, not bad input
    if remaining != 0:
        raise RuntimeError(f"stratified_select left {remaining} of budget {budget} unspent")

    selected = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    if kept.size:
        lo, hi = float(s[kept].min()), float(s[kept].max())
    else:
        lo = hi = 0.0
    t = np.arange(k + 1) / k
    edges = np.clip(lo * (1.0 - t) + hi * t, lo, hi)  # convex combination: no overflow for huge ranges
    edges[0], edges[-1] = lo, hi
    stats = StrataStats(
        edges=edges, size=size, budget=per_budget, taken=taken, order=order,
        n_hard_pruned=int(n_prune),
        hard_prune_threshold=float(s[pruned].min()) if n_prune else None,
    )
    return selected.astype(np.int64), group_of, stats


def _top(scores: np.ndarray, budget: int) -> np.ndarray:
    """Positions of the ``budget`` highest scores, sorted (ties: lower position wins)."""
    order = np.lexsort((np.arange(scores.size), -scores))
    return np.sort(order[:budget]).astype(np.int64)


def select(
    method: str,
    scores: Mapping[str, np.ndarray],
    cfg: SelectionConfig,
    *,
    n: int | None = None,
) -> SelectionResult:
    """Select a subset with one of the :data:`METHODS` (see the module docstring for each).

    Args:
        method: selector name; overrides ``cfg.method`` (so one config can drive several).
        scores: per-sample arrays by name: "influence", "effort", "grand", "el2n"; the ones
            the method needs must be present, all present ones must have length n.
        cfg: selection config; validated against n here.
        n: number of samples; needed only when ``scores`` is empty (method=random).

    Returns:
        :class:`SelectionResult` with exactly ``cfg.resolve_budget(n)`` indices.

    Raises:
        ConfigError: the config (with this method) is invalid for n; lists every problem.
        DataError: a required score array is missing (all missing ones named), arrays of
            different lengths, or NaN/inf in a used array.
    """
    if method != cfg.method:
        cfg = dataclasses.replace(cfg, method=method)
    lengths = {k: int(np.asarray(v).shape[0]) if np.asarray(v).ndim else -1 for k, v in scores.items()}
    if n is None:
        if not lengths:
            raise ConfigError(["no score arrays given: pass n= (the number of samples) for method=random"],
                              config="select")
        n = next(iter(lengths.values()))
    bad = {k: m for k, m in lengths.items() if m != n}
    if bad:
        raise DataError(f"every score array needs one value per sample (n={n}); lengths: {bad}",
                        field=", ".join(sorted(bad)))
    cfg.validate(n)
    missing = [k for k in REQUIRED_SCORES[method] if k not in scores or scores[k] is None]
    if missing:
        raise DataError(f"method {method!r} needs score array(s) {missing}; available: {sorted(scores)}",
                        field=", ".join(missing))
    b = cfg.resolve_budget(n)
    rng = np.random.default_rng(cfg.seed)
    no_groups = np.full(n, -1, dtype=np.int64)

    if method == "random":
        idx = np.sort(rng.choice(n, size=b, replace=False)).astype(np.int64)
        return SelectionResult(idx, no_groups, None, None, method)
    if method in ("grand", "el2n"):
        s = _as_scores(scores[method], method)
        return SelectionResult(_top(s, b), no_groups, s, None, method)
    if method == "greedy":
        s = combine_scores(scores["influence"], scores["effort"], cfg.lam)
        return SelectionResult(_top(s, b), no_groups, s, None, method)

    if method == "dealrec":
        s = combine_scores(scores["influence"], scores["effort"], cfg.lam)
    elif method == "influence-only":
        s = minmax(scores["influence"], field="influence")
    elif method == "effort-only":
        s = minmax(scores["effort"], field="effort")
    else:  # ccs: EL2N importance, beta = hard_prune, strata over raw EL2N
        s = _as_scores(scores["el2n"], "el2n")
    idx, groups, stats = stratified_select(s, b, cfg.groups, rng, hard_prune=cfg.hard_prune)
    return SelectionResult(idx, groups, s, stats, method)
