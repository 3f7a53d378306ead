"""One evaluator for every LLM backend: the users of a valid/test period ranked through
``backend.rank_items``, multi-target Recall/NDCG@K, per-user values for paired bootstrap CIs.

Protocol (docs/method.md#samples):

- users: every user of the split with at least one target (users without items in the period
  are skipped, not scored 0); with ``max_users`` a seeded random subset (the draw of
  :func:`engine.llm.textrec.evaluate`, so a subset of the same size and seed is the same users
  whichever backend or job evaluates it), kept in split order;
- history = the split's ``history`` column (every item before the period), oldest first; the
  backend decides how much of it a prompt shows;
- targets = all the user's items in the period (multi-target, :mod:`engine.metrics`);
- seen items: the history is excluded from the ranking (the protocol's default); with
  ``exclude_history=False`` nothing is (BIGRec's original evaluation);
- ranking: ``backend.rank_items(model, histories, max(ks), exclude=...)`` on blocks of
  ``user_batch`` users, or any ``rank(histories, exclude, k)`` function (the evaluate job passes
  a Ray Data actor pool there).

BIGRec's generation + grounding now lives behind
:meth:`engine.llm.bigrec.backend.BigRecBackend.rank_items` (:mod:`engine.llm.bigrec.generate`);
the names that used to be here (``generate_texts``, ``embed_texts``, ``cached_title_embeddings``,
``score_generations``, ``eval_requests``, ...) still resolve, from there.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, check
from engine.metrics import DEFAULT_KS, recall_ndcg

__all__ = ["EvalConfig", "eval_users", "score_rankings", "rank_in_blocks", "evaluate_backend"]

#: second word of the seed of the user subset (the same draw as engine.llm.textrec.evaluate)
SUBSET_SALT = 0xE7A1

RankFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]], int], np.ndarray]


@dataclass
class EvalConfig:
    """Evaluation of one model on the valid or test period (validated up front)."""

    data: str = field(metadata={"help": "prepared data folder"})
    split: str = field(default="test", metadata={"help": "valid | test"})
    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata={"help": "cut-offs K of Recall/NDCG@K"})
    max_users: int | None = field(default=None, metadata={"help": "evaluate a seeded subset of this many users"})
    seed: int = field(default=0, metadata={"help": "seed of the user subset"})
    exclude_history: bool = field(default=True, metadata={"help": "never recommend a history item"})
    user_batch: int = field(default=64, metadata={"help": "users per rank_items call"})

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        p: list[str] = []
        check(p, self.split in ("valid", "test"), f"split={self.split!r} must be 'valid' or 'test'")
        check(p, len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"ks={self.ks!r} must be positive integers")
        check(p, self.max_users is None or (isinstance(self.max_users, int) and self.max_users >= 1),
              f"max_users={self.max_users!r} must be null or >= 1")
        check(p, isinstance(self.seed, int) and not isinstance(self.seed, bool), f"seed={self.seed!r} must be an int")
        check(p, isinstance(self.exclude_history, bool), f"exclude_history={self.exclude_history!r} must be a bool")
        check(p, isinstance(self.user_batch, int) and not isinstance(self.user_batch, bool) and self.user_batch >= 1,
              f"user_batch={self.user_batch!r} must be an int >= 1")
        if not Path(self.data).is_dir():
            p.append(f"data folder {self.data!r} does not exist; run `dealrec prepare` first")
        if p:
            raise ConfigError(p, config="EvalConfig")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d


def eval_users(split_table, *, max_users: int | None = None, seed: int = 0) -> dict:
    """The users of a valid/test table that have targets, optionally a seeded subset.

    Args:
        split_table: a valid/test table (``user_id``, ``history``, ``targets``).
        max_users: keep a seeded random subset of this many users (in table order).
        seed: seed of the subset.

    Returns:
        ``{"user_id": [str], "history": [[item ids]], "targets": [[item ids]]}``.
    """
    uids = split_table.column("user_id").to_pylist()
    hist = split_table.column("history").to_pylist()
    tg = split_table.column("targets").to_pylist()
    rows = [i for i in range(len(uids)) if len(tg[i]) > 0]
    if max_users is not None and max_users < len(rows):
        rng = np.random.default_rng(np.random.SeedSequence([seed, SUBSET_SALT]))
        rows = sorted(rng.choice(rows, size=max_users, replace=False).tolist())
    return {"user_id": [uids[i] for i in rows], "history": [list(hist[i]) for i in rows],
            "targets": [list(tg[i]) for i in rows]}


def score_rankings(ranked, targets: Sequence[Sequence[int]], *, ks: Sequence[int] = DEFAULT_KS) -> tuple[dict, dict]:
    """Multi-target Recall/NDCG@K of rankings, averaged and per user.

    Args:
        ranked: ``[U, k]`` item ids per user, best first (-1 = no item).
        targets: per user, the period's item ids (each user has at least one).
        ks: cut-offs.

    Returns:
        ``(metrics, per_user)``: the :func:`engine.metrics.recall_ndcg` dict and
        ``{"recall@K"/"ndcg@K": float64 [U]}`` (each user's own value; their mean is the metric).
    """
    ranked = [list(r) for r in ranked]
    metrics = recall_ndcg(ranked, targets, ks=ks)
    per_user = {f"{m}@{k}": np.zeros(len(ranked)) for k in ks for m in ("recall", "ndcg")}
    for u, (r, t) in enumerate(zip(ranked, targets)):
        one = recall_ndcg([r], [t], ks=ks)
        for key in per_user:
            per_user[key][u] = one[key]
    return metrics, per_user


def rank_in_blocks(backend, model, *, user_batch: int = 64) -> RankFn:
    """``rank(histories, exclude, k)``: ``backend.rank_items`` on blocks of ``user_batch`` users."""

    def rank(histories, exclude, k):
        out = np.full((len(histories), k), -1, dtype=np.int64)
        for s in range(0, len(histories), user_batch):
            got = np.asarray(backend.rank_items(model, histories[s:s + user_batch], k,
                                                exclude=exclude[s:s + user_batch]), dtype=np.int64)
            out[s:s + got.shape[0], :got.shape[1]] = got
        return out

    return rank


def evaluate_backend(backend, model, data, split: str = "test", *, ks: Sequence[int] = DEFAULT_KS,
                     max_users: int | None = None, seed: int = 0, exclude_history: bool = True,
                     user_batch: int = 64, rank: RankFn | None = None) -> dict:
    """Rank the users of a period through a backend and score the rankings.

    Args:
        backend: an :class:`engine.llm.protocol.LLMBackend` (unused when ``rank`` is given).
        model: its model, e.g. ``backend.load_model(adapter)`` (unused when ``rank`` is given).
        data: a prepared folder (its ``split`` is read) or the split's table itself.
        split: ``"valid"`` or ``"test"`` (when ``data`` is a folder).
        ks: cut-offs.
        max_users: a seeded subset of this many users (see :func:`eval_users`).
        seed: seed of the subset.
        exclude_history: exclude each user's history items from the ranking.
        user_batch: users per ``rank_items`` call.
        rank: ``(histories, exclude, k) -> [U, k]``; default :func:`rank_in_blocks`.

    Returns:
        ``{"metrics": {"recall@K", "ndcg@K", "users"}, "per_user": {metric: float64 [U]},
        "user_ids": [str], "ranked": int64 [U, max(ks)], "timings": {"rank_s", "per_user_s",
        "total_s"}}``.

    Raises:
        DataError: the folder or split is missing or malformed.
    """
    t0 = time.perf_counter()
    if isinstance(data, (str, os.PathLike)):
        from engine.data.schema import read_split

        table = read_split(data, split)
    else:
        table = data
    users = eval_users(table, max_users=max_users, seed=seed)
    hist = users["history"]
    exclude = hist if exclude_history else [[] for _ in hist]
    k = max(int(x) for x in ks)
    rank = rank or rank_in_blocks(backend, model, user_batch=user_batch)
    t1 = time.perf_counter()
    ranked = np.asarray(rank(hist, exclude, k), dtype=np.int64).reshape(len(hist), k) if hist else \
        np.zeros((0, k), dtype=np.int64)
    t2 = time.perf_counter()
    metrics, per_user = score_rankings(ranked, users["targets"], ks=ks)
    return {"metrics": metrics, "per_user": per_user, "user_ids": users["user_id"], "ranked": ranked,
            "timings": {"rank_s": t2 - t1, "per_user_s": (t2 - t1) / max(1, len(hist)),
                        "total_s": time.perf_counter() - t0}}


#: names of BIGRec's generation pieces that lived here before the backend refactor (issue 18)
_MOVED = {name: "engine.llm.bigrec.generate" for name in (
    "eval_requests", "generate_texts", "embed_texts", "clean_generation", "base_fingerprint", "title_cache_path",
    "cached_title_embeddings", "score_generations")}


def __getattr__(name: str):
    if name in _MOVED:  # resolved on use, so importing the generic evaluator loads no BIGRec code
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
