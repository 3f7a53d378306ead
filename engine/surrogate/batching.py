"""Samples -> left-padded tensor batches (the token layout of every surrogate, see :mod:`engine.surrogate`).

Per sample: ``labels`` = the full training sequence, ``seq`` = BOS + all but its last item as
tokens (``item_id + ITEM_OFFSET``), so the output at every position predicts its label.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from engine.errors import ConfigError, DataError


PAD, BOS, MASK = 0, 1, 1
ITEM_OFFSET = 2


def _column(batch: Any, name: str) -> Any:
    if isinstance(batch, pa.Table):
        return batch.column(name) if name in batch.column_names else None
    return batch.get(name)


def _as_list_of_arrays(col: Any) -> list[np.ndarray]:
    """History-like column (Arrow list column, numpy object array of arrays, or list) -> list of int arrays."""
    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    if isinstance(col, np.ndarray) and col.dtype != object and col.ndim == 2:
        return [np.asarray(r, dtype=np.int64) for r in col]
    return [np.asarray(r if r is not None else [], dtype=np.int64).reshape(-1) for r in col]


def _to_numpy(col: Any) -> np.ndarray:
    if isinstance(col, (pa.ChunkedArray, pa.Array)):
        return col.to_numpy()
    return np.asarray(col)


def encode_samples(batch: Any, *, max_len: int) -> dict[str, np.ndarray]:
    """Encode samples (or valid/test rows) into left-padded numpy matrices of width max_len.

    Args:
        batch: a pyarrow Table or a dict of numpy arrays (Ray Data ``batch_format="numpy"``:
            ``history`` arrives as an object array of int arrays) with columns ``history`` and
            either ``target`` (training samples) or ``targets`` (valid/test rows);
            ``sample_id`` is optional (row numbers are used when absent).
        max_len: sequence window.

    Returns:
        dict with ``sample_id`` [N] int64, ``seq`` [N, max_len] int64 tokens, ``labels``
        [N, max_len] int64 item ids (-1 = padding), ``target`` [N] (-1 for eval rows), and for
        eval rows ``targets`` / ``seen`` as padded [N, *] int64 (-1 = padding).

    Raises:
        DataError: a required column is missing or an item id is negative.
    """
    hist_col = _column(batch, "history")
    if hist_col is None:
        raise DataError("missing column; samples need 'history' and 'target' (eval rows: 'targets')", field="history")
    hists = _as_list_of_arrays(hist_col)
    n = len(hists)
    sid = _column(batch, "sample_id")
    sample_id = np.arange(n, dtype=np.int64) if sid is None else _to_numpy(sid).astype(np.int64)
    tgt = _column(batch, "target")
    tgts = _column(batch, "targets")
    if tgt is None and tgts is None:
        raise DataError("missing column: training samples need 'target', eval rows need 'targets'", field="target")
    seq = np.zeros((n, max_len), dtype=np.int64)
    labels = np.full((n, max_len), -1, dtype=np.int64)
    out: dict[str, np.ndarray] = {"sample_id": sample_id, "seq": seq, "labels": labels}
    if tgt is not None:
        target = _to_numpy(tgt).astype(np.int64)
        out["target"] = target
        for i, h in enumerate(hists):
            s = np.concatenate([h, target[i:i + 1]])[-max_len:]
            labels[i, max_len - len(s):] = s
            inp = np.concatenate([[BOS - ITEM_OFFSET], h])[-max_len:] + ITEM_OFFSET
            seq[i, max_len - len(inp):] = inp
    else:
        tl = _as_list_of_arrays(tgts)
        out["target"] = np.full(n, -1, dtype=np.int64)
        width_t = max(1, max((len(t) for t in tl), default=1))
        width_s = max(1, max((len(h) for h in hists), default=1))
        targets = np.full((n, width_t), -1, dtype=np.int64)
        seen = np.full((n, width_s), -1, dtype=np.int64)
        for i, h in enumerate(hists):
            inp = np.concatenate([[BOS - ITEM_OFFSET], h])[-max_len:] + ITEM_OFFSET
            seq[i, max_len - len(inp):] = inp
            # labels of eval rows: the history itself (so BERT4Rec can read the items)
            hh = h[-max_len:]
            labels[i, max_len - len(hh):] = hh
            targets[i, :len(tl[i])] = tl[i]
            seen[i, :len(h)] = h
        out["targets"], out["seen"] = targets, seen
    if (seq < 0).any() or (out["target"][out["target"] != -1] < 0).any():
        raise DataError("negative item id in a sample (item ids are dense 0..n_items-1)", field="history")
    return out


def _slice_encoded(enc: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, Tensor]:
    """Rows ``idx`` of an encoded matrix set, trimmed to the batch's longest sequence, as tensors."""
    seq = enc["seq"][idx]
    used = (seq != PAD).any(axis=0)
    first = int(np.argmax(used)) if used.any() else seq.shape[1] - 1
    b: dict[str, Tensor] = {
        "sample_id": torch.from_numpy(enc["sample_id"][idx].copy()),
        "seq": torch.from_numpy(seq[:, first:].copy()),
        "labels": torch.from_numpy(enc["labels"][idx][:, first:].copy()),
        "target": torch.from_numpy(enc["target"][idx].copy()),
    }
    for k in ("targets", "seen"):
        if k in enc:
            m = enc[k][idx]
            w = max(1, int((m != -1).sum(axis=1).max(initial=0)))
            b[k] = torch.from_numpy(m[:, :w].copy())
    return b


