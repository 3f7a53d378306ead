"""Grounding generated text to catalogue items: chunked L2 top-K and duplicate-title expansion.

BIGRec grounds a generation by the L2 distance between its embedding and the embedding
of every item title. The authors' code builds a dense users x items distance matrix and
argsorts it (15 GB for Book). Here the search is chunked: queries are processed in
blocks of ``query_chunk`` rows and items in blocks of ``chunk`` rows, and a running
top-k is merged block by block, so memory is O(U*k + chunk*d + query_chunk*chunk) and
never U x I.

Ranking is defined to be exactly that of a *stable* dense argsort of squared L2
distances over all items: ascending distance, ties broken by the lower item index.

Duplicate titles. Items that share a title get the same embedding (the embedding is a
function of the title), so the search runs over the distinct titles and each retrieved
title is expanded to all of its items, in increasing item id, at consecutive positions.
Precisely: if distinct titles are ranked t1, t2, ... and title t has items
``members(t)`` (sorted), the grounded item list is members(t1) + members(t2) + ...,
truncated to K. This equals the stable dense argsort over the item-level embedding
matrix (identical rows tie and are ordered by item id), so every item of a retrieved
title counts, at the best positions still free, and metrics stay within [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.errors import ConfigError

__all__ = ["topk_l2", "TitleIndex", "index_titles", "expand_titles", "ground"]


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.from_numpy(np.require(x, requirements=["C", "W"]))


def topk_l2(
    queries,
    items,
    k: int,
    *,
    chunk: int = 4096,
    query_chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest items of every query by squared L2 distance, searched in chunks.

    Args:
        queries: ``[U, d]`` array or tensor.
        items: ``[I, d]`` array or tensor (same dtype family as ``queries``; both are
            computed in the wider of the two float dtypes).
        k: neighbours per query; clipped to ``I``.
        chunk: items per block (memory knob; the result does not depend on it).
        query_chunk: queries per block (memory knob; the result does not depend on it).

    Returns:
        ``(dist, idx)``: ``[U, min(k, I)]`` squared distances (ascending) and item indices,
        ordered exactly as a stable argsort of the dense distance matrix would order them
        (ties go to the lower item index).

    Raises:
        ConfigError: non-positive ``k``/``chunk``/``query_chunk`` or mismatched widths.
    """
    q, x = _as_tensor(queries), _as_tensor(items)
    problems = []
    if k <= 0 or chunk <= 0 or query_chunk <= 0:
        problems.append(f"k, chunk and query_chunk must be positive, got k={k}, chunk={chunk}, query_chunk={query_chunk}")
    if q.ndim != 2 or x.ndim != 2 or q.shape[1] != x.shape[1]:
        problems.append(f"queries [U, d] and items [I, d] must share d, got {tuple(q.shape)} and {tuple(x.shape)}")
    if problems:
        raise ConfigError(problems, config="topk_l2")
    dtype = torch.promote_types(q.dtype, x.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    q, x = q.to(dtype), x.to(dtype)
    n_items = x.shape[0]
    k = min(k, n_items)
    x_sq = (x * x).sum(1)
    out_d = torch.empty((q.shape[0], k), dtype=dtype)
    out_i = torch.empty((q.shape[0], k), dtype=torch.long)
    for qs in range(0, q.shape[0], query_chunk):
        qb = q[qs : qs + query_chunk]
        q_sq = (qb * qb).sum(1, keepdim=True)
        best_d = torch.empty((qb.shape[0], 0), dtype=dtype)
        best_i = torch.empty((qb.shape[0], 0), dtype=torch.long)
        for xs in range(0, n_items, chunk):
            xb = x[xs : xs + chunk]
            d = (q_sq - 2.0 * (qb @ xb.T) + x_sq[xs : xs + chunk][None, :]).clamp_min_(0)
            # Stable sorts keep equal distances in index order: running results (lower
            # indices, earlier chunks) come first in the concatenation, so ties resolve
            # to the lower item index exactly like a dense stable argsort.
            kk = min(k, d.shape[1])
            cd, ci = torch.sort(d, dim=1, stable=True)
            cd, ci = cd[:, :kk], ci[:, :kk] + xs
            md = torch.cat([best_d, cd], 1)
            mi = torch.cat([best_i, ci], 1)
            md, order = torch.sort(md, dim=1, stable=True)
            best_d, best_i = md[:, :k], torch.gather(mi, 1, order)[:, :k]
        out_d[qs : qs + qb.shape[0]] = best_d
        out_i[qs : qs + qb.shape[0]] = best_i
    return out_d.numpy(), out_i.numpy()


@dataclass(frozen=True)
class TitleIndex:
    """Distinct titles of a catalogue and the items behind each.

    Attributes:
        titles: the distinct titles, in order of their lowest item id.
        item_title: ``[I]`` index into ``titles`` for every item id.
        members: per distinct title, its item ids ascending.
    """

    titles: list[str]
    item_title: np.ndarray
    members: list[np.ndarray]

    @property
    def n_items(self) -> int:
        return int(self.item_title.shape[0])


def index_titles(titles: Sequence[str]) -> TitleIndex:
    """Group item ids (``0..I-1``, positions in ``titles``) by identical title string.

    Args:
        titles: the title of every item, indexed by item id.

    Returns:
        The :class:`TitleIndex`.
    """
    first: dict[str, int] = {}
    item_title = np.empty(len(titles), dtype=np.int64)
    members: list[list[int]] = []
    for item, t in enumerate(titles):
        u = first.get(t)
        if u is None:
            u = first[t] = len(members)
            members.append([])
        item_title[item] = u
        members[u].append(item)
    return TitleIndex(list(first), item_title, [np.asarray(m, dtype=np.int64) for m in members])


def expand_titles(title_ranks: np.ndarray, index: TitleIndex, k: int) -> np.ndarray:
    """Expand ranked distinct titles to the first ``k`` items (see module docstring).

    Args:
        title_ranks: ``[U, m]`` indices into ``index.titles``, best first.
        index: the catalogue's :class:`TitleIndex`.
        k: items to keep per user.

    Returns:
        ``[U, k']`` int64 item ids with ``k' = min(k, items reachable)``; every row has the
        same length because each title has at least one item and ``m >= min(k, titles)``
        is assumed (pass at least ``k`` titles).
    """
    title_ranks = np.asarray(title_ranks)
    rows = []
    for r in title_ranks:
        out: list[int] = []
        for t in r:
            out.extend(index.members[int(t)].tolist())
            if len(out) >= k:
                break
        rows.append(out[:k])
    width = min(len(r) for r in rows) if rows else 0
    return np.asarray([r[:width] for r in rows], dtype=np.int64).reshape(len(rows), width)


def ground(
    queries,
    title_embeddings,
    index: TitleIndex,
    k: int,
    *,
    chunk: int = 4096,
    query_chunk: int = 1024,
    exclude: Sequence[Sequence[int]] | None = None,
    pad: bool = False,
) -> np.ndarray:
    """Top-``k`` items per query: chunked L2 search over distinct titles, then expansion.

    With ``exclude``, the items of ``exclude[u]`` are dropped from user u's expanded list and
    the next items move up; the search over-fetches ``k + max |exclude[u]|`` titles per block
    of queries (each excluded item removes at most one item and every title has one), so the
    survivors are exactly the first ``k`` of the full ranking without them.

    Args:
        queries: ``[U, d]`` embeddings of the generated texts.
        title_embeddings: ``[T, d]`` embeddings of ``index.titles`` (one row per distinct title).
        index: the catalogue's :class:`TitleIndex`.
        k: items per user.
        chunk: titles per search block (memory knob only).
        query_chunk: queries per search block (memory knob only).
        exclude: per query, item ids never returned (None: nothing excluded).
        pad: return exactly ``k`` columns, -1 where fewer items remain.

    Returns:
        ``[U, min(k, I)]`` item ids, best first (``[U, k]`` with ``pad`` or ``exclude``,
        -1-padded).

    Raises:
        ConfigError: ``title_embeddings`` has a row count other than ``len(index.titles)``, or
            ``exclude`` has another length than ``queries``.
    """
    if len(title_embeddings) != len(index.titles):
        raise ConfigError(
            [f"title_embeddings has {len(title_embeddings)} rows but the index has {len(index.titles)} distinct titles"],
            config="ground",
        )
    if exclude is None:
        # k distinct titles always cover k items (every title has >= 1 item).
        _, t_idx = topk_l2(queries, title_embeddings, min(k, len(index.titles)), chunk=chunk,
                           query_chunk=query_chunk)
        got = expand_titles(t_idx, index, k)
        if not pad or got.shape[1] == k:
            return got
        out = np.full((got.shape[0], k), -1, dtype=np.int64)
        out[:, :got.shape[1]] = got
        return out
    n = len(queries)
    if len(exclude) != n:
        raise ConfigError([f"exclude has {len(exclude)} rows but there are {n} queries"], config="ground")
    out = np.full((n, k), -1, dtype=np.int64)
    for s in range(0, n, query_chunk):
        ex = [{int(x) for x in exclude[u]} for u in range(s, min(n, s + query_chunk))]
        m = min(len(index.titles), k + max((len(e) for e in ex), default=0))
        _, t_idx = topk_l2(queries[s:s + query_chunk], title_embeddings, m, chunk=chunk, query_chunk=query_chunk)
        for r, (row, e) in enumerate(zip(t_idx, ex)):
            kept: list[int] = []
            for t in row:
                kept.extend(int(i) for i in index.members[int(t)] if int(i) not in e)
                if len(kept) >= k:
                    break
            kept = kept[:k]
            out[s + r, :len(kept)] = kept
    return out
