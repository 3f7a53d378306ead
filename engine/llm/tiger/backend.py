"""The TIGER backend (:class:`engine.llm.protocol.LLMBackend`): semantic-ID tuples in a T5
encoder-decoder, all parameters trained, ranking by trie-constrained beam search
(:mod:`engine.llm.tiger`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.errors import ConfigError

__all__ = ["TigerBackend", "option_problems"]


def option_problems(config: dict | None, semantic_ids, data) -> list[tuple[str, str]]:
    """What is wrong with the TIGER options of a run on the prepared folder ``data``, before any
    model is built: ``(field, message)`` pairs, field ``semantic_ids`` (unreadable, or not the
    codes of ``data``'s catalogue) or ``checkpoint`` (not a saved TIGER, or trained on other
    semantic ids). ``config``: TigerConfig fields (only ``checkpoint`` and ``n_user_tokens`` are
    read; validate the config itself with :class:`engine.llm.tiger.TigerConfig`). A ``data`` whose
    catalogue cannot be read is not compared (its own check names it)."""
    from engine.errors import DealrecError
    from engine.llm.tiger.config import TigerConfig
    from engine.llm.tiger.model import TokenLayout, checkpoint_problem
    from engine.semantic_ids import catalogue_problem, read_semantic_ids

    out: list[tuple[str, str]] = []
    if not semantic_ids:
        return [("semantic_ids", "backend 'tiger' needs the folder written by `dealrec semantic-ids --data DATA "
                                 "--out DIR`")]
    try:
        sids = read_semantic_ids(Path(semantic_ids))
    except DealrecError as e:
        return [("semantic_ids", str(e))]
    except OSError as e:
        return [("semantic_ids", f"cannot read {str(semantic_ids)!r}: {e}")]
    titles = None
    if data is not None:
        try:
            from engine.data.schema import read_items

            titles = read_items(data).column("title").to_pylist()
        except (DealrecError, OSError):
            titles = None
    if titles is not None:
        why = catalogue_problem(sids, titles)
        if why:
            out.append(("semantic_ids", f"{str(semantic_ids)!r}: {why} (data {str(data)!r})"))
    config = dict(config or {})
    ckpt = config.get("checkpoint")
    if isinstance(ckpt, str) and ckpt and (Path(ckpt) / "config.json").is_file():  # (missing: TigerConfig says so)
        n_user = config.get("n_user_tokens", TigerConfig.__dataclass_fields__["n_user_tokens"].default)
        layout = TokenLayout(tuple(sids.level_sizes), n_user) if isinstance(n_user, int) else None
        why = checkpoint_problem(ckpt, layout)
        if why:
            out.append(("checkpoint", why))
    return out


class TigerBackend:
    """TIGER: T5 over semantic-ID tokens, full fine-tuning, constrained beam search.

    Args:
        titles: title of every item id (only their number is used: the content went into the
            semantic ids).
        config: :class:`engine.llm.tiger.TigerConfig` or dict of its fields.
        semantic_ids: the folder (or ``semantic_ids.parquet``) written by ``dealrec semantic-ids``,
            or a :class:`engine.semantic_ids.SemanticIds`.

    Raises:
        ConfigError: no semantic ids, or not one tuple per item.
    """

    name = "tiger"
    #: the loss of a sample needs only that sample (no in-batch negatives)
    in_batch_negatives = False
    #: fp32 everywhere: a 4+4-layer d_model-128 model gains nothing from bf16
    train_bf16 = False
    supports_zero3 = True
    #: every parameter trains (no LoRA adapter): a fine-tune exports the whole model
    #: (:meth:`save_model`, read back by :meth:`load_model`) instead of a peft adapter
    full_finetune = True

    def __init__(self, titles: Sequence[str], *, config: Any = None, semantic_ids: Any = None):
        from engine.llm.tiger import CodeTrie, TigerConfig, TokenLayout
        from engine.semantic_ids import SemanticIds, catalogue_problem, read_semantic_ids

        self.cfg = TigerConfig.from_dict(config) if config is not None else TigerConfig()
        if semantic_ids is None:
            raise ConfigError(["semantic_ids: give the folder written by `dealrec semantic-ids --data DATA --out DIR`"],
                              config="tiger backend")
        sids = semantic_ids if isinstance(semantic_ids, SemanticIds) else read_semantic_ids(Path(semantic_ids))
        why = catalogue_problem(sids, titles)
        if why:
            raise ConfigError([f"semantic_ids: {why}"], config="tiger backend")
        self.semantic_ids = sids
        self.layout = TokenLayout(tuple(sids.level_sizes), self.cfg.n_user_tokens)
        self.item_tokens = self.layout.item_tokens(sids.codes)
        self.trie = CodeTrie(sids.codes, sids.level_sizes)

    # ------------------------------------------------------------------ model
    def build_model(self) -> nn.Module:
        """:func:`engine.llm.tiger.build_model` (seeded init or ``config.checkpoint``; all parameters train)."""
        from engine.llm.tiger import build_model

        return build_model(self.cfg, self.layout)

    def load_model(self, checkpoint: str | None = None, *, device: str | None = None) -> nn.Module:
        """An eval-mode model for ranking: the saved TIGER folder ``checkpoint`` (a fine-tune's
        output, :meth:`save_model`), else :meth:`build_model`'s."""
        from dataclasses import replace

        from engine.llm.tiger import build_model

        cfg = self.cfg
        if checkpoint is not None:
            cfg = replace(cfg, checkpoint=str(checkpoint))
        if device is not None:
            cfg = replace(cfg, device=device)
        return build_model(cfg, self.layout).eval()

    def save_model(self, model: nn.Module, folder) -> Path:
        """:func:`engine.llm.tiger.save_model`: the folder :meth:`load_model` and ``config.checkpoint`` read."""
        from engine.llm.tiger import save_model

        return save_model(model, folder, self.layout)

    # ------------------------------------------------------------------ batches and losses
    def encode_samples(self, sample_ids, histories, targets) -> dict:
        """:func:`engine.llm.tiger.encode` (sample ids unused: the user token hashes the oldest history items)."""
        from engine.llm.tiger import encode

        return encode(histories, targets, self.item_tokens, self.layout, self.cfg)

    def per_sample_loss(self, model, batch) -> torch.Tensor:
        """:func:`engine.llm.tiger.per_sample_loss` (mean token cross-entropy of the target tuple)."""
        from engine.llm.tiger import per_sample_loss

        return per_sample_loss(model, batch)

    def effort(self, model, sample_ids, histories, targets, *, micro_batch: int = 16) -> np.ndarray:
        """Per-sample gradient norm over ALL parameters, through
        :func:`engine.effort.per_sample_grad_norms` (no parameter in its fallback); micro-batches
        grouped by padded encoder length (:mod:`engine.effort.batching`: a score does not depend
        on the other samples)."""
        from engine.effort import per_sample_grad_norms
        from engine.effort.batching import canonical_micro_batches
        from engine.llm.tiger.model import encode_rows, encoder_rows

        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        out = np.zeros(len(targets), dtype=np.float64)
        rows, tgt = encoder_rows(list(histories), self.item_tokens, self.layout, self.cfg), np.asarray(targets)
        for idx, (length,) in canonical_micro_batches([len(r) for r in rows], micro_batch):
            b = encode_rows([rows[i] for i in idx], tgt[idx], self.item_tokens, length=length)
            out[idx] = per_sample_grad_norms(model, self.per_sample_loss, b).double().cpu().numpy()
        return out

    def encode_train(self, histories, targets) -> dict:
        """The same batch as :meth:`encode_samples`."""
        return self.encode_samples(range(len(targets)), histories, targets)

    def train_loss(self, model, batch, *, rank: int = 0, world: int = 1) -> torch.Tensor:
        """:func:`engine.llm.tiger.train_loss` (per-sample, so ranks need nothing from each other)."""
        from engine.llm.tiger import train_loss

        return train_loss(model, batch)

    # ------------------------------------------------------------------ ranking
    def rank_items(self, model, histories, k, *, exclude=None) -> np.ndarray:
        """Top-``k`` items per user by :func:`engine.llm.tiger.beam_search` (beam width
        ``max(config.beam_width, k)``), ``exclude`` (default: the history) never returned;
        ``-1`` where fewer than ``k`` items are left. Eval mode (no dropout), modes restored after."""
        return self.rank_with_scores(model, histories, k, exclude=exclude)[0]

    def rank_with_scores(self, model, histories, k, *, exclude=None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rank_items` and the tuple log-probabilities [U, k]."""
        from engine.llm.tiger import beam_search, encode

        histories = list(histories)
        exclude = histories if exclude is None else list(exclude)
        dev = next(model.parameters()).device
        self.trie.to(dev)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        items, scores = [], []
        try:
            bs = self.cfg.rank_batch_size
            for s in range(0, len(histories), bs):
                b = encode(histories[s:s + bs], None, self.item_tokens, self.layout, self.cfg)
                it, sc = beam_search(model, b, self.trie, self.layout, k, self.cfg.beam_width, exclude[s:s + bs])
                items.append(it)
                scores.append(sc)
        finally:
            for m, t in modes.items():
                m.training = t
        if not items:
            return np.zeros((0, k), dtype=np.int64), np.zeros((0, k))
        return np.concatenate(items), np.concatenate(scores)
