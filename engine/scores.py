"""The one reader of a prune run's score file (``RUN/scores.parquet``).

Every consumer of cached scores (``dealrec tune``, the selection-quality benchmark, a user's
own selection) reads them here, checked the same way: the ids cover the samples of the data
exactly once, and every score column is numeric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.data.schema import read_id_column, read_parquet
from engine.errors import DataError

__all__ = ["SCORES_FILE", "SCORE_COLUMNS", "read_scores"]

SCORES_FILE = "scores.parquet"
#: the per-sample score columns a prune run may write (influence: surrogate; effort: the backend's LLM)
SCORE_COLUMNS = ("influence", "effort", "grand", "el2n")


def read_scores(path: str | os.PathLike, n: int, *, columns: Sequence[str] = SCORE_COLUMNS) -> dict[str, np.ndarray]:
    """The score arrays of a prune run, indexed by sample_id (float64 [n] each).

    Args:
        path: ``RUN/scores.parquet``, or the run folder holding it.
        n: number of samples of the data the run scored (ids must be exactly 0..n-1).
        columns: which score columns to return where present (absent ones are left out).

    Raises:
        DataError: missing file, missing sample_id, ids that are not exactly 0..n-1, or a
            non-numeric score column (each names the file and the field).
    """
    p = Path(path)
    if p.is_dir():
        p = p / SCORES_FILE
    if not p.exists():
        raise DataError(f"{SCORES_FILE} not found; run `dealrec prune` first", path=p)
    ids = read_id_column(p, "sample_id")
    t = read_parquet(p)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(n)):
        raise DataError(f"sample_id must cover 0..{n - 1} exactly once (the samples of the data; found "
                        f"{len(ids)} rows)", path=p, field="sample_id")
    out = {}
    for c in columns:
        if c in t.column_names:
            col = t.column(c)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)):
                raise DataError(f"column has type {col.type}, expected numbers", path=p, field=c)
            out[c] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)[order]
    return out
