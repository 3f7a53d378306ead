"""Ranking: item and user embeddings (items cached per model state), chunked top-K with seen items
excluded, and multi-target Recall/NDCG on a prepared split (:func:`evaluate`)."""

from __future__ import annotations

import hashlib
import os
import time
import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import ConfigError, check
from engine.grounding import topk_l2
from engine.metrics import DEFAULT_KS, recall_ndcg
from engine.llm.textrec.config import TextRecConfig
from engine.llm.textrec.model import TextRecModel
from engine.llm.textrec.text import Catalogue, _as_catalogue, _pad, _pad_id, _tokenize_titles, tokenize_users


_ITEM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _encode_texts(model: TextRecModel, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    pad = _pad_id(model.tokenizer)
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths together: little padding
    out = torch.empty((len(seqs), 0))
    chunks = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = _pad([seqs[i] for i in idx], pad)
            chunks.append((idx, model.encode(ids.to(dev), mask.to(dev)).cpu()))
    model.train(was)
    if chunks:
        out = torch.empty((len(seqs), chunks[0][1].shape[1]), dtype=torch.float32)
        for idx, e in chunks:
            out[torch.as_tensor(idx)] = e
    return out


def encode_items(model: TextRecModel, titles) -> torch.Tensor:
    """Embeddings ``[I, d]`` of every item (distinct titles encoded once), cached per model state.

    The cache is keyed by the catalogue and a hash of the trainable parameters, so an optimiser
    step invalidates it; one entry per model is kept.

    Args:
        model: a :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.

    Returns:
        float32 CPU tensor [I, d], L2-normalised rows (items sharing a title share a row value).
    """
    cat = _as_catalogue(titles)
    key = (cat.key(), _state_key(model))
    hit = _ITEM_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    seqs = _tokenize_titles(model.tokenizer, cat.index.titles, model.cfg)
    emb = _encode_texts(model, seqs, model.cfg.encode_batch_size)[torch.from_numpy(cat.index.item_title)]
    _ITEM_CACHE[model] = (key, emb)
    return emb


def encode_users(model: TextRecModel, histories_titles: Sequence[Sequence[str]]) -> torch.Tensor:
    """Embed users from their history titles (no grad, batched by similar length).

    Args:
        model: a :class:`TextRecModel`.
        histories_titles: per user, history titles oldest first (truncated as :func:`tokenize_users`).

    Returns:
        float32 CPU tensor ``[U, d]`` of unit rows.
    """
    seqs = tokenize_users(model.tokenizer, histories_titles, model.cfg)
    return _encode_texts(model, seqs, max(1, model.cfg.encode_batch_size // 4))


def _topk_excluding(users: torch.Tensor, items: torch.Tensor, k: int, exclude: Sequence[Sequence[int]],
                    *, query_chunk: int = 256, chunk: int = 4096) -> np.ndarray:
    """Top-k items by cosine per user with ``exclude[u]`` removed; -1 pads short rows."""
    U, I = users.shape[0], items.shape[0]
    out = np.full((U, k), -1, dtype=np.int64)
    for s in range(0, U, query_chunk):
        ex = [set(int(x) for x in exclude[u]) for u in range(s, min(U, s + query_chunk))]
        extra = max((len(e) for e in ex), default=0)
        # Over-fetch by the largest exclusion set of the block, then drop excluded items:
        # topk_l2 keeps exact (stable) order, so the first k survivors are the exact top-k.
        _, idx = topk_l2(users[s:s + query_chunk], items, min(I, k + extra), chunk=chunk, query_chunk=query_chunk)
        for r, (row, e) in enumerate(zip(idx, ex)):
            kept = [int(j) for j in row if int(j) not in e][:k]
            out[s + r, :len(kept)] = kept
    return out


def rank_items(model: TextRecModel, titles, histories: Sequence[Sequence[int]], k: int, *,
               exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Full-catalogue top-``k`` items per user by cosine, seen items excluded, chunked.

    Args:
        model: a :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.
        histories: per user, history item ids oldest first (they build the user text).
        k: items per user.
        exclude: per user, item ids never recommended (default: the user's history).

    Returns:
        int64 array [U, k], best first; ties go to the lower item id; rows are padded with -1 when
        fewer than ``k`` items remain.

    Raises:
        ConfigError: ``k < 1`` or ``exclude`` of another length than ``histories``.
    """
    cat = _as_catalogue(titles)
    exclude = histories if exclude is None else exclude
    p: list[str] = []
    check(p, isinstance(k, int) and k >= 1, f"k={k!r}: must be an int >= 1")
    check(p, len(exclude) == len(histories), f"exclude has {len(exclude)} users, histories {len(histories)}")
    if p:
        raise ConfigError(p, config="rank_items")
    items = encode_items(model, cat)
    users = encode_users(model, [[cat.titles[int(j)] for j in h] for h in histories])
    return _topk_excluding(users, items, k, exclude)


def evaluate(model: TextRecModel, data_dir: str | os.PathLike, split: str, cfg: TextRecConfig | None = None, *,
             max_users: int | None = None, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Multi-target Recall/NDCG@K on a prepared folder's ``valid``/``test`` split.

    History = the split's ``history`` column (every earlier item); targets = its ``targets``;
    users without targets are skipped (not scored 0); seen items are excluded from the ranking.

    Args:
        model: a :class:`TextRecModel`.
        data_dir: a prepared folder (:mod:`engine.data.schema`).
        split: ``"valid"`` or ``"test"``.
        cfg: ``seed`` picks the user subset (default: ``model.cfg``).
        max_users: evaluate a seeded random subset of this many users (all when None).
        ks: cut-offs.

    Returns:
        ``recall@K``/``ndcg@K`` averages and ``users`` (as :func:`engine.metrics.recall_ndcg`),
        plus ``per_user`` ({metric: float64 array [users]}, for paired bootstrap CIs),
        ``user_ids`` (list of str, same order), ``seconds_items``, ``seconds_users``,
        ``seconds_per_user`` and ``seconds`` (wall times).

    Raises:
        DataError: the folder or split is missing or malformed.
    """
    from engine.data.schema import read_items, read_split

    cfg = cfg or model.cfg
    t0 = time.perf_counter()
    items = read_items(data_dir)
    cat = Catalogue.from_titles(items.column("title").to_pylist())
    t = read_split(data_dir, split)
    uids = t.column("user_id").to_pylist()
    hist = t.column("history").to_pylist()
    tg = t.column("targets").to_pylist()
    rows = [i for i in range(len(uids)) if len(tg[i]) > 0]
    if max_users is not None and max_users < len(rows):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7A1]))
        rows = sorted(rng.choice(rows, size=max_users, replace=False).tolist())
    t1 = time.perf_counter()
    item_emb = encode_items(model, cat)
    t2 = time.perf_counter()
    H = [hist[i] for i in rows]
    users = encode_users(model, [[cat.titles[int(j)] for j in h] for h in H])
    ranked = _topk_excluding(users, item_emb, max(ks), H)
    t3 = time.perf_counter()
    targets = [tg[i] for i in rows]
    res: dict = recall_ndcg(ranked, targets, ks=ks)
    per_user = {f"{m}@{k}": np.zeros(len(rows)) for k in ks for m in ("recall", "ndcg")}
    for u, (r, tt) in enumerate(zip(ranked, targets)):
        one = recall_ndcg([r], [tt], ks=ks)
        for key in per_user:
            per_user[key][u] = one[key]
    res.update(per_user=per_user, user_ids=[uids[i] for i in rows], seconds_items=t2 - t1,
               seconds_users=t3 - t2, seconds_per_user=(t3 - t2) / max(1, len(rows)),
               seconds=time.perf_counter() - t0)
    return res
