"""The LLM backend protocol: what the effort scorer, the fine-tuning loop and the evaluator
need from an LLM-based recommender (docs/architecture.md).

A backend turns samples into model batches, gives the batch-independent per-sample loss that
the effort score differentiates, the fine-tuning loss, and a full ranking. Samples are given as
item ids (history oldest first, target) with their ``sample_id``; each backend holds the
catalogue titles. Ids rather than titles because a backend may key per-sample randomness on the
sample id (the text encoder's fixed negatives) and exclude the user's history items, and because
titles are not unique.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = ["LLMBackend"]


@runtime_checkable
class LLMBackend(Protocol):
    """One LLM-based recommender, as every LLM-side stage sees it."""

    name: str

    def build_model(self) -> nn.Module:
        """The pretrained model with a fresh (or loaded) LoRA; only LoRA parameters train.

        A backend whose every parameter trains (TIGER) sets the class attribute
        ``full_finetune = True`` and has ``save_model(model, folder)``; its ``load_model(folder)``
        reads that folder back. The fine-tune loop then exports the whole model through
        ``save_model`` (OUT/model) instead of a peft adapter (OUT/adapter), and checkpoints and
        fingerprints every trainable parameter (:mod:`engine.finetune.adapter`).
        """
        ...

    def encode_samples(self, sample_ids: Sequence[int], histories: Sequence[Sequence[int]],
                       targets: Sequence[int]) -> dict:
        """Tokenised batch (CPU tensors) for :meth:`per_sample_loss`."""
        ...

    def per_sample_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Tensor [B]; sample i's loss depends on row i only (the effort score's loss)."""
        ...

    def effort(self, model: nn.Module, sample_ids: Sequence[int], histories: Sequence[Sequence[int]],
               targets: Sequence[int], *, micro_batch: int = 16) -> np.ndarray:
        """Effort of each sample (float64 [n], input order): the norm of the gradient of
        :meth:`per_sample_loss` w.r.t. the trainable parameters, through
        :func:`engine.effort.per_sample_grad_norms`, micro-batched as suits the backend."""
        ...

    def encode_train(self, histories: Sequence[Sequence[int]], targets: Sequence[int]) -> dict:
        """Tokenised batch (CPU tensors) for :meth:`train_loss`."""
        ...

    def train_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Scalar fine-tuning loss of a batch (may use in-batch negatives).

        The fine-tune loop (:mod:`engine.finetune`) averages it over micro-batches and ranks. A
        backend whose loss needs the whole global batch (in-batch negatives) sets the class
        attribute ``in_batch_negatives = True``: the loop then gives each rank one micro-batch per
        step (its contiguous slice of the global batch) and calls ``train_loss(model, batch,
        rank=rank, world=world)``, and the backend gathers what it needs from the other ranks, so
        that any number of ranks trains the adapter of one process. Optional class attributes the
        loop also reads: ``train_bf16`` (False: fp32 on GPUs too), ``supports_zero3``.
        """
        ...

    def rank_items(self, model: nn.Module, histories: Sequence[Sequence[int]], k: int, *,
                   exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Top-``k`` item ids per user [U, k], best first, ``exclude`` (default: history) removed."""
        ...
