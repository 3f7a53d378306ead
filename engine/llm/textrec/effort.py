"""Effort of each sample: the LoRA gradient norm of its fixed-negatives loss (canonical micro-batches)."""

from __future__ import annotations

import numpy as np

from engine.effort.batching import canonical_micro_batches
from engine.llm.textrec.losses import effort_lengths, effort_tokens, pad_effort, per_sample_loss
from engine.llm.textrec.model import TextRecModel
from engine.llm.textrec.text import _as_catalogue, _columns, _pad_id, _to


def effort_scores(model: TextRecModel, titles, samples, *, micro_batch: int = 16) -> np.ndarray:
    """Effort of each sample: ``||grad_LoRA per_sample_loss||_2`` via :func:`engine.effort.per_sample_grad_norms`.

    Args:
        model: the (pretrained, not fine-tuned) :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.
        samples: samples Table or dict of ``sample_id``/``history``/``target`` columns.
        micro_batch: samples per forward/backward. Samples are grouped by padded lengths
            (:mod:`engine.effort.batching`): a score does not depend on the other samples.

    Returns:
        float64 array [n], in input order.
    """
    from engine.effort import per_sample_grad_norms

    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    cat = _as_catalogue(titles)
    sid, hist, tgt = _columns(samples)
    dev = next(model.parameters()).device
    out = np.zeros(len(tgt), dtype=np.float64)
    if len(tgt) == 0:
        return out
    tokens = effort_tokens(model.tokenizer, cat, sid, hist, tgt, model.cfg)
    pad = _pad_id(model.tokenizer)
    for idx, key in canonical_micro_batches(effort_lengths(tokens), micro_batch):
        b = _to(pad_effort(tokens, idx, pad, key), dev)
        out[idx] = per_sample_grad_norms(model, per_sample_loss, b).double().cpu().numpy()
    return out
