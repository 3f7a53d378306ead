"""Surrogate sequential recommenders (SASRec, BERT4Rec) for the influence score.

The surrogate is a small recommender trained on all n samples; its per-sample loss is
what influence functions differentiate (DESIGN.md section 1).

Token layout (shared by every surrogate): token 0 = padding, token 1 = BOS for SASRec
(= [MASK] for BERT4Rec), token ``item_id + 2`` = item ``item_id`` (item ids are the dense
0..n_items-1 of the canonical items table). Item embeddings are tied with the output
layer: ``logits = h @ E[2:].T``, so the output has exactly ``n_items`` columns.

Batches (:func:`make_batches`) hold, per sample, the FULL training sequence
``s = history + [target]`` (last ``max_len`` items), left-padded:

- ``labels[b]`` = ``s[-max_len:]`` (item ids, -1 at padding),
- ``seq[b]``    = ``([BOS] + s[:-1])[-max_len:]`` as tokens, so that the output at every
  position t predicts ``labels[t]`` (next-item prediction at every position, SASRec
  standard; the BOS lets the first item be predicted too, so users with a single
  training item still contribute a loss, unlike the authors' code),
- ``target`` = the sample's target (the last label), ``sample_id``.

The output at the last position of ``seq`` is the next-item prediction after the history,
so one batch serves training, influence, EL2N and ranking.

Per-sample loss (what influence, GraNd and the training objective use; deterministic):

    L_s(theta) = mean over the valid positions t of s of  CE(softmax(logits_t), labels_t)

i.e. full-softmax cross-entropy over all items, averaged over the positions of the
sample's own training sequence (eval mode, no dropout, no sampled negatives). SASRec is
trained on exactly the objective that influence differentiates, except for dropout:

    J(theta) = (1/n) sum_s L_s(theta) + (weight_decay / 2) * ||theta||^2

(Adam's coupled L2 ``weight_decay``, applied to every parameter). So
``influence_scores(..., damping=cfg.weight_decay)`` uses H = Hessian of J and g_bar =
gradient of the mean loss R = (1/n) sum L_s, which is not 0 at the trained point
(weight decay + early stopping). BERT4Rec trains on random cloze masks; its per-sample
influence loss uses a mask pattern fixed by (sample_id, position), always including the
target, so it is deterministic but only approximates its training objective.

``loss='sampled'`` (large catalogues: cost per position ~ K instead of n_items): the softmax of
every position of sample s runs over its label and K negatives fixed by (seed, sample_id)
(:func:`_fixed_negatives`; a negative equal to the label is masked), so L_s stays deterministic
and batch-independent. Training draws fresh negatives every step, so J is then the expectation
of that objective over negative draws, and influence differentiates one fixed draw of it (the
same approximation as BERT4Rec's fixed masks). Ranking and evaluation always use every item.

Positions are counted from the right (the last item has position 0), exactly SASRec's
left-padding-to-max_len convention; hence a sample's output does not depend on how
much padding its batch has, and scores are independent of batch composition.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ConfigError, DataError, check

__all__ = [
    "BERT4Rec",
    "SASRec",
    "Surrogate",
    "SurrogateConfig",
    "build_surrogate",
    "evaluate_ranking",
    "load_surrogate",
    "make_batches",
    "save_surrogate",
    "surrogate_from_payload",
    "surrogate_loss",
    "surrogate_payload",
    "surrogate_to_payload",
    "train_surrogate",
]

PAD, BOS, MASK = 0, 1, 1
ITEM_OFFSET = 2
MODELS = ("sasrec", "bert4rec")
DISTRIBUTED = ("local", "ray_train")
LOSSES = ("full", "sampled")


@dataclass
class SurrogateConfig:
    """Configuration of the surrogate recommender and its training (validated as a whole)."""

    model: str = field(default="sasrec", metadata={"help": "surrogate architecture: 'sasrec' or 'bert4rec'"})
    hidden: int = field(default=64, metadata={"help": "embedding / hidden size (paper: 64)"})
    n_blocks: int = field(default=2, metadata={"help": "transformer blocks (paper: 2)"})
    n_heads: int = field(default=2, metadata={"help": "attention heads; must divide hidden (paper: 2)"})
    max_len: int = field(default=50, metadata={"help": "positions per sequence: the last max_len items (paper: 50)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in training; influence always runs in eval mode"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "L2 coefficient lambda: objective = mean CE + lambda/2 ||theta||^2 (use it as influence damping)"},
    )
    batch_size: int = field(default=256, metadata={"help": "training mini-batch size (samples)"})
    epochs: int = field(default=30, metadata={"help": "maximum training epochs"})
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without a better validation Recall@K"})
    eval_k: int = field(default=20, metadata={"help": "K of the validation Recall@K / NDCG@K"})
    mask_prob: float = field(default=0.2, metadata={"help": "BERT4Rec cloze mask probability (ignored by SASRec)"})
    loss: str = field(
        default="full",
        metadata={
            "help": "per-sample loss: 'full' = softmax cross-entropy over every item (exact; cost ~ n_items per "
            "position); 'sampled' = softmax over the target and `negatives` items fixed by (seed, sample_id) "
            "(deterministic, batch-independent; cost ~ negatives per position, for large catalogues)"
        },
    )
    negatives: int = field(
        default=128,
        metadata={"help": "loss='sampled': negative items per sample (drawn afresh per step in training, "
                          "fixed by (seed, sample_id) in the influence loss)"},
    )
    loss_chunk: int = field(
        default=256,
        metadata={"help": "positions per full-softmax chunk (memory: chunk x n_items floats; 256 keeps it in cache)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, shuffling and masks"})
    valid_users: int | None = field(
        default=None,
        metadata={"help": "early stopping evaluates a seeded random subset of this many validation users "
                          "(None = all): bounded validation time and memory on millions of users"})
    max_minutes: float | None = field(default=None, metadata={"help": "time box for training (None = no limit)"})
    shuffle_buffer: int = field(
        default=131_072,
        metadata={"help": "streamed training: samples held for shuffling. Each epoch reads the sample files in a "
                          "seeded random order into a buffer of at least this many samples and trains on a random "
                          "permutation of it, so batches mix many files even when the files are sorted (by user "
                          "id, by time); >= the number of samples = a full shuffle (~800 bytes per sample)"})
    log_every: int = field(default=50, metadata={"help": "log a progress line every this many batches (0 = never)"})
    distributed: str = field(
        default="local",
        metadata={
            "help": "where the surrogate trains: 'local' = train_surrogate in the calling process (small data); "
            "'ray_train' = a Ray Train TorchTrainer with num_workers DDP ranks (large data; "
            "jobs/surrogate_train.py). The engine itself never imports Ray"
        },
    )
    num_workers: int = field(
        default=2,
        metadata={
            "help": "Ray Train data-parallel ranks when distributed='ray_train' (ignored by 'local'); "
            "each rank trains on batch_size // num_workers samples per step, so batch_size must be a "
            "multiple of num_workers"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ConfigError listing all problems at once."""
        p: list[str] = []
        check(p, self.model in MODELS, f"model={self.model!r}: expected one of {MODELS}")
        check(p, isinstance(self.hidden, int) and self.hidden > 0, f"hidden={self.hidden!r}: must be a positive int")
        check(p, isinstance(self.n_blocks, int) and self.n_blocks >= 1, f"n_blocks={self.n_blocks!r}: must be >= 1")
        check(p, isinstance(self.n_heads, int) and self.n_heads >= 1, f"n_heads={self.n_heads!r}: must be >= 1")
        if isinstance(self.hidden, int) and isinstance(self.n_heads, int) and self.n_heads >= 1 and self.hidden > 0:
            check(p, self.hidden % self.n_heads == 0,
                  f"n_heads={self.n_heads}: must divide hidden={self.hidden} (e.g. n_heads=2)")
        check(p, isinstance(self.max_len, int) and self.max_len >= 1, f"max_len={self.max_len!r}: must be >= 1")
        check(p, 0.0 <= self.dropout < 1.0, f"dropout={self.dropout!r}: must be in [0, 1)")
        check(p, self.lr > 0, f"lr={self.lr!r}: must be > 0")
        check(p, self.weight_decay >= 0, f"weight_decay={self.weight_decay!r}: must be >= 0")
        check(p, isinstance(self.shuffle_buffer, int) and not isinstance(self.shuffle_buffer, bool)
              and self.shuffle_buffer >= 1, f"shuffle_buffer={self.shuffle_buffer!r}: must be an int >= 1")
        check(p, isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size={self.batch_size!r}: must be >= 1")
        check(p, isinstance(self.epochs, int) and self.epochs >= 1, f"epochs={self.epochs!r}: must be >= 1")
        check(p, isinstance(self.patience, int) and self.patience >= 1, f"patience={self.patience!r}: must be >= 1")
        check(p, isinstance(self.eval_k, int) and self.eval_k >= 1, f"eval_k={self.eval_k!r}: must be >= 1")
        check(p, self.valid_users is None or (isinstance(self.valid_users, int) and self.valid_users >= 1),
              f"valid_users={self.valid_users!r}: must be an int >= 1 or None (all)")
        check(p, 0.0 < self.mask_prob < 1.0, f"mask_prob={self.mask_prob!r}: must be in (0, 1)")
        check(p, self.loss in LOSSES, f"loss={self.loss!r}: expected one of {LOSSES}")
        check(p, isinstance(self.negatives, int) and not isinstance(self.negatives, bool) and self.negatives >= 1,
              f"negatives={self.negatives!r}: must be an int >= 1")
        check(p, isinstance(self.loss_chunk, int) and self.loss_chunk >= 1, f"loss_chunk={self.loss_chunk!r}: must be >= 1")
        check(p, self.max_minutes is None or self.max_minutes > 0, f"max_minutes={self.max_minutes!r}: must be > 0 or None")
        check(p, isinstance(self.log_every, int) and self.log_every >= 0, f"log_every={self.log_every!r}: must be >= 0")
        check(p, self.distributed in DISTRIBUTED, f"distributed={self.distributed!r}: expected one of {DISTRIBUTED}")
        num_workers_ok = isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool) \
            and self.num_workers >= 1
        check(p, num_workers_ok, f"num_workers={self.num_workers!r}: must be an int >= 1")
        if num_workers_ok and self.distributed == "ray_train" and isinstance(self.batch_size, int) \
                and self.batch_size >= 1:
            check(p, self.batch_size % self.num_workers == 0,
                  f"batch_size={self.batch_size} with num_workers={self.num_workers}: distributed='ray_train' "
                  f"needs batch_size to be a multiple of num_workers (per-rank batch = batch_size // num_workers)")
        if p:
            raise ConfigError(p, config="SurrogateConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SurrogateConfig:
        """Build from a dict; unknown keys are reported with the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError([f"unknown field {k!r}; valid fields: {sorted(names)}" for k in unknown],
                              config="SurrogateConfig")
        return cls(**dict(d))


@runtime_checkable
class Surrogate(Protocol):
    """What the influence engine needs from a surrogate recommender."""

    n_items: int

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Deterministic loss of every sample of the batch, shape [B] (eval mode for influence)."""
        ...

    def score_next(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Scores of every item as the next item after each sample's history, shape [B, n_items]."""
        ...


# --------------------------------------------------------------------------- batching


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


# --------------------------------------------------------------------------- models


class _Block(nn.Module):
    """Pre-LN transformer block with hand-written softmax attention (forward-mode AD works)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, d)
        self.ff2 = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        dh = d // self.heads
        q, k, v = (z.reshape(b, t, self.heads, dh).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        # finite fill (not -inf): rows stay well defined; every row allows its own position
        att = att.masked_fill(~allowed[:, None], -1e9).softmax(-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ff2(self.drop(F.gelu(self.ff1(self.ln2(x))))))


class _Encoder(nn.Module):
    def __init__(self, n_items: int, cfg: SurrogateConfig, *, causal: bool):
        super().__init__()
        self.n_items, self.cfg, self.causal = n_items, cfg, causal
        d = cfg.hidden
        self.item_emb = nn.Embedding(n_items + ITEM_OFFSET, d, padding_idx=PAD)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(d, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_blocks))
        self.ln = nn.LayerNorm(d)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()

    def encode(self, tokens: Tensor) -> Tensor:
        """Hidden states [B, T, d] of left-padded token rows [B, T] (T <= max_len)."""
        b, t = tokens.shape
        if t > self.cfg.max_len:
            tokens = tokens[:, -self.cfg.max_len:]
            t = self.cfg.max_len
        valid = tokens != PAD
        pos = torch.arange(t - 1, -1, -1, device=tokens.device)  # last item -> position 0
        x = self.item_emb(tokens) * math.sqrt(self.cfg.hidden) + self.pos_emb(pos)[None]
        x = self.emb_drop(x) * valid[..., None]
        eye = torch.eye(t, dtype=torch.bool, device=tokens.device)
        allowed = valid[:, None, :] | eye[None]
        if self.causal:
            allowed = allowed & torch.ones(t, t, dtype=torch.bool, device=tokens.device).tril()[None]
        for blk in self.blocks:
            x = blk(x, allowed) * valid[..., None]
        return self.ln(x)

    def item_logits(self, h: Tensor) -> Tensor:
        return h @ self.item_emb.weight[ITEM_OFFSET:].T

    def _ce(self, h: Tensor, labels: Tensor) -> Tensor:
        """Full-softmax CE per row: logsumexp(h E^T) - h . e_label (the target logit is taken
        directly from its embedding: in forward-mode AD this is ~2x cheaper than cross_entropy)."""
        return torch.logsumexp(self.item_logits(h), -1) - (h * self.item_emb(labels + ITEM_OFFSET)).sum(-1)

    def _sampled_logits(self, h: Tensor, labels: Tensor, negs: Tensor) -> Tensor:
        """[target, negatives] logits per position: h [B, T, d], labels [B, T] (>= 0), negs [B, K]
        -> [B, T, 1 + K]. One [T, d] x [d, K] product per sample (the negatives are the sample's,
        shared by its positions). A negative equal to the position's label is masked (finite
        -1e9, so forward-mode AD stays finite): the softmax is over the target and the other
        negatives."""
        pos = (h * self.item_emb(labels + ITEM_OFFSET)).sum(-1, keepdim=True)
        neg = torch.bmm(h, self.item_emb(negs + ITEM_OFFSET).transpose(1, 2))
        neg = neg.masked_fill(negs[:, None, :] == labels[:, :, None], -1e9)
        return torch.cat([pos, neg], dim=-1)

    def negatives_for(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None,
                      *, fixed: bool = True) -> Tensor | None:
        """Per-sample negatives [B, K] of loss='sampled' (None for loss='full').

        ``fixed=True``: a function of (cfg.seed, sample_id) only, so a sample's loss does not
        depend on its batch (the influence loss). ``fixed=False``: fresh draws from ``generator``
        (training)."""
        if self.cfg.loss != "sampled":
            return None
        sid = batch["sample_id"]
        if fixed:
            return _fixed_negatives(sid, self.cfg.negatives, self.n_items, self.cfg.seed)
        neg = torch.randint(0, self.n_items, (sid.shape[0], self.cfg.negatives), generator=generator)
        return neg.to(sid.device)

    def _positions_ce(self, h: Tensor, labels: Tensor, weights: Tensor, negs: Tensor | None = None) -> Tensor:
        """Per-sample weighted mean CE over positions. h [B,T,d], labels [B,T], weights [B,T] (0/1);
        ``negs`` [B, K]: sampled softmax over the target and the sample's negatives (None = full)."""
        b = h.shape[0]
        cnt = weights.sum(1).clamp_min(1.0)
        if negs is not None:
            # dense over [B, T, 1+K] (cheap: K << n_items); no data-dependent indexing, vmap-safe
            z = self._sampled_logits(h, labels.clamp_min(0), negs)
            ce = torch.logsumexp(z, -1) - z[..., 0]
            return (ce * weights).sum(1) / cnt
        if b == 1:
            # dense path: no data-dependent indexing, so the loss works under vmap (GraNd)
            ce = self._ce(h[0], labels[0].clamp_min(0))
            return ((ce * weights[0]).sum() / cnt[0]).reshape(1)
        flat = weights.reshape(-1) > 0
        idx = flat.nonzero().squeeze(1)
        hv = h.reshape(-1, h.shape[-1]).index_select(0, idx)
        lv = labels.reshape(-1).index_select(0, idx)
        row = idx // h.shape[1]
        chunk = self.cfg.loss_chunk
        parts = []
        for s in range(0, hv.shape[0], chunk):
            parts.append(self._ce(hv[s:s + chunk], lv[s:s + chunk]))
        ce = torch.cat(parts) if parts else hv.new_zeros(0)
        total = torch.zeros(b, dtype=ce.dtype, device=ce.device).index_add(0, row, ce)
        return total / cnt.to(ce.dtype)


def _fixed_negatives(sample_id: Tensor, k: int, n_items: int, seed: int) -> Tensor:
    """Deterministic negatives [B, k] in 0..n_items-1 from (seed, sample_id, slot): a fixed integer hash."""
    slot = torch.arange(k, device=sample_id.device, dtype=torch.int64)
    x = (sample_id[:, None].to(torch.int64) * 1000003 + slot[None] * 7919 + seed * 104729 + 17) & 0x7FFFFFFF
    for mult in (1103515245, 1274126177, 2654435761 & 0x7FFFFFFF):
        x = (x * mult + 12345) & 0x7FFFFFFF
        x = x ^ (x >> 15)
    return x % n_items


class SASRec(_Encoder):
    """SASRec (Kang & McAuley 2018): causal self-attention, tied item embeddings.

    Args:
        n_items: catalogue size (item ids 0..n_items-1).
        cfg: a :class:`SurrogateConfig` (hidden, n_blocks, n_heads, max_len, dropout).
    """

    def __init__(self, n_items: int, cfg: SurrogateConfig):
        super().__init__(n_items, cfg, causal=True)

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Mean CE over the positions of each sample's training sequence, [B]: full softmax, or
        (loss='sampled') softmax over the target and the sample's fixed negatives."""
        return self._loss(batch, self.negatives_for(batch))

    def _loss(self, batch: Mapping[str, Tensor], negs: Tensor | None) -> Tensor:
        labels = batch["labels"]
        h = self.encode(batch["seq"])
        labels = labels[:, -h.shape[1]:]
        return self._positions_ce(h, labels, (labels >= 0).to(h.dtype), negs)

    def training_loss(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Mean of per-sample losses (the training objective's data term; dropout per train mode).
        With loss='sampled' the negatives are drawn afresh every step (from ``generator``)."""
        return self._loss(batch, self.negatives_for(batch, generator, fixed=False)).mean()

    def score_next(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits of every item after each sample's history, [B, n_items]."""
        return self.item_logits(self.encode(batch["seq"])[:, -1])


def _fixed_mask(sample_id: Tensor, t: int, prob: float, seed: int) -> Tensor:
    """Deterministic cloze mask [B, t] from (sample_id, position-from-right): a fixed hash."""
    pos = torch.arange(t - 1, -1, -1, device=sample_id.device)
    x = (sample_id[:, None].to(torch.int64) * 1000003 + pos[None] * 7919 + seed * 104729) & 0x7FFFFFFF
    x = (x * 1103515245 + 12345) & 0x7FFFFFFF
    x = (x ^ (x >> 13)) * 1274126177 & 0x7FFFFFFF
    return (x.to(torch.float64) / 0x7FFFFFFF) < prob


class BERT4Rec(_Encoder):
    """BERT4Rec (Sun et al. 2019): bidirectional attention, cloze objective, tied embeddings.

    Training masks random positions (``cfg.mask_prob``) of the full sequence and always the
    last item (the next-item task). :meth:`per_sample_loss` uses a fixed mask from
    (sample_id, position) plus the last item, so it is deterministic.
    """

    def __init__(self, n_items: int, cfg: SurrogateConfig):
        super().__init__(n_items, cfg, causal=False)

    def _cloze_loss(self, batch: Mapping[str, Tensor], masked: Tensor, negs: Tensor | None = None) -> Tensor:
        labels = batch["labels"][:, -self.cfg.max_len:]
        valid = labels >= 0
        last = torch.arange(valid.shape[1], device=valid.device) == valid.shape[1] - 1
        masked = (masked | last[None]) & valid
        tokens = torch.where(valid, labels + ITEM_OFFSET, torch.zeros_like(labels))
        tokens = torch.where(masked, torch.full_like(tokens, MASK), tokens)
        h = self.encode(tokens)
        return self._positions_ce(h, labels, masked.to(h.dtype), negs)

    def per_sample_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Deterministic cloze CE per sample (fixed mask + last item), [B]."""
        t = min(batch["labels"].shape[1], self.cfg.max_len)
        m = _fixed_mask(batch["sample_id"], t, self.cfg.mask_prob, self.cfg.seed)
        return self._cloze_loss(batch, m, self.negatives_for(batch))

    def training_loss(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Mean cloze CE with fresh random masks (training only)."""
        t = min(batch["labels"].shape[1], self.cfg.max_len)
        m = torch.rand(batch["labels"].shape[0], t, generator=generator) < self.cfg.mask_prob
        negs = self.negatives_for(batch, generator, fixed=False)
        return self._cloze_loss(batch, m.to(batch["labels"].device), negs).mean()

    def score_next(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits at an appended [MASK] after each history, [B, n_items]."""
        seq = batch["seq"][:, 1:]
        seq = torch.where(seq == BOS, torch.zeros_like(seq), seq)
        tokens = torch.cat([seq, torch.full_like(batch["seq"][:, :1], MASK)], dim=1)
        return self.item_logits(self.encode(tokens)[:, -1])


def build_surrogate(n_items: int, cfg: SurrogateConfig) -> SASRec | BERT4Rec:
    """A freshly initialised surrogate (seeded by ``cfg.seed``).

    Raises:
        ConfigError: ``n_items`` < 1.
    """
    if not isinstance(n_items, int) or n_items < 1:
        raise ConfigError([f"n_items={n_items!r}: must be a positive int"], config="surrogate")
    torch.manual_seed(cfg.seed)
    return (SASRec if cfg.model == "sasrec" else BERT4Rec)(n_items, cfg)


def _sasrec_position_logits(model: SASRec, batch: Mapping[str, Tensor]) -> Tensor:
    """Logits at the valid positions of the batch (row-major order), TARGET FIRST: column 0 is
    the label's logit, the other columns are the softmax's other classes (every item with the
    label's own column masked for loss='full': [N_valid, 1 + n_items]; the sample's fixed
    negatives for loss='sampled': [N_valid, 1 + K]). The CE of every row is then
    ``cross_entropy(z, 0)`` whatever the loss, and masked columns (finite -1e9) carry no mass."""
    if not isinstance(model, SASRec):
        raise ConfigError(["gauss_newton=True is implemented for SASRec surrogates only"], config="iHVP solver")
    h = model.encode(batch["seq"])
    labels = batch["labels"][:, -h.shape[1]:]
    idx = (labels.reshape(-1) >= 0).nonzero().squeeze(1)
    negs = model.negatives_for(batch)
    if negs is not None:
        z = model._sampled_logits(h, labels.clamp_min(0), negs)
        return z.reshape(-1, z.shape[-1]).index_select(0, idx)
    hv = h.reshape(-1, h.shape[-1]).index_select(0, idx)
    lv = labels.reshape(-1).index_select(0, idx)
    z = model.item_logits(hv)
    pos = z.gather(1, lv[:, None])
    other = z.masked_fill(F.one_hot(lv, z.shape[1]).bool(), -1e9)
    return torch.cat([pos, other], dim=1)


def _sasrec_loss_on_logits(z: Tensor, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-sample mean CE from :func:`_sasrec_position_logits` output (the SASRec per-sample loss)."""
    labels = batch["labels"]
    flat = labels.reshape(-1)
    idx = (flat >= 0).nonzero().squeeze(1)
    row = idx // labels.shape[1]
    ce = F.cross_entropy(z, torch.zeros(z.shape[0], dtype=torch.long, device=z.device), reduction="none")
    cnt = (labels >= 0).sum(1).clamp_min(1).to(ce.dtype)
    return torch.zeros(labels.shape[0], dtype=ce.dtype, device=ce.device).index_add(0, row, ce) / cnt


class _SurrogateLoss:
    """``loss_fn(model, batch) = model.per_sample_loss(batch)``; ``split`` enables Gauss-Newton (SASRec)."""

    split = (_sasrec_position_logits, _sasrec_loss_on_logits)

    def __call__(self, model: Surrogate, batch: Mapping[str, Tensor]) -> Tensor:
        return model.per_sample_loss(batch)

    def __repr__(self) -> str:
        return "surrogate_loss"


surrogate_loss = _SurrogateLoss()
"""The loss_fn of the influence engine: ``surrogate_loss(model, batch) -> model.per_sample_loss(batch)`` [B].

Its ``split`` attribute (position logits, CE on them) lets ``solve_ihvp(..., gauss_newton=True)``
use the PSD Gauss-Newton matrix of SASRec's full-softmax CE."""


# --------------------------------------------------------------------------- evaluation


EVAL_PAIRS = 1 << 24  # (user, item) scores held at once by evaluate_ranking


@torch.no_grad()
def evaluate_ranking(model: Surrogate, batches: list[dict[str, Tensor]], *, k: int = 20) -> dict[str, float]:
    """Full-ranking Recall@K and NDCG@K over eval batches (rows with targets; seen items masked).

    Args:
        model: a surrogate.
        batches: eval batches from :func:`make_batches` on a valid/test table.
        k: cut-off.

    Returns:
        ``{"recall": ..., "ndcg": ..., "users": ...}`` averaged over rows with >= 1 target.
    """
    was = model.training
    model.eval()
    rec, ndcg, users = 0.0, 0.0, 0
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    # score at most EVAL_PAIRS (user, item) pairs at once: a [512 x 250k] float64 score matrix
    # alone is 1 GB (measured: validation of 5,000 users peaked at 3.1 GB, now 0.85 GB); per-user
    # metrics do not depend on how rows are grouped
    n_items = int(getattr(model, "n_items", 0)) or 1
    rows_per_pass = max(1, EVAL_PAIRS // n_items)

    def row_slices(b: dict[str, Tensor]) -> Iterator[dict[str, Tensor]]:
        n = int(b["targets"].shape[0])
        for s in range(0, n, rows_per_pass):
            yield b if rows_per_pass >= n else {key: v[s:s + rows_per_pass] for key, v in b.items()}

    try:
        for b in (sub for whole in batches for sub in row_slices(whole)):
            tg = b["targets"].cpu()  # no-op on CPU; the hit counting runs on the CPU
            has = (tg >= 0).any(1)
            if not has.any():
                continue
            scores = model.score_next(b).double()
            seen = b["seen"]
            rows = torch.arange(seen.shape[0], device=seen.device)[:, None].expand_as(seen)
            ok = seen >= 0
            scores[rows[ok], seen[ok]] = -float("inf")
            top = scores.topk(min(k, scores.shape[1]), dim=1).indices.cpu()  # [B, k]
            hit = torch.zeros_like(top, dtype=torch.bool)
            for j in range(tg.shape[1]):
                t = tg[:, j:j + 1]
                hit |= (top == t) & (t >= 0)
            n_t = (tg >= 0).sum(1).double()
            r = hit.sum(1).double() / n_t.clamp_min(1)
            dcg = (hit.double() * disc[: top.shape[1]]).sum(1)
            idcg = torch.stack([disc[: int(min(m, k))].sum() for m in n_t.tolist()])
            rec += float(r[has].sum())
            ndcg += float((dcg / idcg.clamp_min(1e-12))[has].sum())
            users += int(has.sum())
    finally:
        model.train(was)
    return {"recall": rec / max(users, 1), "ndcg": ndcg / max(users, 1), "users": float(users)}


# --------------------------------------------------------------------------- training


class _TrainStep(nn.Module):
    """``forward(batch, generator) = model.training_loss(batch, generator)``.

    The module a data-parallel wrapper (DDP via ``ray.train.torch.prepare_model``) is given:
    DDP synchronises the gradients of what its ``forward`` computes, and the surrogates expose
    their objective as ``training_loss``. Parameters are the model's own (prefix ``model.``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        return self.model.training_loss(batch, generator)


def _rank_seed(seed: int, rank: int) -> int:
    """A seed derived from (seed, rank) for ranks > 0 (rank 0 keeps ``seed``'s own stream)."""
    return int(np.random.SeedSequence([int(seed), int(rank)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _dist_all_gather(obj: Any) -> list[Any]:
    """Default ``reduce_fn``: ``torch.distributed.all_gather_object`` over the default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(["world_size > 1 needs an initialised torch.distributed process group "
                           "(Ray Train creates one) or an explicit reduce_fn"], config="train_surrogate")
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _no_log(_: str) -> None:
    return None


def _buffer_groups(order: Sequence[int], chunk: Callable[[int], dict[str, np.ndarray]],
                   buffer: int) -> Iterator[dict[str, np.ndarray]]:
    """Encoded chunks in ``order``, concatenated until each group holds >= ``buffer`` rows
    (whole chunks; the last group may be smaller)."""
    parts: list[dict[str, np.ndarray]] = []
    rows = 0
    for i, ci in enumerate(order):
        parts.append(chunk(int(ci)))
        rows += len(parts[-1]["sample_id"])
        if rows >= buffer or i == len(order) - 1:
            g = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            parts, rows = [], 0
            yield g
            del g  # one buffer alive at a time (the caller drops its reference before the next)


def train_surrogate(
    samples: pa.Table | Mapping[str, np.ndarray] | Sequence[Callable[[], Any]],
    n_items: int,
    cfg: SurrogateConfig,
    *,
    valid: pa.Table | Mapping[str, np.ndarray] | None = None,
    log: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    reduce_fn: Callable[[Any], list[Any]] | None = None,
) -> tuple[SASRec | BERT4Rec, list[dict[str, float]]]:
    """Train a surrogate on all samples; a pure function (no Ray), also the loop of one data-parallel rank.

    Objective: J(theta) = mean_s L_s(theta) + (weight_decay/2)||theta||^2 (Adam with coupled
    L2), dropout on. Early stopping on validation Recall@K (full ranking, seen items masked);
    the best checkpoint is returned. Without ``valid`` the last epoch is returned.

    Data parallel (``world_size`` > 1; jobs/surrogate_train.py runs it under Ray Train): every
    rank draws the same seeded epoch permutation, pads it cyclically to a multiple of
    ``world_size`` (as torch's DistributedSampler does, so every rank runs the same number of
    steps) and takes ``perm[rank::world_size]`` in batches of ``cfg.batch_size // world_size``;
    with DDP's gradient averaging one step equals a local step on ``cfg.batch_size`` samples.
    Rank 0 runs the validation; its Recall/NDCG, the summed train loss and the time-box flag
    reach every rank through ``reduce_fn``, so every rank takes the same early-stopping
    decision, keeps the same best state and returns the same (unwrapped) model. Dropout (and
    BERT4Rec's training masks) use a per-(seed, rank) stream; rank 0's is the local one, so
    ``world_size=1`` gives exactly the local result. Only rank 0 logs.

    Streaming (bounded memory): ``samples`` may be a list of loaders, each a callable that
    returns one chunk (a Table or dict of numpy; e.g. one samples Parquet file). Every epoch
    reads the chunks in a seeded random order into a shuffle buffer of at least
    ``cfg.shuffle_buffer`` samples (whole chunks) and trains on a seeded random permutation of
    the buffer, then refills it. A shuffle within one file at a time is not enough: prepared
    files are often sorted (Games' are by user id, i.e. by time: later files have newer items and
    shorter histories), and training on them one after the other let each file undo the last
    (Games: validation Recall@20 fell from 0.025 to 0.015 over 3 epochs, against 0.044 for the
    same data in memory). Data-parallel ranks all read each buffer and take their stride of it
    (cyclic padding per buffer). One chunk (an in-memory table) gives exactly the in-memory result.

    Args:
        samples: canonical samples (Table or dict of numpy), or a list of chunk loaders.
        n_items: catalogue size.
        cfg: validated :class:`SurrogateConfig`.
        valid: optional valid table (history, targets) for early stopping; read on rank 0 only
            (other ranks may pass None).
        log: receives one progress/metrics line at a time.
        rank: this process's data-parallel rank (0..world_size-1).
        world_size: number of data-parallel ranks; ``cfg.batch_size`` must be a multiple of it.
        wrap_model: applied once to the module whose ``forward(batch, generator)`` returns the
            training loss, e.g. ``ray.train.torch.prepare_model`` (DDP; may also move it to the
            rank's device; batches follow the parameters' device). None = no wrapper.
        reduce_fn: an all-gather of one picklable object per rank: ``reduce_fn(obj)`` returns
            the list of every rank's object in rank order, the same on every rank. Called once
            per epoch (and once per batch when ``cfg.max_minutes`` is set). None = ``torch.distributed.
            all_gather_object`` when ``world_size`` > 1 (needs an initialised process group).

    Returns:
        (model in eval mode, list of per-epoch metric dicts: epoch, train_loss, recall, ndcg, seconds).
        With ``world_size`` > 1, ``train_loss`` is the mean over all ranks' samples.

    Raises:
        ConfigError: bad config, n_items, rank/world_size. DataError: malformed samples or item ids >= n_items.
    """
    cfg.validate()
    bad_rank: list[str] = []
    check(bad_rank, isinstance(world_size, int) and world_size >= 1, f"world_size={world_size!r}: must be an int >= 1")
    check(bad_rank, isinstance(rank, int) and isinstance(world_size, int) and 0 <= rank < max(world_size, 1),
          f"rank={rank!r}: must be in 0..world_size-1 (world_size={world_size!r})")
    if not bad_rank:
        check(bad_rank, cfg.batch_size % world_size == 0,
              f"batch_size={cfg.batch_size} is not a multiple of world_size={world_size} "
              f"(per-rank batch = batch_size // world_size)")
    if bad_rank:
        raise ConfigError(bad_rank, config="train_surrogate")
    distributed = world_size > 1
    if distributed and reduce_fn is None:
        reduce_fn = _dist_all_gather
    if rank != 0:
        log = _no_log
    model = build_surrogate(n_items, cfg)  # seeds the global RNG with cfg.seed: same init on every rank
    if rank > 0:
        torch.manual_seed(_rank_seed(cfg.seed, rank))  # dropout stream of this rank
    in_memory = not (isinstance(samples, Sequence) and all(callable(c) for c in samples))
    if not in_memory and not samples:
        raise DataError("no sample chunks to train on", field="samples", value=0)
    loaders: list[Callable[[], Any]] = [lambda: samples] if in_memory else list(samples)

    def load(i: int) -> dict[str, np.ndarray]:
        enc = encode_samples(loaders[i](), max_len=cfg.max_len)
        if enc["labels"].max(initial=-1) >= n_items:
            raise DataError(f"item id >= n_items={n_items}", field="history/target", value=int(enc["labels"].max()))
        return enc

    if in_memory:  # encoded once and kept; streamed chunks are re-read every epoch
        whole = load(0)
        chunk: Callable[[int], dict[str, np.ndarray]] = lambda i: whole  # noqa: E731
    else:
        chunk = load
    step: nn.Module = _TrainStep(model)
    if wrap_model is not None:
        step = wrap_model(step)
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"

    def to_device(b: dict[str, Tensor]) -> dict[str, Tensor]:
        return b if on_cpu else {k: v.to(device, non_blocking=True) for k, v in b.items()}

    valid_batches = None
    if valid is not None and rank == 0:
        from engine.data.schema import sample_rows, take_rows

        keep = sample_rows(valid.num_rows if hasattr(valid, "num_rows") else len(valid["history"]),
                           cfg.valid_users, cfg.seed)
        if keep is not None:  # (read_split(max_rows=valid_users, seed=seed) already gives this subset)
            valid = take_rows(valid, keep)
        valid_batches = [to_device(b) for b in make_batches(valid, batch_size=512, max_len=cfg.max_len)]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed if rank == 0 else _rank_seed(cfg.seed, rank))
    history: list[dict[str, float]] = []
    best, best_state, bad = -1.0, None, 0
    t_start = time.perf_counter()
    batch = cfg.batch_size // world_size
    n_params = sum(p.numel() for p in model.parameters())
    if in_memory:
        n = len(whole["sample_id"])
        per_rank = -(-n // world_size)  # samples per rank and epoch (after cyclic padding)
        n_batches: int | str = math.ceil(per_rank / batch)
        log(f"[surrogate] {cfg.model}: {n_params:,} parameters, {n:,} samples, {n_items:,} items, "
            f"{n_batches} batches/epoch"
            + (f" per rank ({world_size} ranks x {batch} samples, {per_rank * world_size - n} padded)"
               if distributed else ""))
    else:
        n_batches = "?"
        log(f"[surrogate] {cfg.model}: {n_params:,} parameters, {len(loaders)} sample chunks streamed "
            f"through a shuffle buffer of >= {cfg.shuffle_buffer:,} samples (whole chunks), {n_items:,} items"
            + (f", {world_size} ranks x {batch} samples per step" if distributed else ""))
    for epoch in range(1, cfg.epochs + 1):
        step.train()
        t0 = time.perf_counter()
        tot, seen, bi = 0.0, 0, 0
        timed_out = False
        order = rng.permutation(len(loaders)) if len(loaders) > 1 else [0]
        for enc in _buffer_groups(order, chunk, cfg.shuffle_buffer):
            n_c = len(enc["sample_id"])
            perm = rng.permutation(n_c)
            if distributed:
                perm = np.resize(perm, -(-n_c // world_size) * world_size)[rank::world_size]
            for s in range(0, len(perm), batch):
                b = to_device(_slice_encoded(enc, perm[s:s + batch]))
                loss = step(b, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += float(loss.detach()) * len(b["sample_id"])
                seen += len(b["sample_id"])
                bi += 1
                if cfg.log_every and bi % cfg.log_every == 0:
                    log(f"[surrogate] epoch {epoch} batch {bi}/{n_batches} loss {tot / seen:.4f} "
                        f"({time.perf_counter() - t0:.0f}s)")
                if cfg.max_minutes is not None:
                    over = time.perf_counter() - t_start > cfg.max_minutes * 60
                    if distributed:
                        over = any(reduce_fn(over))  # every rank stops after the same batch
                    if over:
                        timed_out = True
                        break
            del enc
            if timed_out:
                break
        if not in_memory and epoch == 1 and not timed_out:
            n_batches = bi
        val = evaluate_ranking(model, valid_batches, k=cfg.eval_k) if valid_batches is not None else None
        if distributed:
            parts = reduce_fn({"loss_sum": tot, "seen": seen, "timed_out": timed_out,
                               "valid": None if val is None else {"recall": val["recall"], "ndcg": val["ndcg"]}})
            tot = float(sum(p["loss_sum"] for p in parts))
            seen = int(sum(p["seen"] for p in parts))
            timed_out = any(p["timed_out"] for p in parts)
            val = parts[0]["valid"]
        m: dict[str, float] = {"epoch": float(epoch), "train_loss": tot / max(seen, 1)}
        if val is not None:
            m.update(recall=val["recall"], ndcg=val["ndcg"])
        m["seconds"] = time.perf_counter() - t0
        history.append(m)
        log(f"[surrogate] epoch {epoch}/{cfg.epochs} " + " ".join(
            f"{k}={v:.4f}" for k, v in m.items() if k != "epoch") + (" (time box reached)" if timed_out else ""))
        if val is not None:
            if m["recall"] > best:
                best, bad = m["recall"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= cfg.patience:
                    log(f"[surrogate] early stop: no better Recall@{cfg.eval_k} for {cfg.patience} epochs "
                        f"(best {best:.4f})")
                    break
        if timed_out:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


# --------------------------------------------------------------------------- persistence


def surrogate_to_payload(model: SASRec | BERT4Rec) -> dict[str, Any]:
    """Plain-data form (config dict, n_items, state dict of numpy arrays) for ``ray.put``."""
    return {
        "config": model.cfg.to_dict(),
        "n_items": int(model.n_items),
        "state": {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()},
    }


def surrogate_payload(src: SASRec | BERT4Rec | str | os.PathLike) -> dict[str, Any]:
    """:func:`surrogate_to_payload` of a model or of a folder written by :func:`save_surrogate`."""
    if isinstance(src, nn.Module):
        return surrogate_to_payload(src)
    return surrogate_to_payload(load_surrogate(src))


def surrogate_from_payload(payload: Mapping[str, Any]) -> SASRec | BERT4Rec:
    """Rebuild a surrogate (eval mode) from :func:`surrogate_to_payload` output."""
    cfg = SurrogateConfig.from_dict(payload["config"])
    model = build_surrogate(int(payload["n_items"]), cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in payload["state"].items()})
    return model.eval()


def save_surrogate(model: SASRec | BERT4Rec, cfg: SurrogateConfig | None, path: str | os.PathLike) -> Path:
    """Write ``model.pt`` (state dict only, loadable with weights_only=True) and ``config.json``.

    Args:
        model: a surrogate.
        cfg: its config (None = ``model.cfg``).
        path: output folder (created).

    Returns:
        the folder.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path / "model.pt")
    (path / "config.json").write_text(
        json.dumps({"config": (cfg or model.cfg).to_dict(), "n_items": int(model.n_items)}, indent=2, sort_keys=True))
    return path


def load_surrogate(path: str | os.PathLike) -> SASRec | BERT4Rec:
    """Load a surrogate saved by :func:`save_surrogate` (eval mode; never unpickles objects).

    Raises:
        DataError: the folder lacks ``model.pt`` or ``config.json``.
    """
    path = Path(path)
    for f in ("model.pt", "config.json"):
        if not (path / f).exists():
            raise DataError("not a saved surrogate (expected model.pt and config.json)", path=path / f)
    meta = json.loads((path / "config.json").read_text())
    cfg = SurrogateConfig.from_dict(meta["config"])
    model = build_surrogate(int(meta["n_items"]), cfg)
    model.load_state_dict(torch.load(path / "model.pt", weights_only=True, map_location="cpu"))
    return model.eval()
