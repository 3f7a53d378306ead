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
    #: train_loss scores every user against the targets of the whole global batch: the fine-tune
    #: loop runs one micro-batch per rank and step, and passes rank/world (engine.finetune)
    in_batch_negatives = True
    #: fp32 on every device (the logits are cosines / 0.05); ZeRO-3 gains nothing on a small encoder
    train_bf16 = False
    supports_zero3 = False
    #: the dropout seed's salt of the former textrec fine-tune job, so its runs reproduce
    dropout_seed_salt = "textrec/"

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

    def load_model(self, adapter: str | None = None, *, device: str | None = None) -> nn.Module:
        """An eval-mode model for ranking: the encoder with a fresh LoRA, or with the fine-tuned
        LoRA of ``adapter`` (a peft folder a text-encoder fine-tune exported; its rank, alpha and
        target modules are read from the folder, :mod:`engine.llm.textrec.adapter`, the weights
        loaded by :func:`engine.finetune.adapter.load_adapter`).

        Raises:
            DataError: the adapter folder is unreadable or does not fit the encoder.
        """
        from dataclasses import replace

        from engine.finetune.adapter import load_adapter
        from engine.llm.textrec import build_model
        from engine.llm.textrec.adapter import adapter_lora_fields

        cfg = self.cfg
        if adapter is not None:
            cfg = replace(cfg, **adapter_lora_fields(adapter))
        if device is not None:
            cfg = replace(cfg, device=device)
        model = build_model(cfg)
        self._tokenizer = model.tokenizer
        return load_adapter(model, adapter) if adapter is not None else model

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

    def train_loss(self, model, batch, *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """:func:`engine.llm.textrec.train_loss` (in-batch softmax); with ``world`` > 1 ranks,
        :func:`gathered_train_loss` over the whole global batch."""
        if world > 1:
            return gathered_train_loss(model, batch, rank=rank, world=world)
        from engine.llm.textrec import train_loss

        return train_loss(model, batch)

    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """:func:`engine.llm.textrec.rank_items`."""
        from engine.llm.textrec import rank_items

        return rank_items(model, self.catalogue, histories, k, exclude=exclude)


def gathered_train_loss(model, batch: dict, *, rank: int, world: int) -> torch.Tensor:
    """The in-batch softmax of :func:`engine.llm.textrec.train_loss` over the WHOLE global batch.

    ``batch`` is rank ``rank``'s contiguous slice of the global batch (every rank's slice has the
    same size). Item embeddings of all ranks are all-gathered with autograd
    (``torch.distributed.nn``) and the title groups without, so every user is scored against the
    targets of every rank; averaging the ranks' gradients (DDP, DeepSpeed) gives the gradient of
    the whole batch's mean loss, as one process training on the whole batch would.

    Returns:
        Mean loss over this rank's users.
    """
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.nn.functional import all_gather

    from engine.llm.textrec import _unwrap

    u, v = model(batch["user_input_ids"], batch["user_attention_mask"],
                 batch["item_input_ids"], batch["item_attention_mask"])
    v = torch.cat(all_gather(v), 0)
    mine = batch["target_groups"].to(v.device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    g = torch.cat(parts, 0)
    logits = u @ v.T / _unwrap(model).cfg.temperature
    b = u.shape[0]
    labels = torch.arange(rank * b, (rank + 1) * b, device=logits.device)
    own = g[labels]
    dup = (own[:, None] == g[None, :]) & (torch.arange(len(g), device=logits.device)[None, :] != labels[:, None])
    logits = logits.masked_fill(dup, float("-inf"))
    return F.cross_entropy(logits, labels)
