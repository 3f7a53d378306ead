"""Texts and tokens: user text over the history titles (oldest dropped first), item titles, the
title :class:`Catalogue`, padding, and the sample columns every stage reads."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.grounding import TitleIndex, index_titles
from engine.llm.textrec.config import TextRecConfig


@dataclass
class Catalogue:
    """Item titles grouped by identical title (same text, same embedding).

    Attributes:
        titles: title of every item id.
        index: :class:`engine.grounding.TitleIndex` (distinct titles, item -> title group).
    """

    titles: list[str]
    index: TitleIndex

    @classmethod
    def from_titles(cls, titles: Sequence[str]) -> Catalogue:
        """Group ``titles`` (indexed by item id; newlines removed, as in the prompts) by text.

        Args:
            titles: the title of every item id.

        Returns:
            The :class:`Catalogue`.
        """
        titles = [str(t).replace("\r", "").replace("\n", "") for t in titles]
        return cls(titles, index_titles(titles))

    @property
    def n_items(self) -> int:
        return len(self.titles)

    @property
    def n_groups(self) -> int:
        return len(self.index.titles)

    def key(self) -> str:
        """A hash of the titles (keys the item-embedding cache)."""
        h = hashlib.blake2b(digest_size=12)
        for t in self.titles:
            h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        return h.hexdigest()


def _as_catalogue(titles) -> Catalogue:
    return titles if isinstance(titles, Catalogue) else Catalogue.from_titles(titles)


def _prompt(cfg: TextRecConfig):
    from engine.llm.bigrec.prompts import get_prompt_config

    return get_prompt_config(cfg.prompt)


def user_texts(histories_titles: Sequence[Sequence[str]], cfg: TextRecConfig) -> list[str]:
    """The untruncated user texts: BIGRec input wording over the history titles, oldest first.

    Args:
        histories_titles: per user, history titles oldest first.
        cfg: ``prompt`` names the wording preset.

    Returns:
        One string per user, e.g. ``"The user has ... with titles as: T1; T2;"``.
    """
    from engine.llm.bigrec.prompts import make_record

    pc = _prompt(cfg)
    return [make_record(list(h), None, pc)["input"] for h in histories_titles]


def tokenize_users(tokenizer, histories_titles: Sequence[Sequence[str]], cfg: TextRecConfig) -> list[list[int]]:
    """Tokenise user texts, dropping the OLDEST titles until the text fits ``max_len_user``.

    Title token counts (tokenised alone) give the number of newest titles that fit; this is exact
    for BERT-style tokenizers, which split on whitespace and punctuation, and is verified on the
    final text (one more title is dropped while it does not fit). If even the newest title alone
    does not fit, it is kept and the text is cut at ``max_len_user`` tokens.

    Args:
        tokenizer: the encoder's tokenizer (adds [CLS]/[SEP]).
        histories_titles: per user, history titles oldest first.
        cfg: wording preset and ``max_len_user``.

    Returns:
        Token ids per user (special tokens included), each at most ``max_len_user`` long.
    """
    from engine.llm.bigrec.prompts import make_record

    pc = _prompt(cfg)
    limit = cfg.max_len_user
    fixed = len(tokenizer(make_record(["x"], None, pc)["input"])["input_ids"]) - 1  # prefix, terminator, specials
    sep = max(0, len(tokenizer(make_record(["x", "x"], None, pc)["input"])["input_ids"]) - fixed - 2)
    out = []
    for hist in histories_titles:
        hist = [str(t) for t in hist]
        if hist:
            lens = [len(ids) for ids in tokenizer(hist, add_special_tokens=False)["input_ids"]]
            total, k = fixed, 0
            for n in reversed(lens):
                extra = n + (sep if k else 0)
                if total + extra > limit:
                    break
                total += extra
                k += 1
        else:
            k = 0
        while True:
            keep = hist[len(hist) - k:] if k else []
            if not keep and hist:
                keep = hist[-1:]  # the newest title, even if it has to be cut
            ids = tokenizer(make_record(keep, None, pc)["input"])["input_ids"]
            if len(ids) <= limit or k <= 1:
                break
            k -= 1
        if len(ids) > limit:
            ids = tokenizer(make_record(keep, None, pc)["input"], truncation=True, max_length=limit)["input_ids"]
        out.append(list(ids))
    return out


def _tokenize_titles(tokenizer, titles: Sequence[str], cfg: TextRecConfig) -> list[list[int]]:
    return [list(x) for x in tokenizer(list(titles), truncation=True, max_length=cfg.max_len_item)["input_ids"]]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(1, int(length), max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _to(batch: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _columns(samples) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(sample_ids, histories, targets) from a samples Table or a dict of columns."""
    if hasattr(samples, "column_names"):
        cols = {c: samples.column(c).to_pylist() for c in ("sample_id", "history", "target")
                if c in samples.column_names}
    else:
        cols = dict(samples)
    hist = [np.asarray(h, dtype=np.int64) for h in cols["history"]]
    tgt = np.asarray(cols["target"], dtype=np.int64)
    sid = np.asarray(cols.get("sample_id", np.arange(len(tgt))), dtype=np.int64)
    return sid, hist, tgt
