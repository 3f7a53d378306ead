"""TIGER's token layout, model (a ``transformers`` T5 built from a config), batches and losses.

Vocabulary (:class:`TokenLayout`): ``0`` pad (also the decoder start token, as in T5), ``1`` eos,
then the codes of each semantic-ID position (level ``l``'s code ``c`` is token
``offsets[l] + c``; the last position is the de-duplication token), then ``n_user_tokens``
hashed user tokens.

Encoder input: ``[user token] + codes of the most recent max_items history items (oldest first)
+ [eos]``, right-padded; decoder target: the next item's ``L + 1`` code tokens (no eos: every
tuple has the same length). All parameters train.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, DataError
from engine.llm.tiger.config import TigerConfig

__all__ = ["TokenLayout", "build_model", "save_model", "checkpoint_problem", "encode", "per_sample_loss",
           "train_loss", "user_tokens", "PAD", "EOS", "LAYOUT_FILE", "WEIGHT_FILES"]

PAD, EOS = 0, 1
N_SPECIAL = 2
LAYOUT_FILE = "tiger_layout.json"
#: the weight files ``save_pretrained`` may write (one of them)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class TokenLayout:
    """Token ids of the semantic-ID positions and the user tokens."""

    level_sizes: tuple[int, ...]
    n_user_tokens: int

    @property
    def length(self) -> int:
        return len(self.level_sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, o = [], N_SPECIAL
        for s in self.level_sizes:
            out.append(o)
            o += s
        return tuple(out)

    @property
    def user_offset(self) -> int:
        return N_SPECIAL + sum(self.level_sizes)

    @property
    def vocab_size(self) -> int:
        return self.user_offset + self.n_user_tokens

    def item_tokens(self, codes: np.ndarray) -> np.ndarray:
        """Codes [n, L+1] -> token ids [n, L+1]."""
        return np.asarray(codes, dtype=np.int64) + np.asarray(self.offsets, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"level_sizes": list(self.level_sizes), "n_user_tokens": self.n_user_tokens}


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def user_tokens(histories: Sequence[Sequence[int]], layout: TokenLayout, key_items: int) -> np.ndarray:
    """Hashed user token of each history (splitmix64 of its oldest ``key_items`` items and the count)."""
    out = np.zeros(len(histories), dtype=np.int64)
    for i, h in enumerate(histories):
        x = 0x5EED
        for it in list(h[:key_items]):
            x = _splitmix(x ^ (int(it) + 1))
        x = _splitmix(x ^ min(len(h), key_items))
        out[i] = layout.user_offset + x % layout.n_user_tokens
    return out


def encoder_rows(histories: Sequence[Sequence[int]], item_tokens: np.ndarray, layout: TokenLayout,
                 cfg: TigerConfig) -> list[np.ndarray]:
    """The unpadded encoder input of each history: [user token] + the code tuples of its most
    recent ``cfg.max_items`` items + EOS (int64)."""
    n_items = len(item_tokens)
    rows = []
    utok = user_tokens(histories, layout, cfg.user_key_items) if layout.n_user_tokens else None
    for i, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-cfg.max_items:] if len(h) else np.zeros(0, dtype=np.int64)
        if len(h) and (h.min() < 0 or h.max() >= n_items):
            raise DataError(f"history item id outside 0..{n_items - 1}", field="history", value=h.tolist())
        seq = item_tokens[h].reshape(-1)
        head = [int(utok[i])] if utok is not None else []
        rows.append(np.concatenate([np.asarray(head, dtype=np.int64), seq, np.asarray([EOS], dtype=np.int64)]))
    return rows


def encode_rows(rows: Sequence[np.ndarray], targets: Sequence[int] | None, item_tokens: np.ndarray, *,
                length: int | None = None) -> dict:
    """Batch of :func:`encoder_rows` rows: ``input_ids``/``attention_mask`` [B, S] right-padded (to
    at least ``length``), ``labels`` [B, L+1] (absent when ``targets`` is None)."""
    n_items = len(item_tokens)
    S = max(max((len(r) for r in rows), default=1), int(length or 0))
    ids = np.full((len(rows), S), PAD, dtype=np.int64)
    mask = np.zeros((len(rows), S), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        if len(t) and (t.min() < 0 or t.max() >= n_items):
            raise DataError(f"target item id outside 0..{n_items - 1}", field="target")
        batch["labels"] = torch.from_numpy(np.ascontiguousarray(item_tokens[t]))
    return batch


def encode(histories: Sequence[Sequence[int]], targets: Sequence[int] | None, item_tokens: np.ndarray,
           layout: TokenLayout, cfg: TigerConfig) -> dict:
    """Batch (CPU tensors): ``input_ids``/``attention_mask`` [B, S] right-padded, ``labels`` [B, L+1]
    (absent when ``targets`` is None)."""
    return encode_rows(encoder_rows(histories, item_tokens, layout, cfg), targets, item_tokens)


def _device(cfg: TigerConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def t5_config(cfg: TigerConfig, layout: TokenLayout):
    from transformers import T5Config

    c = T5Config(vocab_size=layout.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                 num_layers=cfg.num_layers, num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
                 relative_attention_num_buckets=cfg.relative_attention_num_buckets,
                 relative_attention_max_distance=cfg.relative_attention_max_distance,
                 dropout_rate=cfg.dropout, feed_forward_proj=cfg.feed_forward_proj,
                 tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.tie_embeddings,
                 pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD, use_cache=False)
    c.tie_word_embeddings = cfg.tie_embeddings  # T5Config forces True and reads the kwarg as the output scaling
    c._attn_implementation = "eager"
    return c


class _quiet_hf:
    """transformers' warnings and progress bars off for a block (loading / saving a small TIGER)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.level, self.bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)
        if self.bars:
            hf_logging.enable_progress_bar()
        return False


