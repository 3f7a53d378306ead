"""Micro-batches whose shapes depend only on their own samples, so that a sample's effort does
not depend on which other samples share its batch.

Why: float results depend on tensor shapes. A sample right-padded to 171 tokens because a longer
neighbour shares its micro-batch is summed in another order (attention over more keys, other
kernel blocking) than the same sample padded to 160, and its gradient norm moves in the 7th
digit. Measured on MovieLens-100K with the default tiny LLM: 72 of 698 unchanged samples had an
effort 1e-8..1.5e-7 (relative) away from yesterday's cached value when neighbours decided the
padding (benchmarks/daily.py). A content-keyed score cache (``dealrec prune --update``) is
only invisible when a fresh computation gives the cached value exactly.

How: each sample's padded length is its own length rounded up to a multiple of
:data:`PAD_MULTIPLE` (one value per padded axis: BIGRec the prompt; the text encoder the user
text and its item texts; TIGER the encoder input); samples are grouped by that key and each
group is cut into micro-batches, every one padded to the key. A sample's computation then
depends only on itself and its key. One exception was measured: a micro-batch of ONE row takes
another kernel path in TIGER's T5 (its gradient norm moved by 1e-7 against the same row in a
batch of 2..5, which all agreed), so a lone row is run twice (a batch of 2, both rows the same
sample). On CPU with one thread per replica (the effort actors' default) every backend's effort
is then identical in any batch composition (tests/unit/test_effort_batching.py). On a GPU,
kernels chosen by batch size may still differ in rounding.

Cost: at most ``PAD_MULTIPLE - 1`` padding tokens per sample and per axis, one part-filled
micro-batch per key and Ray batch, and one extra row where that micro-batch has a single row.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = ["PAD_MULTIPLE", "BATCHING_KEY", "padded_length", "canonical_micro_batches"]

#: padded lengths are multiples of this many tokens
PAD_MULTIPLE = 16
#: recorded in the effort cache's config key: scores of another batching are not mixed with these
BATCHING_KEY = f"canonical-pad-{PAD_MULTIPLE}"


def padded_length(n: int | np.ndarray, multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """``n`` rounded up to a multiple of ``multiple`` (at least ``multiple``)."""
    n = np.asarray(n, dtype=np.int64)
    return np.maximum(multiple, -(-n // multiple) * multiple)


def canonical_micro_batches(lengths, micro_batch: int, *,
                            multiple: int = PAD_MULTIPLE) -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
    """Group samples by their padded lengths and cut each group into micro-batches.

    Args:
        lengths: int [n] or [n, k]: per sample, its unpadded length on each padded axis.
        micro_batch: samples per micro-batch (>= 1).
        multiple: padding granularity.

    Yields:
        ``(indices, key)``: row indices (ascending within a group) and the padded length per
        axis that every row of the micro-batch is padded to. Every row appears in exactly one
        micro-batch; a micro-batch of one row is yielded as ``[i, i]`` (see the module docstring),
        so ``scores[indices] = batch_scores`` stays correct.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim == 1:
        lengths = lengths[:, None]
    if lengths.size == 0:
        return
    keys = padded_length(lengths, multiple)
    uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for g, key in enumerate(uniq):
        rows = np.flatnonzero(inverse == g)
        for s in range(0, rows.size, micro_batch):
            part = rows[s:s + micro_batch]
            yield (np.repeat(part, 2) if part.size == 1 else part), tuple(int(x) for x in key)
