"""The validation target of influence (issue #20): g_bar = the mean gradient of the
validation-period loss instead of the mean training loss.

DEALRec's g_bar is grad R, the mean TRAINING gradient: influence(s) then estimates how removing s
changes the training risk. With a global-temporal split the test period follows the validation
period, so the loss of the validation period (the users' most recent behaviour) is the target
that matters. ``InfluenceConfig(target="valid")`` swaps g_bar for

    g_valid = (1/U) sum_u grad L^val_u(theta_hat),
    L^val_u = (1/|T_u|) sum_{t in T_u} CE(softmax(f(x_u)), t)

over the U validation users (the rows of ``valid.parquet`` with at least one item), with x_u the
user's history before the period (the user's whole training sequence) and T_u the user's items
in the period. f(x_u) is the surrogate's next-item scores over EVERY item (``score_next``, what
ranking and evaluation use), so the target is the exact full-softmax cross-entropy of the
period, whichever ``loss`` trains the surrogate; each user weighs the same (as the per-user
Recall/NDCG of evaluation). Everything else is unchanged: H stays the Hessian of the training
objective, v = (H + dI)^-1 g_valid is solved once, and influence(s) = (1/n) grad L_s . v, so a
positive score means that removing s raises the validation loss.

:func:`read_target_rows` reads and checks those rows (a missing split, or one without a user
holding a validation item, is a :class:`DataError` naming the file and the field);
:func:`valid_mean_gradient` is g_valid; :data:`surrogate_valid_loss` is L^val as a ``loss_fn``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from engine.errors import DataError

__all__ = ["TARGETS", "read_target_rows", "surrogate_valid_loss", "valid_mean_gradient", "valid_batches"]

#: the influence targets: the mean training loss (DEALRec) or the validation period's loss
TARGETS = ("train", "valid")


def read_target_rows(data_dir: str | os.PathLike, *, max_rows: int | None = None, seed: int = 0,
                     n_items: int | None = None, needed_by: str = "the validation target",
                     hint: str = "") -> pa.Table:
    """The validation users of a prepared folder that have at least one item in the period.

    Args:
        data_dir: a prepared folder (``dealrec prepare``) holding ``valid.parquet``.
        max_rows: a seeded random subset of that many validation users (None = all).
        seed: seed of the subset.
        n_items: catalogue size: item ids are checked against it (None: not checked).
        needed_by: what needs them (named in the error message, e.g. an option).
        hint: appended to the error message (e.g. the option that avoids the target).

    Returns:
        ``valid.parquet``'s rows (``user_id``, ``history``, ``targets``) with a non-empty
        ``targets``, in file order.

    Raises:
        DataError: ``valid.parquet`` is missing (field ``valid``) or unreadable, holds no user
            with a validation item (field ``targets``), or an item id outside the catalogue.
    """
    from engine.data.schema import check_item_ids, read_split

    path = Path(data_dir) / "valid.parquet"
    if not path.exists():
        raise DataError(f"{needed_by} needs the validation split of the prepared data, and there is none; prepare "
                        f"the data with a valid share > 0{hint}", path=path, field="valid")
    rows = read_split(data_dir, "valid")
    lengths = pc.list_value_length(rows.column("targets")).to_numpy(zero_copy_only=False)
    rows = rows.filter(pa.array(lengths > 0))
    if rows.num_rows == 0:
        raise DataError(f"{needed_by} needs validation users, and no user of the validation split has an item in "
                        f"the period; prepare the data with a valid share > 0{hint}", path=path, field="targets")
    if n_items is not None:
        check_item_ids(rows.column("history").combine_chunks().flatten().to_numpy(), n_items, path=path,
                       field="history")
        check_item_ids(rows.column("targets").combine_chunks().flatten().to_numpy(), n_items, path=path,
                       field="targets")
    if max_rows is not None and max_rows < rows.num_rows:
        from engine.data.schema import sample_rows

        rows = rows.take(pa.array(sample_rows(rows.num_rows, max_rows, seed)))
    return rows


class _SurrogateValidLoss:
    """``loss_fn(model, batch) -> Tensor[B]``: per validation row, the mean over its targets of the
    full-softmax cross-entropy of the next item after its history (rows of ``make_batches`` of a
    valid/test table: ``targets`` [B, W], -1 padded). A row without targets has loss 0."""

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        z = model.score_next(batch)  # [B, n_items]
        tg = batch["targets"]
        mask = (tg >= 0).to(z.dtype)
        ce = torch.logsumexp(z, -1, keepdim=True) - z.gather(1, tg.clamp_min(0))
        return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def __repr__(self) -> str:
        return "surrogate_valid_loss"


surrogate_valid_loss = _SurrogateValidLoss()


def valid_batches(rows: Any, *, batch_size: int, max_len: int) -> list[dict[str, Tensor]]:
    """Length-sorted surrogate batches of validation rows (``make_batches`` of eval rows)."""
    from engine.surrogate import make_batches

    return make_batches(rows, batch_size=batch_size, max_len=max_len, order="length")


def valid_mean_gradient(model: nn.Module, rows: Any | Iterable[Any], *, batch_size: int = 256) -> tuple[Tensor, int]:
    """g_valid = (1/U) sum_u grad L^val_u at the model's parameters (eval mode), flat over the
    trainable parameters in :func:`engine.influence.trainable_params` order.

    Args:
        model: the trained surrogate.
        rows: validation rows (a table with ``history`` and ``targets``, every row with at least
            one target: :func:`read_target_rows`), or an iterable of such tables.
        batch_size: rows per batch.

    Returns:
        (flat g_valid in the parameters' dtype, U).

    Raises:
        ValueError: no rows.
    """
    from engine.influence.hvp import mean_gradient

    chunks = [rows] if hasattr(rows, "num_rows") or isinstance(rows, dict) else list(rows)
    batches = [b for c in chunks for b in valid_batches(c, batch_size=batch_size, max_len=model.cfg.max_len)]
    if any(bool((b["targets"] < 0).all(dim=1).any()) for b in batches):
        raise DataError("a validation row has no target; pass the rows of read_target_rows", field="targets")
    return mean_gradient(model, surrogate_valid_loss, batches)
