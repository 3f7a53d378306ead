"""Effort of each sample: the LoRA gradient norm of its fixed-negatives loss."""

from __future__ import annotations

import numpy as np

from engine.llm.textrec.losses import collate_effort, per_sample_loss
from engine.llm.textrec.model import TextRecModel
from engine.llm.textrec.text import _as_catalogue, _columns, _to


def effort_scores(model: TextRecModel, titles, samples, *, micro_batch: int = 16) -> np.ndarray:
    """Effort of each sample: ``||grad_LoRA per_sample_loss||_2`` via :func:`engine.effort.per_sample_grad_norms`.

    Args:
        model: the (pretrained, not fine-tuned) :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.
        samples: samples Table or dict of ``sample_id``/``history``/``target`` columns.
        micro_batch: samples per forward/backward (scores do not depend on it).

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
    for s in range(0, len(tgt), micro_batch):
        b = _to(collate_effort(model.tokenizer, cat, sid[s:s + micro_batch], hist[s:s + micro_batch],
                               tgt[s:s + micro_batch], model.cfg), dev)
        out[s:s + len(b["sample_ids"])] = per_sample_grad_norms(model, per_sample_loss, b).double().cpu().numpy()
    return out
