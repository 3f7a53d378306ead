"""The BIGRec backend (:class:`engine.llm.protocol.LLMBackend`): Alpaca prompt over history
titles, causal-LM loss on a LoRA LLM (:mod:`engine.llm.bigrec.model`,
:mod:`engine.llm.bigrec.prompts`); ranking by generation + grounding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["BigRecBackend"]


class BigRecBackend:
    """BIGRec: Alpaca prompt over history titles, causal-LM loss on a LoRA LLM.

    Args:
        titles: title of every item id.
        llm: :class:`engine.llm.bigrec.model.LLMConfig` or dict of its fields.
        prompt: :mod:`engine.llm.bigrec.prompts` preset name, dict or PromptConfig.
        generation: :class:`engine.llm.bigrec.generate.GenerationConfig` or dict of its fields
            (how :meth:`rank_items` generates and grounds).
    """

    name = "bigrec"

    def __init__(self, titles: Sequence[str], *, llm: Any = None, prompt: Any = "games", generation: Any = None):
        from engine.llm.bigrec.generate import GenerationConfig
        from engine.llm.bigrec.model import LLMConfig
        from engine.llm.bigrec.prompts import get_prompt_config

        self.titles = list(titles)
        self.llm_cfg = LLMConfig.from_dict(llm) if llm is not None else LLMConfig()
        self.prompt_cfg = get_prompt_config(prompt)
        self.gen_cfg = GenerationConfig.from_dict(generation)
        self._tokenizer = None
        self._index = None
        self._title_emb = None
        #: whether :meth:`title_embeddings` found them in the disk cache (None: not asked yet)
        self.title_cache_hit: bool | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from engine.llm.bigrec.model import resolve_base

            tok = AutoTokenizer.from_pretrained(resolve_base(self.llm_cfg, self.titles))
            if tok.pad_token_id is None:  # as load_llm does
                tok.pad_token = tok.unk_token or tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def build_model(self) -> nn.Module:
        """:func:`engine.llm.bigrec.model.load_llm` (its tokenizer replaces this backend's)."""
        from engine.llm.bigrec.model import load_llm

        model, self._tokenizer = load_llm(self.llm_cfg, titles=self.titles)
        return model

    def encode_samples(self, sample_ids, histories, targets) -> dict:
        """:func:`engine.llm.bigrec.prompts.collate` of :func:`engine.llm.bigrec.effort.encode_effort_samples` (sample ids unused)."""
        from engine.llm.bigrec.effort import encode_effort_samples
        from engine.llm.bigrec.prompts import collate

        enc = encode_effort_samples(self.tokenizer, self.titles, histories, targets, self.prompt_cfg)
        return collate(enc, self.tokenizer.pad_token_id)

    def per_sample_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.llm.bigrec.prompts.per_sample_causal_lm_loss`."""
        from engine.llm.bigrec.prompts import per_sample_causal_lm_loss

        return per_sample_causal_lm_loss(model, batch)

    def effort(self, model, sample_ids, histories, targets, *, micro_batch: int = 16) -> np.ndarray:
        """:func:`engine.llm.bigrec.effort.score_effort_batch` (length-sorted micro-batches; sample ids unused)."""
        from engine.llm.bigrec.effort import score_effort_batch

        return score_effort_batch(model, self.tokenizer, self.titles, histories, targets, self.prompt_cfg,
                                  micro_batch)

    def encode_train(self, histories, targets) -> dict:
        """The same tokenisation as :meth:`encode_samples`."""
        return self.encode_samples(range(len(targets)), histories, targets)

    def train_loss(self, model, batch) -> torch.Tensor:
        """Hugging Face's token-mean causal-LM loss, as :mod:`engine.finetune` trains it."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"], use_cache=False).loss

    # ------------------------------------------------------------------ ranking (evaluation)

    def load_model(self, adapter: str | None = None, *, device: str | None = None) -> nn.Module:
        """The frozen, eval-mode LLM for ranking: the base with the fine-tuned LoRA ``adapter``
        (a peft folder, e.g. OUT/adapter of ``dealrec finetune``), or a fresh LoRA without one.
        Its tokenizer replaces this backend's."""
        from dataclasses import replace

        from engine.llm.bigrec.model import load_llm

        cfg = replace(self.llm_cfg, adapter=str(adapter) if adapter is not None else None)
        if device is not None:
            cfg = replace(cfg, device=device)
        model, self._tokenizer = load_llm(cfg, titles=self.titles, trainable=False)
        return model

    @property
    def title_index(self):
        """:func:`engine.grounding.index_titles` of the catalogue (distinct titles, grounding order)."""
        if self._index is None:
            from engine.grounding import index_titles

            self._index = index_titles(self.titles)
        return self._index

    def base_model(self) -> str:
        """The resolved base model (an absolute folder where it is local, else the Hub id)."""
        from pathlib import Path

        from engine.llm.bigrec.model import resolve_base

        if getattr(self, "_base", None) is None:  # resolving "tiny" hashes every title: once
            base = resolve_base(self.llm_cfg, self.titles)
            self._base = str(Path(base).resolve()) if Path(base).exists() else base
        return self._base

    def title_cache_path(self):
        """The disk cache of the distinct titles' base-model embeddings (keyed by base and titles)."""
        from engine.llm.bigrec.generate import title_cache_path

        return title_cache_path(self.llm_cfg.cache_dir, self.base_model(), self.title_index.titles)

    def title_cache_missing(self) -> list[str] | None:
        """The distinct titles to embed when the disk cache misses, None on a hit: lets a job
        fill the cache with a pool of :meth:`embed_titles` replicas before ranking."""
        from engine.llm.bigrec.generate import load_title_embeddings

        if self._title_emb is not None:
            return None
        emb = load_title_embeddings(self.title_cache_path(), len(self.title_index.titles))
        return None if emb is not None else list(self.title_index.titles)

    def embed_titles(self, model, titles: Sequence[str]) -> np.ndarray:
        """Base-model (adapter off) last-token embeddings ``[len(titles), d]`` of ``titles``."""
        from engine.llm.bigrec.generate import embed_texts

        return embed_texts(model, self.tokenizer, [str(t) for t in titles], batch_size=self.gen_cfg.title_batch_size,
                           base=True)

    def store_title_embeddings(self, emb: np.ndarray) -> None:
        """Write the distinct titles' embeddings (index order) to the disk cache."""
        from engine.llm.bigrec.generate import store_title_embeddings

        store_title_embeddings(self.title_cache_path(), emb, base=self.base_model())

    def title_embeddings(self, model) -> np.ndarray:
        """The distinct titles' embeddings: held, else from the disk cache, else computed with
        ``model`` and cached (:func:`engine.llm.bigrec.generate.cached_title_embeddings`)."""
        if self._title_emb is None:
            from engine.llm.bigrec.generate import cached_title_embeddings

            self._title_emb, self.title_cache_hit = cached_title_embeddings(
                self.llm_cfg.cache_dir, self.base_model(), self.title_index.titles,
                lambda ts: self.embed_titles(model, ts))
        return self._title_emb

    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """BIGRec's ranking: beam-search an answer with the adapter, embed it with the base model
        and ground it to the catalogue (:func:`engine.llm.bigrec.generate.rank_by_generation`).

        Args:
            model: from :meth:`load_model` (or :meth:`build_model`).
            histories: per user, history item ids oldest first.
            k: items per user.
            exclude: per user, item ids never returned (default: the user's history; pass empty
                lists for BIGRec's own protocol, which keeps them).

        Returns:
            int64 ``[U, k]`` item ids, best first; -1 pads rows when fewer than ``k`` items remain.
        """
        from engine.errors import ConfigError
        from engine.llm.bigrec.generate import rank_by_generation

        exclude = histories if exclude is None else exclude
        if not (isinstance(k, (int, np.integer)) and k >= 1) or len(exclude) != len(histories):
            raise ConfigError([f"k={k!r} must be an int >= 1 and exclude ({len(exclude)} users) must match "
                               f"histories ({len(histories)} users)"], config="rank_items")
        title_emb = self.title_embeddings(model)
        return rank_by_generation(model, self.tokenizer, self.titles, self.title_index, title_emb, histories, int(k),
                                  self.prompt_cfg, self.gen_cfg, exclude=exclude)
