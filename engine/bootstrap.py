"""Paired per-user bootstrap: is method B better than method A on the same test users?

Both arrays hold one metric value per test user (e.g. NDCG@20 from
:func:`engine.llm.textrec.evaluate`'s ``per_user``), for the SAME users in the same order.
Users are resampled with replacement; every resample keeps the pairing (user u's A and B
values travel together), so the user-to-user spread that both methods share cancels out of
the difference (a paired test, far tighter than comparing two independent CIs).

Reported, for ``rel_diff = (mean_b - mean_a) / mean_a`` (B relative to A, e.g. DEALRec
relative to random):

* ``ci_low`` / ``ci_high``: the percentile interval of the bootstrap distribution of
  ``rel_diff`` (``ci`` coverage, 0.95 by default);
* ``p_value``: two-sided, from the bootstrap distribution of the difference of means
  ``d* = mean(b*) - mean(a*)``: ``p = min(1, 2 * min(P(d* <= 0), P(d* >= 0)))`` with the
  ``(count + 1) / (n_boot + 1)`` correction, so it is never exactly 0 and is 1 when the two
  arrays are identical (every ``d*`` is 0). It is the smallest two-sided level at which the
  percentile interval of ``d*`` excludes 0 (bootstrap-percentile duality).

:func:`seed_pooled` does the same for several training seeds: arrays ``[seeds, users]``,
users resampled jointly across seeds (one index draw applied to every seed), the statistic
being the mean over seeds and users. Seed-to-seed training noise then counts as part of
each user's value, which is what a reader of "mean over 3 seeds" wants.

Pure numpy, seeded; memory is bounded by drawing resamples in blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.errors import ConfigError, check

__all__ = ["paired_bootstrap", "seed_pooled"]

_BLOCK_CELLS = 4_000_000  # index cells drawn at once (~32 MB of int64)


def _check_args(n_boot, ci, problems: list[str]) -> None:
    check(problems, isinstance(n_boot, (int, np.integer)) and not isinstance(n_boot, bool) and n_boot >= 1,
          f"n_boot={n_boot!r}: must be an int >= 1 (e.g. 2000)")
    check(problems, isinstance(ci, float) and 0 < ci < 1, f"ci={ci!r}: must be a float in (0, 1), e.g. 0.95")


def _as_matrix(runs, name: str, problems: list[str]) -> np.ndarray | None:
    try:
        if isinstance(runs, np.ndarray):
            m = np.asarray(runs, dtype=np.float64)
        else:
            rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in runs]
            lens = {len(r) for r in rows}
            if len(lens) > 1:
                problems.append(f"{name}: seeds hold different numbers of users {sorted(lens)}; "
                                "evaluate every seed on the same users")
                return None
            m = np.stack(rows) if rows else np.zeros((0, 0))
    except (TypeError, ValueError) as e:
        problems.append(f"{name}: not numeric per-user arrays ({e})")
        return None
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0:
        problems.append(f"{name}: expected [seeds, users] values with at least one user, got shape {m.shape}")
        return None
    if not np.all(np.isfinite(m)):
        problems.append(f"{name}: holds nan/inf values; per-user metrics must be finite")
        return None
    return m


def _boot(a: np.ndarray, b: np.ndarray, *, n_boot: int, seed: int, ci: float) -> dict:
    """Core: a, b are [S, U] matrices; resample the U users jointly for every seed."""
    S, U = a.shape
    mean_a, mean_b = float(a.mean()), float(b.mean())
    # Per-user sums over seeds: resampling users then averaging over (seeds, users) only needs these.
    sa, sb = a.sum(0), b.sum(0)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB007]))
    ma = np.empty(n_boot)
    mb = np.empty(n_boot)
    block = max(1, _BLOCK_CELLS // U)
    for s in range(0, n_boot, block):
        k = min(block, n_boot - s)
        idx = rng.integers(0, U, size=(k, U))
        ma[s:s + k] = sa[idx].sum(1) / (S * U)
        mb[s:s + k] = sb[idx].sum(1) / (S * U)
    d = mb - ma
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ma != 0, d / ma, np.nan)
    lo_q, hi_q = 100 * (1 - ci) / 2, 100 * (1 + ci) / 2
    finite = rel[np.isfinite(rel)]
    if mean_a != 0 and finite.size:
        ci_low, ci_high = (float(x) for x in np.percentile(finite, [lo_q, hi_q]))
        rel_diff = (mean_b - mean_a) / mean_a
    else:  # A scores 0 everywhere (or in almost every resample): a relative change is undefined
        ci_low = ci_high = rel_diff = float("nan")
    le, ge = int(np.sum(d <= 0)), int(np.sum(d >= 0))
    p = min(1.0, 2 * min((le + 1) / (n_boot + 1), (ge + 1) / (n_boot + 1)))
    d_lo, d_hi = (float(x) for x in np.percentile(d, [lo_q, hi_q]))
    return {"mean_a": mean_a, "mean_b": mean_b, "rel_diff": float(rel_diff), "ci_low": ci_low,
            "ci_high": ci_high, "p_value": float(p), "diff": mean_b - mean_a, "diff_ci_low": d_lo,
            "diff_ci_high": d_hi, "users": U, "seeds": S, "n_boot": int(n_boot), "ci": ci,
            "rel_valid_fraction": float(finite.size / n_boot)}


def paired_bootstrap(a_per_user: Sequence[float] | np.ndarray, b_per_user: Sequence[float] | np.ndarray, *,
                     n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Paired bootstrap of B against A over the same users.

    Args:
        a_per_user: per-user metric of the reference method (e.g. random selection).
        b_per_user: per-user metric of the compared method, same users, same order.
        n_boot: bootstrap resamples.
        seed: seeds the resampling (the result is a pure function of the inputs and seed).
        ci: coverage of the percentile interval.

    Returns:
        ``{"mean_a", "mean_b", "rel_diff" ((b-a)/a of the means), "ci_low", "ci_high" (percentile CI
        of rel_diff), "p_value" (two-sided, from the bootstrap distribution of mean(b)-mean(a)),
        "diff", "diff_ci_low", "diff_ci_high" (the absolute difference and its CI), "users", "seeds"
        (1), "n_boot", "ci", "rel_valid_fraction" (resamples where mean(a*) != 0)}``. ``rel_diff`` and
        its CI are nan when ``mean_a`` is 0.

    Raises:
        ConfigError: arrays of different lengths, empty, non-finite; bad ``n_boot`` / ``ci``.
    """
    p: list[str] = []
    a = _as_matrix([a_per_user], "a_per_user", p)
    b = _as_matrix([b_per_user], "b_per_user", p)
    if a is not None and b is not None:
        check(p, a.shape == b.shape, f"a_per_user has {a.shape[1]} users, b_per_user {b.shape[1]}: "
              "pair the same users in the same order")
    _check_args(n_boot, ci, p)
    if p:
        raise ConfigError(p, config="paired_bootstrap")
    return _boot(a, b, n_boot=int(n_boot), seed=seed, ci=ci)


