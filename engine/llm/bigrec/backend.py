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
    """

    name = "bigrec"

    def __init__(self, titles: Sequence[str], *, llm: Any = None, prompt: Any = "games"):
        from engine.llm.bigrec.model import LLMConfig
        from engine.llm.bigrec.prompts import get_prompt_config

        self.titles = list(titles)
        self.llm_cfg = LLMConfig.from_dict(llm) if llm is not None else LLMConfig()
        self.prompt_cfg = get_prompt_config(prompt)
        self._tokenizer = None

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

    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """Not available: BIGRec ranks by generating a title and grounding it.

        Raises:
            NotImplementedError: always; use the generation + grounding evaluator
                (:func:`engine.grounding.ground` over embeddings of generated titles).
        """
        raise NotImplementedError(
            "BIGRec ranks items by generation + grounding, not by scoring the catalogue: generate "
            "with the LoRA LLM, embed the outputs and call engine.grounding.ground (the evaluate job)")
