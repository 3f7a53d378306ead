"""Ranking by beam search constrained to the catalogue's semantic-ID tuples (a prefix trie).

:class:`CodeTrie` holds, for every depth ``d``, a dense table ``child[d][node, code]`` = the node
at depth ``d + 1`` reached by ``code`` (at the last depth: the item id), ``-1`` where no item has
that prefix. :func:`beam_search` decodes level by level: each live beam's next-token
log-probabilities (log-softmax over the FULL vocabulary, so a finished beam's score is the
model's log-probability of that item's tuple) are restricted to the codes the trie allows after
its prefix, and the best ``beam_width`` extensions per user survive. Every finished beam is a
distinct catalogue item (tuples are unique), so the top ``k`` of ``beam_width >= k`` beams are
``k`` distinct items. Excluded items (the history) are removed from the trie per user before
decoding: a prefix none of whose items is left is never extended, so exclusion costs no beam
slots. With ``beam_width`` at least the catalogue size no prefix is ever dropped and the result
is the exact top-``k`` by tuple log-probability (the test checks it against scoring every item).

The decoder is re-run on the whole prefix at every step (no key/value cache): tuples are 4
tokens, so this costs at most 4 short decoder passes per user batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from engine.llm.tiger.model import PAD, TokenLayout

__all__ = ["CodeTrie", "beam_search"]


class CodeTrie:
    """Prefix trie of the item code tuples ``codes`` [n_items, D] (unique rows), as dense tables."""

    def __init__(self, codes: np.ndarray, level_sizes: Sequence[int]):
        codes = np.asarray(codes, dtype=np.int64)
        n, D = codes.shape
        self.n_items, self.depth = n, D
        self.level_sizes = [int(s) for s in level_sizes]
        # node id of every item's prefix at each depth 0..D (depth D: the item id itself)
        path = np.zeros((n, D + 1), dtype=np.int64)
        self.n_nodes = [1]
        for d in range(1, D):
            _, inv = np.unique(codes[:, :d], axis=0, return_inverse=True)
            path[:, d] = inv.reshape(-1)
            self.n_nodes.append(int(path[:, d].max()) + 1 if n else 0)
        path[:, D] = np.arange(n)
        self.n_nodes.append(n)
        self.path = path
        self.child: list[torch.Tensor] = []
        self.leaves: list[np.ndarray] = []
        for d in range(D):
            t = np.full((self.n_nodes[d], self.level_sizes[d]), -1, dtype=np.int64)
            t[path[:, d], codes[:, d]] = path[:, d + 1]
            self.child.append(torch.from_numpy(t))
        for d in range(D + 1):
            self.leaves.append(np.bincount(path[:, d], minlength=self.n_nodes[d]))

    def to(self, device) -> CodeTrie:
        self.child = [c.to(device) for c in self.child]
        return self

    def blocked(self, exclude: Sequence[Sequence[int]], device) -> list[torch.Tensor]:
        """Per depth 1..D, sorted keys ``user * n_nodes[d] + node`` of the nodes whose items are
        all excluded for that user (index 0 of the list is depth 1)."""
        us, its = [], []
        for u, e in enumerate(exclude):
            e = np.unique(np.asarray(list(e), dtype=np.int64))
            e = e[(e >= 0) & (e < self.n_items)]
            us.append(np.full(len(e), u, dtype=np.int64))
            its.append(e)
        u = np.concatenate(us) if us else np.zeros(0, dtype=np.int64)
        it = np.concatenate(its) if its else np.zeros(0, dtype=np.int64)
        out = []
        for d in range(1, self.depth + 1):
            node = self.path[it, d]
            key, cnt = np.unique(u * self.n_nodes[d] + node, return_counts=True)
            full = cnt == self.leaves[d][key % self.n_nodes[d]]
            out.append(torch.from_numpy(key[full]).to(device))
        return out


@torch.no_grad()
def beam_search(model: nn.Module, batch: dict, trie: CodeTrie, layout: TokenLayout, k: int, beam_width: int,
                exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` catalogue items per user by constrained beam search.

    Args:
        model: the TIGER T5 (put in eval mode by the caller).
        batch: encoder ``input_ids``/``attention_mask`` [U, S] (:func:`engine.llm.tiger.model.encode`).
        trie: the catalogue's :class:`CodeTrie` (on the model's device).
        k: items per user; ``beam_width`` is raised to ``k`` if smaller.
        exclude: item ids per user never returned.

    Returns:
        (item ids int64 [U, k], their tuple log-probabilities float64 [U, k]), best first;
        ``-1`` / ``-inf`` where fewer than ``k`` items are left.
    """
    from transformers.modeling_outputs import BaseModelOutput

    dev = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    U = ids.shape[0]
    W = max(int(beam_width), int(k))
    enc = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    blocked = trie.blocked(exclude, dev) if exclude is not None else None
    node = torch.zeros(U, 1, dtype=torch.long, device=dev)
    score = torch.zeros(U, 1, dtype=torch.float32, device=dev)
    tokens = torch.full((U, 1, 1), PAD, dtype=torch.long, device=dev)  # the decoder start token
    users = torch.arange(U, device=dev)
    for d in range(trie.depth):
        w = node.shape[1]
        rep = torch.arange(U, device=dev).repeat_interleave(w)
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc[rep]), attention_mask=mask[rep],
                    decoder_input_ids=tokens.reshape(U * w, -1), use_cache=False)
        logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        off, size = layout.offsets[d], layout.level_sizes[d]
        logp = logp[:, off:off + size].reshape(U, w, size)
        child = trie.child[d][node.clamp_min(0)]  # [U, w, size]
        valid = (child >= 0) & (node >= 0).unsqueeze(-1) & torch.isfinite(score).unsqueeze(-1)
        if blocked is not None and len(blocked[d]):
            key = users[:, None, None] * trie.n_nodes[d + 1] + child.clamp_min(0)
            valid &= ~torch.isin(key, blocked[d])
        cand = torch.where(valid, score.unsqueeze(-1) + logp, torch.full_like(logp, float("-inf")))
        cand = cand.reshape(U, w * size)
        n_keep = min(W, int(valid.reshape(U, -1).sum(1).max().item())) if valid.any() else 1
        top, ix = cand.topk(max(1, n_keep), dim=1)
        parent, code = ix // size, ix % size
        node = torch.gather(child.reshape(U, w * size), 1, ix)
        node = torch.where(torch.isfinite(top), node, torch.full_like(node, -1))
        score = top
        prev = torch.gather(tokens, 1, parent.unsqueeze(-1).expand(-1, -1, tokens.shape[2]))
        tokens = torch.cat([prev, (code + off).unsqueeze(-1)], dim=2)
    items = node[:, :k].cpu().numpy().astype(np.int64)
    scores = score[:, :k].double().cpu().numpy()
    if items.shape[1] < k:
        pad = k - items.shape[1]
        items = np.pad(items, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    items[~np.isfinite(scores)] = -1
    return items, scores
