"""BIGRec effort: tokenise samples as prompts and score them with the generic batched engine.

:func:`score_effort_batch` is the BIGRec backend's effort pass: samples are grouped by their
token length rounded up to a multiple of 16 and each group is cut into micro-batches padded to
that length (:mod:`engine.effort.batching`: a sample's score does not depend on its neighbours),
and each micro-batch goes through :func:`engine.effort.per_sample_grad_norms` with the
per-sample causal-LM loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import nn

from engine.effort import per_sample_grad_norms
from engine.effort.batching import canonical_micro_batches
from engine.llm.bigrec.prompts import PromptConfig, collate, encode_sample, per_sample_causal_lm_loss

__all__ = ["encode_effort_samples", "score_effort_batch"]


def encode_effort_samples(tokenizer, titles: Sequence[str], histories: Sequence[Sequence[int]],
                          targets: Sequence[int], prompt_cfg: PromptConfig) -> list[dict]:
    """Tokenise samples given as item ids (history oldest first -> target title).

    Args:
        tokenizer: the LLM's tokenizer.
        titles: title of each item id (``titles[item_id]``).
        histories: per sample, the history item ids, oldest first.
        targets: per sample, the target item id.
        prompt_cfg: prompt wording / cutoff / label mode.

    Returns:
        One :func:`engine.prompts.encode_sample` dict per sample.
    """
    return [
        encode_sample(tokenizer, [titles[int(j)] for j in h], titles[int(t)], prompt_cfg)
        for h, t in zip(histories, targets)
    ]


def score_effort_batch(model: nn.Module, tokenizer, titles: Sequence[str], histories: Sequence[Sequence[int]],
                       targets: Sequence[int], prompt_cfg: PromptConfig, micro_batch_size: int = 16) -> np.ndarray:
    """Effort scores of a batch of samples, in input order.

    Rows are grouped by padded token length (:func:`engine.effort.batching.canonical_micro_batches`)
    and cut into micro-batches; a row's score depends only on the row (and, on a GPU, possibly
    on the micro-batch size), never on which rows share its batch.

    Args:
        model: the LoRA LLM (``engine.llm.load_llm``); its trainable parameters define the norm.
        tokenizer: its tokenizer (pad token set).
        titles: title of each item id.
        histories: history item ids per sample, oldest first.
        targets: target item id per sample.
        prompt_cfg: the prompt config.
        micro_batch_size: samples per forward/backward.

    Returns:
        float64 array [n] of ``||grad_phi L_LLM(s)||_2``.

    Raises:
        ValueError: ``micro_batch_size < 1`` or histories/targets of different lengths.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if len(histories) != len(targets):
        raise ValueError(f"histories ({len(histories)}) and targets ({len(targets)}) differ in length")
    n = len(targets)
    out = np.zeros(n, dtype=np.float64)
    if n == 0:
        return out
    enc = encode_effort_samples(tokenizer, titles, histories, targets, prompt_cfg)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for idx, (length,) in canonical_micro_batches([len(e["input_ids"]) for e in enc], micro_batch_size):
        batch = {k: v.to(device) for k, v in collate([enc[i] for i in idx], pad, length).items()}
        out[idx] = per_sample_grad_norms(model, per_sample_causal_lm_loss, batch).double().cpu().numpy()
    return out
