"""Ray Data callables for BIGRec evaluation: generation (+ embedding of the answer) and
item-title embedding. Each builds its model replica once in ``__init__`` and delegates
to engine.evaluate in ``__call__``; turn them into actor pools with
``ds.map_batches(Generator, fn_constructor_kwargs=..., compute=ActorPoolStrategy(size=n),
**actor_resources(...))``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from engine.evaluate import embed_texts, generate_texts
from engine.llm.bigrec.model import LLMConfig, load_llm
from engine.llm.bigrec.prompts import get_prompt_config

__all__ = ["Generator", "TitleEmbedder", "actor_resources"]


def actor_resources(*, use_gpu: bool, cpus: float = 0.5) -> dict:
    """``map_batches`` resources of one model actor.

    One GPU each where GPUs exist; on CPU a fractional CPU, so that the read tasks of the
    pipeline still get a CPU (a pool that takes every CPU starves its own reads and hangs).
    """
    return {"num_gpus": 1} if use_gpu else {"num_cpus": cpus}


def _resolve(obj):
    import ray

    return ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj


def _llm(llm: dict, *, use_gpu: bool):
    cfg = LLMConfig.from_dict(llm)
    cfg = dataclasses.replace(cfg, device="cuda" if use_gpu else "cpu")
    return load_llm(cfg, trainable=False)


class Generator:
    """Beam-search answer of the LoRA LLM for each user, plus its base-model embedding.

    Args:
        llm: LLMConfig fields (``model`` a resolved base folder, ``adapter`` the fine-tuned
            adapter or None).
        titles: item titles by item id (or an ObjectRef to them, resolved once here).
        prompt: prompt preset name.
        cutoff_len, beams, max_new_tokens, batch_size: see engine.evaluate.EvalConfig.
        use_gpu: place the replica on this actor's GPU.

    Input batch columns: ``row`` (int), ``history`` (item ids). Output: ``row``,
    ``generated`` (str), ``embedding`` ([B, hidden] float32).
    """

    def __init__(self, *, llm: dict, titles, prompt: str, cutoff_len: int, beams: int, max_new_tokens: int,
                 batch_size: int = 8, use_gpu: bool = False):
        import torch

        if not use_gpu:
            torch.set_num_threads(1)
        self.titles = _resolve(titles)
        self.model, self.tokenizer = _llm(llm, use_gpu=use_gpu)
        self.prompt_cfg = get_prompt_config(prompt, cutoff_len=cutoff_len)
        self.beams, self.max_new_tokens, self.batch_size = beams, max_new_tokens, batch_size

    def __call__(self, batch: dict) -> dict:
        hist = [[self.titles[int(i)] for i in h] for h in batch["history"]]
        texts = generate_texts(self.model, self.tokenizer, hist, self.prompt_cfg, beams=self.beams,
                               max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        emb = embed_texts(self.model, self.tokenizer, texts, batch_size=self.batch_size, base=True)
        return {"row": np.asarray(batch["row"]), "generated": np.asarray(texts, dtype=object), "embedding": emb}


class TitleEmbedder:
    """Base-model (adapter off) embedding of item titles.

    Args:
        llm: LLMConfig fields (``model`` a resolved base folder).
        batch_size: titles per forward.
        use_gpu: place the replica on this actor's GPU.

    Input batch columns: ``title_idx`` (int), ``title`` (str). Output: ``title_idx``,
    ``embedding`` ([B, hidden] float32).
    """

    def __init__(self, *, llm: dict, batch_size: int = 32, use_gpu: bool = False):
        import torch

        if not use_gpu:
            torch.set_num_threads(1)
        llm = dict(llm, adapter=None)
        self.model, self.tokenizer = _llm(llm, use_gpu=use_gpu)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        emb = embed_texts(self.model, self.tokenizer, [str(t) for t in batch["title"]], batch_size=self.batch_size,
                          base=True)
        return {"title_idx": np.asarray(batch["title_idx"]), "embedding": emb}
