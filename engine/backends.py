"""The LLM backend protocol (DESIGN.md section 5) and its two implementations.

A backend turns samples into model batches, gives the batch-independent per-sample loss that
the effort score differentiates, the fine-tuning loss, and (where it can) a full ranking:

* ``bigrec``: the causal LM of BIGRec (:mod:`engine.llm` + :mod:`engine.prompts`); ranking goes
  through generation + grounding (:mod:`engine.grounding`), not through this protocol.
* ``textrec``: the text-encoder recommender (:mod:`engine.text_encoder`), cosine ranking.

Samples are given as item ids (history oldest first, target) with their ``sample_id``; each
backend holds the catalogue titles. Ids rather than titles because the text-encoder's fixed
negatives are keyed by the sample id and exclude the user's history items, and because titles
are not unique. The adapters are thin: the work lives in the modules above.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from engine.errors import ConfigError

__all__ = ["LLMBackend", "BigRecBackend", "TextEncoderBackend", "BACKENDS", "get_backend"]


@runtime_checkable
class LLMBackend(Protocol):
    """What the effort scorer, the fine-tuning loop and the evaluator need from an LLM backend."""

    name: str

    def build_model(self) -> nn.Module:
        """The pretrained model with a fresh (or loaded) LoRA; only LoRA parameters train."""
        ...

    def encode_samples(self, sample_ids: Sequence[int], histories: Sequence[Sequence[int]],
                       targets: Sequence[int]) -> dict:
        """Tokenised batch (CPU tensors) for :meth:`per_sample_loss`."""
        ...

    def per_sample_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Tensor [B]; sample i's loss depends on row i only (the effort score's loss)."""
        ...

    def encode_train(self, histories: Sequence[Sequence[int]], targets: Sequence[int]) -> dict:
        """Tokenised batch (CPU tensors) for :meth:`train_loss`."""
        ...

    def train_loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Scalar fine-tuning loss of a batch (may use in-batch negatives)."""
        ...

    def rank_items(self, model: nn.Module, histories: Sequence[Sequence[int]], k: int, *,
                   exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Top-``k`` item ids per user [U, k], best first, ``exclude`` (default: history) removed."""
        ...


class BigRecBackend:
    """BIGRec: Alpaca prompt over history titles, causal-LM loss on a LoRA LLM.

    Args:
        titles: title of every item id.
        llm: :class:`engine.llm.LLMConfig` or dict of its fields.
        prompt: :mod:`engine.prompts` preset name, dict or PromptConfig.
    """

    name = "bigrec"

    def __init__(self, titles: Sequence[str], *, llm: Any = None, prompt: Any = "games"):
        from engine.llm import LLMConfig
        from engine.prompts import get_prompt_config

        self.titles = list(titles)
        self.llm_cfg = LLMConfig.from_dict(llm) if llm is not None else LLMConfig()
        self.prompt_cfg = get_prompt_config(prompt)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from engine.llm import resolve_base

            tok = AutoTokenizer.from_pretrained(resolve_base(self.llm_cfg, self.titles))
            if tok.pad_token_id is None:  # as load_llm does
                tok.pad_token = tok.unk_token or tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def build_model(self) -> nn.Module:
        """:func:`engine.llm.load_llm` (its tokenizer replaces this backend's)."""
        from engine.llm import load_llm

        model, self._tokenizer = load_llm(self.llm_cfg, titles=self.titles)
        return model

    def encode_samples(self, sample_ids, histories, targets) -> dict:
        """:func:`engine.prompts.collate` of :func:`engine.effort.encode_effort_samples` (sample ids unused)."""
        from engine.effort import encode_effort_samples
        from engine.prompts import collate

        enc = encode_effort_samples(self.tokenizer, self.titles, histories, targets, self.prompt_cfg)
        return collate(enc, self.tokenizer.pad_token_id)

    def per_sample_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.prompts.per_sample_causal_lm_loss`."""
        from engine.prompts import per_sample_causal_lm_loss

        return per_sample_causal_lm_loss(model, batch)

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


class TextEncoderBackend:
    """Text-encoder recommender (:mod:`engine.text_encoder`): shared LoRA encoder, cosine ranking.

    Args:
        titles: title of every item id.
        config: :class:`engine.text_encoder.TextRecConfig` or dict of its fields.
    """

    name = "textrec"

    def __init__(self, titles: Sequence[str], *, config: Any = None):
        from engine.text_encoder import Catalogue, TextRecConfig

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
        """:func:`engine.text_encoder.build_model`."""
        from engine.text_encoder import build_model

        model = build_model(self.cfg)
        self._tokenizer = model.tokenizer
        return model

    def encode_samples(self, sample_ids, histories, targets) -> dict:
        """:func:`engine.text_encoder.collate_effort` (target + negatives fixed by sample id)."""
        from engine.text_encoder import collate_effort

        return collate_effort(self.tokenizer, self.catalogue, sample_ids, histories, targets, self.cfg)

    def per_sample_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.text_encoder.per_sample_loss`."""
        from engine.text_encoder import per_sample_loss

        return per_sample_loss(model, batch)

    def encode_train(self, histories, targets) -> dict:
        """:func:`engine.text_encoder.collate_train`."""
        from engine.text_encoder import collate_train

        return collate_train(self.tokenizer, self.catalogue, histories, targets, self.cfg)

    def train_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.text_encoder.train_loss` (in-batch softmax)."""
        from engine.text_encoder import train_loss

        return train_loss(model, batch)

    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """:func:`engine.text_encoder.rank_items`."""
        from engine.text_encoder import rank_items

        return rank_items(model, self.catalogue, histories, k, exclude=exclude)


BACKENDS: dict[str, Callable[..., LLMBackend]] = {"bigrec": BigRecBackend, "textrec": TextEncoderBackend}


def get_backend(name: str, titles: Sequence[str], **options) -> LLMBackend:
    """Build a backend by name.

    Args:
        name: ``"bigrec"`` or ``"textrec"``.
        titles: title of every item id.
        **options: the backend's keyword options (``llm=``, ``prompt=`` for bigrec; ``config=`` for
            textrec).

    Returns:
        An object satisfying :class:`LLMBackend`.

    Raises:
        ConfigError: unknown name, or invalid options for that backend.
    """
    if name not in BACKENDS:
        raise ConfigError([f"backend={name!r}: expected one of {sorted(BACKENDS)}"], config="backend")
    try:
        return BACKENDS[name](titles, **options)
    except TypeError as e:
        raise ConfigError([f"backend {name!r}: {e}"], config="backend") from None
