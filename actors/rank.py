"""Ray Data callables of the evaluate job, for any registered backend: ``Ranker`` holds one
backend replica and ranks each batch of users through ``backend.rank_items``; ``TitleEmbedder``
fills a backend's title-embedding disk cache (BIGRec: base-model embeddings of every distinct
title) before the rankers start, so the pool embeds the catalogue once, in parallel, instead of
every ranker embedding all of it. Each builds its replica once in ``__init__`` and delegates in
``__call__``; turn them into actor pools with ``ds.map_batches(Ranker, fn_constructor_kwargs=...,
compute=ActorPoolStrategy(size=n), **actor_resources(...))``.
"""

from __future__ import annotations

import numpy as np

from engine.llm import get_backend

__all__ = ["Ranker", "TitleEmbedder", "actor_resources"]


def actor_resources(*, use_gpu: bool, cpus: float = 0.5) -> dict:
    """``map_batches`` resources of one model actor.

    One GPU each where GPUs exist; on CPU a fractional CPU, so that the read tasks of the
    pipeline still get a CPU (a pool that takes every CPU starves its own reads and hangs).
    """
    return {"num_gpus": 1} if use_gpu else {"num_cpus": cpus}


def _resolve(obj):
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def _replica(backend: str, titles, options, *, use_gpu: bool):
    import torch

    if not use_gpu:
        torch.set_num_threads(1)
    return get_backend(backend, [str(t) for t in _resolve(titles)], **(_resolve(options) or {}))


class Ranker:
    """One backend replica with its evaluation model; ranks batches of users.

    Args:
        backend: a key of :data:`engine.llm.BACKENDS`.
        titles: item titles by item id (or an ObjectRef to them, resolved once here).
        options: the backend's keyword options (or an ObjectRef).
        adapter: the fine-tuned adapter folder (``backend.load_model(adapter)``), or None.
        k: items per user.
        use_gpu: place the replica on this actor's GPU.

    Input batch columns: ``row`` (int), ``history`` and ``exclude`` (item ids). Output: ``row``,
    ``ranked`` ([B, k] int64, best first, -1 = no item).
    """

    def __init__(self, *, backend: str, titles, options, adapter: str | None, k: int, use_gpu: bool = False):
        self.backend = _replica(backend, titles, options, use_gpu=use_gpu)
        self.model = self.backend.load_model(adapter, device="cuda" if use_gpu else "cpu")
        self.k = int(k)

    def __call__(self, batch: dict) -> dict:
        hist = [[int(i) for i in h] for h in batch["history"]]
        ex = [[int(i) for i in e] for e in batch["exclude"]]
        ranked = np.asarray(self.backend.rank_items(self.model, hist, self.k, exclude=ex), dtype=np.int64)
        out = np.full((len(hist), self.k), -1, dtype=np.int64)
        out[:, :ranked.shape[1]] = ranked
        return {"row": np.asarray(batch["row"]), "ranked": out}


class TitleEmbedder:
    """``backend.embed_titles`` with the base model (no adapter) of one replica.

    Args:
        backend, titles, options, use_gpu: as :class:`Ranker`.

    Input batch columns: ``title_idx`` (int), ``title`` (str). Output: ``title_idx``,
    ``embedding`` ([B, d] float32).
    """

    def __init__(self, *, backend: str, titles, options, use_gpu: bool = False):
        self.backend = _replica(backend, titles, options, use_gpu=use_gpu)
        self.model = self.backend.load_model(None, device="cuda" if use_gpu else "cpu")

    def __call__(self, batch: dict) -> dict:
        emb = self.backend.embed_titles(self.model, [str(t) for t in batch["title"]])
        return {"title_idx": np.asarray(batch["title_idx"]), "embedding": np.asarray(emb, dtype=np.float32)}
