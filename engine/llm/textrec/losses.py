"""The two losses: the effort loss (target among negatives fixed by sample id: batch-independent)
and the in-batch softmax of fine-tuning (duplicate titles never negatives); each with its collate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.llm.textrec.config import TextRecConfig
from engine.llm.textrec.model import _unwrap
from engine.llm.textrec.text import Catalogue, _as_catalogue, _pad, _pad_id, _tokenize_titles, tokenize_users


def sample_negatives(sample_id: int, target: int, history: Sequence[int], catalogue: Catalogue | Sequence[str],
                     n: int, *, seed: int = 0) -> np.ndarray:
    """The fixed negatives of one sample: distinct-title groups, seeded by ``(seed, sample_id)``.

    Uniform over the distinct titles of the catalogue except the target's title and the titles of
    the history; without replacement. Depends only on the arguments, never on other samples.

    Args:
        sample_id: the sample's id (keys the RNG).
        target: the target item id.
        history: history item ids.
        catalogue: :class:`Catalogue` (or the list of titles).
        n: negatives wanted.
        seed: global seed.

    Returns:
        int64 array [n] of title-group ids (indices into ``catalogue.index.titles``), padded with
        -1 when fewer than ``n`` titles are allowed (tiny catalogues).
    """
    cat = _as_catalogue(catalogue)
    it = cat.index.item_title
    banned = {int(it[int(target)])} | {int(it[int(h)]) for h in history}
    G = cat.n_groups
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(sample_id) & 0xFFFFFFFFFFFF, 0x7E47]))
    out: list[int] = []
    if G - len(banned) <= 4 * n:
        allowed = np.setdiff1d(np.arange(G), np.fromiter(banned, dtype=np.int64))
        out = rng.permutation(allowed)[:n].tolist()
    else:  # rejection sampling: cheap for a big catalogue, still a pure function of the seed
        seen = set(banned)
        while len(out) < n:
            for g in rng.integers(0, G, size=2 * n).tolist():
                if g not in seen:
                    seen.add(g)
                    out.append(g)
                    if len(out) == n:
                        break
    return np.asarray(out + [-1] * (n - len(out)), dtype=np.int64)


def effort_tokens(tokenizer, catalogue: Catalogue | Sequence[str], sample_ids: Sequence[int],
                  histories: Sequence[Sequence[int]], targets: Sequence[int], cfg: TextRecConfig) -> dict:
    """The unpadded token lists of :func:`collate_effort`: ``user`` [B] lists, ``items`` [B][S]
    lists (slot 0 = target, then the fixed negatives; a filler text for padding slots) and
    ``valid`` bool [B, S]. :func:`pad_effort` makes the batch."""
    cat = _as_catalogue(catalogue)
    B = len(targets)
    if not (len(sample_ids) == len(histories) == B):
        raise ValueError(f"sample_ids ({len(sample_ids)}), histories ({len(histories)}) and targets ({B}) differ")
    users = tokenize_users(tokenizer, [[cat.titles[int(j)] for j in h] for h in histories], cfg)
    S = 1 + cfg.n_negatives
    groups = np.empty((B, S), dtype=np.int64)
    for i in range(B):
        groups[i, 0] = cat.index.item_title[int(targets[i])]
        groups[i, 1:] = sample_negatives(sample_ids[i], targets[i], histories[i], cat, cfg.n_negatives, seed=cfg.seed)
    valid = groups >= 0
    uniq = np.unique(groups[valid])
    tok = dict(zip(uniq.tolist(), _tokenize_titles(tokenizer, [cat.index.titles[g] for g in uniq], cfg)))
    filler = list(tokenizer("")["input_ids"]) or [_pad_id(tokenizer)]  # [CLS][SEP]: harmless text for padding slots
    items = [[tok[int(g)] if g >= 0 else filler for g in row] for row in groups]
    return {"user": list(users), "items": items, "valid": valid,
            "sample_ids": np.asarray(sample_ids, dtype=np.int64)}


def effort_lengths(tokens: dict) -> np.ndarray:
    """int [B, 2]: per sample, its user-text length and its longest item text (the padded axes)."""
    return np.array([[len(u), max(len(t) for t in it)] for u, it in zip(tokens["user"], tokens["items"])],
                    dtype=np.int64).reshape(-1, 2)


def pad_effort(tokens: dict, rows: Sequence[int] | None, pad: int, lengths: tuple[int, int] | None = None) -> dict:
    """The :func:`collate_effort` batch of ``rows`` of :func:`effort_tokens` (all rows when None),
    user texts padded to at least ``lengths[0]`` and item texts to at least ``lengths[1]``."""
    rows = range(len(tokens["user"])) if rows is None else [int(r) for r in rows]
    lu, li = lengths or (0, 0)
    B, S = len(rows), tokens["valid"].shape[1]
    u_ids, u_mask = _pad([tokens["user"][r] for r in rows], pad, lu)
    i_ids, i_mask = _pad([t for r in rows for t in tokens["items"][r]], pad, li)
    T = i_ids.shape[1]
    return {
        "user_input_ids": u_ids, "user_attention_mask": u_mask,
        "item_input_ids": i_ids.view(B, S, T), "item_attention_mask": i_mask.view(B, S, T),
        "item_valid": torch.from_numpy(tokens["valid"][list(rows)]),
        "sample_ids": torch.as_tensor(tokens["sample_ids"][list(rows)]),
    }


def collate_effort(tokenizer, catalogue: Catalogue | Sequence[str], sample_ids: Sequence[int],
                   histories: Sequence[Sequence[int]], targets: Sequence[int], cfg: TextRecConfig) -> dict:
    """Batch for :func:`per_sample_loss`: user texts and, per sample, target + fixed negatives.

    Args:
        tokenizer: the encoder's tokenizer.
        catalogue: :class:`Catalogue` or the item titles.
        sample_ids: per sample, its id (keys the negatives).
        histories: per sample, history item ids oldest first.
        targets: per sample, the target item id.
        cfg: text lengths, ``n_negatives``, ``seed``.

    Returns:
        ``user_input_ids``/``user_attention_mask`` [B, Tu]; ``item_input_ids``/``item_attention_mask``
        [B, 1 + n_negatives, Ti] (slot 0 = target); ``item_valid`` [B, 1 + n_negatives] bool
        (False for padding slots of tiny catalogues); ``sample_ids`` [B].
    """
    tokens = effort_tokens(tokenizer, catalogue, sample_ids, histories, targets, cfg)
    return pad_effort(tokens, None, _pad_id(tokenizer))


def per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Each sample's softmax cross-entropy of its target among itself + its fixed negatives.

    Both towers run through the LoRA encoder. Slot j of all samples is encoded in its own forward
    call of batch B (so per-sample gradient hooks see the batch in dim 0). Padding slots (tiny
    catalogues) are masked out of the softmax.

    Args:
        model: a :class:`TextRecModel` (or a wrapper with ``.module``).
        batch: from :func:`collate_effort`, on the model's device.

    Returns:
        float32 Tensor [B]; sample i's value depends only on row i.
    """
    m = _unwrap(model)
    u = m.encode(batch["user_input_ids"], batch["user_attention_mask"])
    ids, mask = batch["item_input_ids"], batch["item_attention_mask"]
    v = torch.stack([m.encode(ids[:, j], mask[:, j]) for j in range(ids.shape[1])], dim=1)  # [B, S, d]
    logits = torch.einsum("bd,bsd->bs", u, v) / m.cfg.temperature
    logits = logits.masked_fill(~batch["item_valid"].to(logits.device), float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def collate_train(tokenizer, catalogue: Catalogue | Sequence[str], histories: Sequence[Sequence[int]],
                  targets: Sequence[int], cfg: TextRecConfig) -> dict:
    """Batch for :func:`train_loss` (in-batch softmax).

    Args:
        tokenizer: the encoder's tokenizer.
        catalogue: :class:`Catalogue` or the item titles.
        histories: per sample, history item ids oldest first.
        targets: per sample, the target item id.
        cfg: text lengths.

    Returns:
        ``user_input_ids``/``user_attention_mask`` [B, Tu], ``item_input_ids``/``item_attention_mask``
        [B, Ti] (the targets' titles) and ``target_groups`` [B] (title-group ids: equal ids are the
        same text and are not negatives of each other).
    """
    cat = _as_catalogue(catalogue)
    pad = _pad_id(tokenizer)
    u_ids, u_mask = _pad(tokenize_users(tokenizer, [[cat.titles[int(j)] for j in h] for h in histories], cfg), pad)
    groups = cat.index.item_title[np.asarray(targets, dtype=np.int64)]
    i_ids, i_mask = _pad(_tokenize_titles(tokenizer, [cat.index.titles[int(g)] for g in groups], cfg), pad)
    return {"user_input_ids": u_ids, "user_attention_mask": u_mask, "item_input_ids": i_ids,
            "item_attention_mask": i_mask, "target_groups": torch.from_numpy(groups.astype(np.int64))}


def train_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean in-batch softmax loss (one forward of the model; plug into a Ray Train/DeepSpeed loop).

    User i's candidates are the targets of the batch; a target equal (same title group) to user i's
    own target at another position is masked, so duplicates are never negatives.

    Args:
        model: a :class:`TextRecModel` or a DDP/DeepSpeed engine wrapping one.
        batch: from :func:`collate_train`, on the model's device.

    Returns:
        Scalar loss tensor.
    """
    u, v = model(batch["user_input_ids"], batch["user_attention_mask"],
                 batch["item_input_ids"], batch["item_attention_mask"])
    temperature = _unwrap(model).cfg.temperature
    logits = u @ v.T / temperature
    g = batch["target_groups"].to(logits.device)
    dup = (g[:, None] == g[None, :]) & ~torch.eye(len(g), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(dup, float("-inf"))
    return F.cross_entropy(logits, torch.arange(len(g), device=logits.device))