def build_model(cfg: TigerConfig, layout: TokenLayout) -> nn.Module:
    """The T5 of ``cfg`` (seeded init, or the saved ``cfg.checkpoint``), every parameter trainable,
    in train mode on ``cfg.device``.

    Raises:
        ConfigError: the checkpoint's vocabulary or layout does not fit ``layout``.
    """
    from transformers import T5ForConditionalGeneration

    if cfg.checkpoint:
        saved = Path(cfg.checkpoint) / LAYOUT_FILE
        if saved.is_file():
            got = json.loads(saved.read_text())
            if got != layout.to_dict():
                raise ConfigError([f"checkpoint={cfg.checkpoint!r}: its token layout {got} differs from these "
                                   f"semantic ids' {layout.to_dict()}"], config="TigerConfig")
        from transformers import T5Config

        conf = T5Config.from_pretrained(cfg.checkpoint)
        conf.tie_word_embeddings = bool(conf.scale_decoder_outputs)  # as t5_config saved it (T5Config forces True)
        conf._attn_implementation = "eager"
        with _quiet_hf():  # untied: the input embeddings are saved once, as shared.weight, and
            # reported "missing" before set_input_embeddings re-ties them; no progress bars
            model = T5ForConditionalGeneration.from_pretrained(cfg.checkpoint, config=conf)
        tied = conf.tie_word_embeddings
        if model.config.vocab_size != layout.vocab_size:
            raise ConfigError([f"checkpoint={cfg.checkpoint!r}: vocabulary {model.config.vocab_size} != "
                               f"{layout.vocab_size} of these semantic ids"], config="TigerConfig")
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = T5ForConditionalGeneration(t5_config(cfg, layout))
        tied = cfg.tie_embeddings
    if not tied:
        # transformers unties the encoder/decoder input embeddings from ``shared`` too when the
        # LM head is untied; TIGER shares one token embedding between encoder and decoder
        model.set_input_embeddings(model.shared)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model.to(_device(cfg))


def save_model(model: nn.Module, folder: str | os.PathLike, layout: TokenLayout) -> Path:
    """``save_pretrained`` + the token layout: a folder ``TigerConfig(checkpoint=...)`` starts from."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_hf():
        getattr(model, "module", model).save_pretrained(folder)
    (folder / LAYOUT_FILE).write_text(json.dumps(layout.to_dict()) + "\n")
    return folder


def checkpoint_problem(folder: str | os.PathLike, layout: TokenLayout | None = None) -> str | None:
    """Why ``folder`` is not a TIGER model :func:`save_model` wrote (for ``layout``), or None.

    Reads ``config.json`` and ``tiger_layout.json`` only (not the weights), so a wrong folder is
    named before any model is built.
    """
    p = Path(folder)
    fix = "; pass a folder written by a TIGER fine-tune (OUT/model of `dealrec finetune --backend tiger`)"
    if not p.is_dir():
        return f"{str(folder)!r} does not exist{fix}" if not p.exists() else f"{str(folder)!r} is a file{fix}"
    if not (p / "config.json").is_file():
        return f"no config.json in {str(folder)!r}{fix}"
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        return f"no weights ({' or '.join(WEIGHT_FILES[:2])}) in {str(folder)!r}{fix}"
    try:
        conf = json.loads((p / "config.json").read_text())
        saved = json.loads((p / LAYOUT_FILE).read_text()) if (p / LAYOUT_FILE).is_file() else None
    except (OSError, ValueError) as e:
        return f"unreadable config in {str(folder)!r} ({e}){fix}"
    if not isinstance(conf, dict) or conf.get("model_type") != "t5":
        return f"{str(p / 'config.json')!r} is not a T5 config (model_type {conf.get('model_type') if isinstance(conf, dict) else None!r}){fix}"
    if layout is not None:
        if saved is not None and saved != layout.to_dict():
            return (f"{str(folder)!r} was trained on other semantic ids: its token layout {saved} differs from "
                    f"{layout.to_dict()} (give the --semantic-ids it was trained with)")
        if conf.get("vocab_size") != layout.vocab_size:
            return (f"{str(folder)!r} has a vocabulary of {conf.get('vocab_size')} tokens, these semantic ids "
                    f"{layout.vocab_size} (give the --semantic-ids it was trained with)")
    return None


def _on(model: nn.Module, batch: dict) -> dict:
    dev = next(model.parameters()).device
    return {k: (v.to(dev) if torch.is_tensor(v) and v.device != dev else v) for k, v in batch.items()}


def per_sample_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean token cross-entropy of each sample's target tuple, [B]; row i depends on row i only
    (pads are masked keys of every attention, relative positions do not move with right padding)."""
    b = _on(model, batch)
    labels = b["labels"]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels,
                   use_cache=False).logits
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return nll.view(labels.shape).mean(dim=1)


def train_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Fine-tuning loss: the mean of :func:`per_sample_loss` (every tuple has the same length, so
    this is also the token mean)."""
    return per_sample_loss(model, batch).mean()
