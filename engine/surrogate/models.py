"""The surrogate models (SASRec, BERT4Rec) and the per-sample loss that influence differentiates."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.errors import ConfigError
from engine.surrogate.batching import BOS, ITEM_OFFSET, MASK, PAD
from engine.surrogate.config import SurrogateConfig


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
