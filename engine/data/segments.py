"""Write users laid out as ``[train | valid | test]`` runs of a flat item array as samples + splits.

Shared by every importer and the synthetic generator, so that the sample definition of
docs/method.md#samples lives in one place: history = training items except the last,
target = the last training item; valid history = all training items, test history =
training + valid items; users without training items get no sample (counted).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.data.writer import PreparedWriter
from engine.errors import DataError

__all__ = ["add_counts", "gather_lists", "write_user_segments"]


def gather_lists(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Arrow ``list<int32>`` whose row i is ``values[starts[i] : starts[i] + lengths[i]]`` (vectorised)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    idx = np.repeat(np.asarray(starts, dtype=np.int64) - offsets[:-1], lengths) + np.arange(total, dtype=np.int64)
    flat = pa.array(np.asarray(values, dtype=np.int32)[idx], pa.int32())
    if total >= 2**31:  # list<int32> has int32 offsets; importers write users in batches far below this
        raise DataError(f"{total} list values in one batch exceed Arrow's list<int32> limit; write fewer "
                        "users per batch", field="history")
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)


def write_user_segments(
    writer: PreparedWriter,
    user_ids: np.ndarray,
    items: np.ndarray,
    starts: np.ndarray,
    n_train: np.ndarray,
    n_valid: np.ndarray,
    n_test: np.ndarray,
) -> dict:
    """Write samples and valid/test rows for users laid out as ``[train | valid | test]`` runs.

    User ``u``'s items are ``items[starts[u] : starts[u] + n_train[u] + n_valid[u] + n_test[u]]``
    in time order, training items first. Appends to ``writer`` (samples in order of ``user_ids``).

    Returns:
        Counts for this batch: samples, dropped_users, valid, test, cold_valid, cold_test,
        and interactions per split.
    """
    user_ids = np.asarray(user_ids, dtype=object)
    starts = np.asarray(starts, dtype=np.int64)
    n_train, n_valid, n_test = (np.asarray(x, dtype=np.int64) for x in (n_train, n_valid, n_test))
    has = n_train > 0
    if has.any():
        hist = gather_lists(items, starts[has], n_train[has] - 1)
        targets = np.asarray(items, dtype=np.int32)[starts[has] + n_train[has] - 1]
        writer.add_samples(user_ids[has], hist, targets)
    for split, sel, hist_len, t_start, t_len in (
        ("valid", n_valid > 0, n_train, starts + n_train, n_valid),
        ("test", n_test > 0, n_train + n_valid, starts + n_train + n_valid, n_test),
    ):
        if sel.any():
            writer.append_split(
                split, user_ids[sel], gather_lists(items, starts[sel], hist_len[sel]),
                gather_lists(items, t_start[sel], t_len[sel]),
            )
    return {
        "samples": int(has.sum()),
        "dropped_users": int((~has).sum()),
        "valid": int((n_valid > 0).sum()),
        "test": int((n_test > 0).sum()),
        "cold_valid": int(((n_valid > 0) & ~has).sum()),
        "cold_test": int(((n_test > 0) & ~has).sum()),
        "interactions": {"train": int(n_train.sum()), "valid": int(n_valid.sum()), "test": int(n_test.sum())},
    }


def add_counts(total: dict, part: dict) -> dict:
    """Add the (nested) counts of ``part`` into ``total`` in place; return ``total``."""
    for k, v in part.items():
        if isinstance(v, dict):
            add_counts(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v
    return total