def seed_pooled(a_runs: Sequence[Sequence[float]] | np.ndarray, b_runs: Sequence[Sequence[float]] | np.ndarray, *,
                n_boot: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Paired bootstrap over several seeds: users resampled jointly across seeds.

    Args:
        a_runs: ``[seeds, users]``: per seed, the reference method's per-user metric.
        b_runs: ``[seeds, users]``: the compared method, same seeds (paired by position) and users.
        n_boot, seed, ci: as :func:`paired_bootstrap`.

    Returns:
        As :func:`paired_bootstrap`, with means over every (seed, user) cell and ``seeds`` = S. With
        one seed the result equals :func:`paired_bootstrap` of that seed exactly.

    Raises:
        ConfigError: shapes differ (seeds or users), seeds of unequal user counts, empty, non-finite.
    """
    p: list[str] = []
    a = _as_matrix(a_runs, "a_runs", p)
    b = _as_matrix(b_runs, "b_runs", p)
    if a is not None and b is not None:
        check(p, a.shape == b.shape, f"a_runs has shape {a.shape} (seeds, users), b_runs {b.shape}: "
              "give the same seeds and users for both methods")
    _check_args(n_boot, ci, p)
    if p:
        raise ConfigError(p, config="seed_pooled")
    return _boot(a, b, n_boot=int(n_boot), seed=seed, ci=ci)
