"""The text-encoder backend (:class:`engine.llm.protocol.LLMBackend`): a shared LoRA sentence
encoder for user and item texts, cosine ranking (:mod:`engine.llm.textrec`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TextEncoderBackend"]


class TextEncoderBackend:
    """Text-encoder recommender (:mod:`engine.llm.textrec`): shared LoRA encoder, cosine ranking.

    Args:
        titles: title of every item id.
        config: :class:`engine.llm.textrec.TextRecConfig` or dict of its fields.
    """

    name = "textrec"

    def __init__(self, titles: Sequence[str], *, config: Any = None):
        from engine.llm.textrec import Catalogue, TextRecConfig

        self.catalogue = Catalogue.from_titles(titles)
        self.cfg = TextRecConfig.from_dict(config) if config is not None else TextRecConfig()
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model)
        return self._tokenizer

    def build_model(self) -> nn.Module:
        """:func:`engine.llm.textrec.build_model`."""
        from engine.llm.textrec import build_model

        model = build_model(self.cfg)
        self._tokenizer = model.tokenizer
        return model

    def encode_samples(self, sample_ids, histories, targets) -> dict:
        """:func:`engine.llm.textrec.collate_effort` (target + negatives fixed by sample id)."""
        from engine.llm.textrec import collate_effort

        return collate_effort(self.tokenizer, self.catalogue, sample_ids, histories, targets, self.cfg)

    def per_sample_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.llm.textrec.per_sample_loss`."""
        from engine.llm.textrec import per_sample_loss

        return per_sample_loss(model, batch)

    def effort(self, model, sample_ids, histories, targets, *, micro_batch: int = 16) -> np.ndarray:
        """:func:`engine.llm.textrec.effort_scores` (input-order micro-batches)."""
        from engine.llm.textrec import effort_scores

        return effort_scores(model, self.catalogue, {"sample_id": np.asarray(sample_ids, dtype=np.int64),
                                                     "history": list(histories), "target": np.asarray(targets)},
                             micro_batch=micro_batch)

    def encode_train(self, histories, targets) -> dict:
        """:func:`engine.llm.textrec.collate_train`."""
        from engine.llm.textrec import collate_train

        return collate_train(self.tokenizer, self.catalogue, histories, targets, self.cfg)

    def train_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.llm.textrec.train_loss` (in-batch softmax)."""
        from engine.llm.textrec import train_loss

        return train_loss(model, batch)

    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """:func:`engine.llm.textrec.rank_items`."""
        from engine.llm.textrec import rank_items

        return rank_items(model, self.catalogue, histories, k, exclude=exclude)
