"""Multi-target top-K metrics: Recall@K and NDCG@K, averaged over users with targets.

Definitions (paper section 4.1.2, multi-target form used by the DEALRec/BIGRec code):

- ``targets`` of a user are the distinct items of that user in the evaluation period
  (duplicates are counted once); users without targets are skipped, not scored 0.
- ``ranked`` is the user's grounded item list, best first (positions 1, 2, ...).
- Recall@K = |top-K ∩ targets| / |targets|.
- NDCG@K = DCG@K / IDCG@K with DCG@K = sum over positions p <= K holding a target of
  1 / log2(p + 1), and IDCG@K the same sum for an ideal list, i.e. over positions
  1..min(|targets|, K). Both lie in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from engine.errors import ConfigError

__all__ = ["DEFAULT_KS", "recall_ndcg", "format_table"]

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 50)


def _user_scores(ranked: Sequence[int], targets: set[int], ks: Sequence[int]) -> tuple[list[float], list[float]]:
    kmax = max(ks)
    hit_pos = [p for p, item in enumerate(list(ranked)[:kmax], start=1) if int(item) in targets]
    recalls, ndcgs = [], []
    for k in ks:
        hits = [p for p in hit_pos if p <= k]
        recalls.append(len(hits) / len(targets))
        dcg = sum(1.0 / math.log2(p + 1) for p in hits)
        idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(targets), k) + 1))
        ndcgs.append(dcg / idcg)
    return recalls, ndcgs


def recall_ndcg(
    ranked: Iterable[Sequence[int]],
    targets: Iterable[Iterable[int]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Average multi-target Recall@K and NDCG@K over users that have targets.

    Args:
        ranked: per user, item ids best first (at least ``max(ks)`` long to score every K;
            a shorter list simply has no hits beyond its end).
        targets: per user, the item ids of the evaluation period (duplicates counted once).
        ks: cut-offs, positive integers.

    Returns:
        ``{"recall@K": ..., "ndcg@K": ... for each K, "users": n}`` where ``users`` is the
        number of users with at least one target (the denominator of every average).

    Raises:
        ConfigError: ``ks`` empty or not positive, or ``ranked`` and ``targets`` differ in length.
    """
    ks = [int(k) for k in ks]
    problems = []
    if not ks or any(k <= 0 for k in ks):
        problems.append(f"ks must be positive integers, got {ks!r}")
    ranked, targets = list(ranked), list(targets)
    if len(ranked) != len(targets):
        problems.append(f"ranked has {len(ranked)} users but targets has {len(targets)}")
    if problems:
        raise ConfigError(problems, config="metrics")
    rec = np.zeros(len(ks))
    ndcg = np.zeros(len(ks))
    n = 0
    for r, t in zip(ranked, targets):
        tset = {int(x) for x in t}
        if not tset:
            continue
        rr, nn = _user_scores(r, tset, ks)
        rec += rr
        ndcg += nn
        n += 1
    out: dict[str, float] = {}
    for i, k in enumerate(ks):
        out[f"recall@{k}"] = float(rec[i] / n) if n else 0.0
        out[f"ndcg@{k}"] = float(ndcg[i] / n) if n else 0.0
    out["users"] = n
    return out


def format_table(metrics: dict[str, float], *, ks: Sequence[int] = DEFAULT_KS) -> str:
    """A fixed-width text table (one row per K) of a :func:`recall_ndcg` result.

    Args:
        metrics: the dict returned by :func:`recall_ndcg`.
        ks: the cut-offs to show, in order.

    Returns:
        The table as a string, ending without a newline.
    """
    lines = [f"{'K':>4}  {'Recall@K':>10}  {'NDCG@K':>10}"]
    for k in ks:
        lines.append(f"{k:>4}  {metrics.get(f'recall@{k}', float('nan')):>10.4f}  {metrics.get(f'ndcg@{k}', float('nan')):>10.4f}")
    lines.append(f"users with targets: {int(metrics.get('users', 0))}")
    return "\n".join(lines)