def make_batches(samples: Any, *, batch_size: int, max_len: int,
                 order: str | Callable[[np.ndarray], np.ndarray] | None = None) -> list[dict[str, Tensor]]:
    """Cut samples into tensor batches (left-padded to each batch's longest sequence).

    Args:
        samples: pyarrow Table (samples schema or valid/test schema) or a dict of numpy
            arrays as given by Ray Data ``map_batches(batch_format="numpy")``.
        batch_size: samples per batch.
        max_len: sequence window (the surrogate's ``max_len``).
        order: None = input order; ``"length"`` = rows sorted by sequence length (stable), so
            that each batch is trimmed to nearly its own length (a sample's loss does not
            depend on its batch, so only speed changes: several times less padding on
            real data); or a callable ``order(lengths) -> row indices`` (lengths = positions
            per row, int64 [n]) whose result is cut into consecutive batches.

    Returns:
        list of dicts of tensors: ``sample_id`` [B], ``seq`` [B, T], ``labels`` [B, T],
        ``target`` [B] and for eval rows ``targets``/``seen``. Map results back to rows by
        ``sample_id`` when ``order`` is not None.

    Raises:
        DataError: missing columns or bad ids.
    """
    if batch_size < 1 or max_len < 1:
        raise DataError("batch_size and max_len must be >= 1", field="batch_size", value=(batch_size, max_len))
    if isinstance(order, str) and order != "length":
        raise ConfigError([f"order={order!r}: expected None, 'length' or a callable"], config="make_batches")
    enc = encode_samples(samples, max_len=max_len)
    n = len(enc["sample_id"])
    if order is None:
        rows = np.arange(n)
    else:
        lengths = (enc["seq"] != PAD).sum(axis=1).astype(np.int64)
        rows = np.argsort(lengths, kind="stable") if order == "length" else np.asarray(order(lengths), dtype=np.int64)
    return [_slice_encoded(enc, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def length_bucket(t: int, max_len: int) -> int:
    """The padded length of a batch of length ``t``: the next power of two >= 8, at most ``max_len``."""
    b = 8
    while b < t:
        b *= 2
    return max(t, min(b, max_len))


def pad_to_bucket(batch: Mapping[str, Tensor], rows: int, max_len: int) -> dict[str, Tensor]:
    """:func:`pad_batch` to ``rows`` rows and the batch's :func:`length_bucket`: the few shapes a
    compiled pass sees (rows = the micro-batch size)."""
    return pad_batch(batch, rows, length_bucket(int(batch["seq"].shape[1]), max_len))


def pad_batch(batch: Mapping[str, Tensor], rows: int, length: int) -> dict[str, Tensor]:
    """A samples batch (from :func:`make_batches`) grown to ``rows`` rows and ``length`` positions.

    Sequences are left-padded (``seq`` PAD, ``labels`` -1); added rows are empty sequences with
    sample_id -1. Per-sample losses of the real rows are unchanged (a sample's loss depends on
    its own positions only; padded positions are masked) and an added row's loss is 0. Used to
    give a compiled pass few distinct shapes.

    Raises:
        ValueError: the batch is larger than (rows, length), or has a key this cannot pad.
    """
    b, t = batch["seq"].shape
    if b > rows or t > length:
        raise ValueError(f"pad_batch: batch of shape {(b, t)} does not fit {(rows, length)}")
    out: dict[str, Tensor] = {}
    for k, x in batch.items():
        if k in ("seq", "labels"):
            new = x.new_full((rows, length), PAD if k == "seq" else -1)
            new[:b, length - t:] = x
        elif x.dim() == 1:
            new = x.new_full((rows,), -1 if k == "sample_id" else 0)
            new[:b] = x
        else:
            raise ValueError(f"pad_batch: cannot pad key {k!r} of shape {tuple(x.shape)}")
        out[k] = new
    return out
