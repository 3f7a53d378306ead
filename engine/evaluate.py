"""BIGRec evaluation pieces: prompts of the evaluation period, beam-search generation,
last-token embeddings, a disk cache of item-title embeddings, grounding and metrics.

Protocol (DESIGN.md section 2, BIGRec's evaluate.py, with the choices made explicit):

- users: every user of the split with at least one target; history = the split's
  ``history`` column (everything before the period), newest ``max_history`` titles kept;
  targets = all the user's items in the period (multi-target).
- generation: beam search (``beams``, greedy inside beams, no sampling) with the LoRA
  adapter on; the best beam is decoded, special tokens dropped, surrounding spaces and
  quotes stripped.
- embedding: the last-layer hidden state of the last token (left padding, so the last
  position is the last real token) of the text, computed with the BASE model (adapter
  disabled), for generated texts and item titles alike, so both live in one space (the
  authors embed both with the base LLaMA).
- grounding: L2 nearest distinct titles, expanded to items (engine.grounding); metrics
  from engine.metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import ConfigError, check
from engine.grounding import TitleIndex, ground
from engine.metrics import DEFAULT_KS, recall_ndcg
from engine.llm.bigrec.prompts import PROMPTS, encode_prompt, get_prompt_config

__all__ = [
    "EvalConfig",
    "eval_requests",
    "generate_texts",
    "embed_texts",
    "base_fingerprint",
    "cached_title_embeddings",
    "score_generations",
]


@dataclass
class EvalConfig:
    """Evaluation of a fine-tuned adapter on the valid or test period (validated up front)."""

    data: str = field(metadata={"help": "prepared data folder"})
    adapter: str | None = field(default=None, metadata={"help": "peft adapter folder (None: base model only)"})
    split: str = field(default="test", metadata={"help": "valid | test"})
    beams: int = field(default=4, metadata={"help": "beam-search width (BIGRec: 4)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per user"})
    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata={"help": "cut-offs K of Recall/NDCG@K"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate() call / texts per embedding batch"})
    max_users: int | None = field(default=None, metadata={"help": "evaluate a seeded subset of users"})
    prompt: str = field(default="generic", metadata={"help": "prompt preset"})
    cutoff_len: int = field(default=512, metadata={"help": "max prompt + answer tokens"})
    max_history: int = field(default=10, metadata={"help": "newest history titles in a prompt"})
    chunk: int = field(default=4096, metadata={"help": "titles per grounding block (memory knob)"})
    seed: int = field(default=0, metadata={"help": "seed of the user subset"})

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        p: list[str] = []

        def pos(name: str) -> None:
            v = getattr(self, name)
            check(p, isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be an int >= 1")

        check(p, self.split in ("valid", "test"), f"split={self.split!r} must be 'valid' or 'test'")
        for n in ("beams", "max_new_tokens", "batch_size", "chunk"):
            pos(n)
        check(p, len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"ks={self.ks!r} must be positive integers")
        check(p, self.max_users is None or (isinstance(self.max_users, int) and self.max_users >= 1),
              f"max_users={self.max_users!r} must be null or >= 1")
        check(p, self.prompt in PROMPTS, f"prompt={self.prompt!r} is unknown; use one of {sorted(PROMPTS)}")
        check(p, isinstance(self.cutoff_len, int) and self.cutoff_len >= 16, f"cutoff_len={self.cutoff_len!r} must be >= 16")
        check(p, isinstance(self.max_history, int) and self.max_history >= 0, f"max_history={self.max_history!r} must be >= 0")
        if not Path(self.data).is_dir():
            p.append(f"data folder {self.data!r} does not exist; run `dealrec prepare` first")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").exists():
            p.append(f"adapter {self.adapter!r} is not a peft adapter folder (no adapter_config.json); "
                     "pass OUT/adapter of `dealrec finetune`")
        if p:
            raise ConfigError(p, config="EvalConfig")

    def prompt_config(self):
        return get_prompt_config(self.prompt, cutoff_len=self.cutoff_len)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d


def eval_requests(split_table, titles: Sequence[str], *, max_history: int, max_users: int | None = None,
                  seed: int = 0) -> dict:
    """The users to evaluate and their prompts' history titles.

    Args:
        split_table: a valid/test table (user_id, history, targets).
        titles: item titles by item id.
        max_history: newest titles kept.
        max_users: keep a seeded random subset of this many users (sorted by row).
        seed: seed of the subset.

    Returns:
        ``{"user_id": [...], "history": [[item ids]], "history_titles": [[str]], "targets": [[item ids]]}``
        for users with at least one target.
    """
    users = split_table.column("user_id").to_pylist()
    hist = split_table.column("history").to_pylist()
    tg = split_table.column("targets").to_pylist()
    rows = [i for i, t in enumerate(tg) if t]
    if max_users is not None and len(rows) > max_users:
        rows = sorted(np.random.default_rng(seed).choice(rows, size=max_users, replace=False).tolist())
    h = [(list(hist[i])[-max_history:] if max_history > 0 else []) for i in rows]
    return {
        "user_id": [users[i] for i in rows],
        "history": h,
        "history_titles": [[titles[j] for j in x] for x in h],
        "targets": [list(tg[i]) for i in rows],
    }


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def clean_generation(text: str) -> str:
    """BIGRec's post-processing of a generated answer: first line, spaces and quotes stripped."""
    text = text.split("\n")[0]
    return text.strip().strip('"').strip()


@torch.no_grad()
def generate_texts(model, tokenizer, history_titles: Sequence[Sequence[str]], prompt_cfg, *, beams: int,
                   max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Beam-search answers of the LLM (adapter on) to BIGRec prompts.

    Args:
        model: causal LM (peft-wrapped or not), in eval mode.
        tokenizer: its tokenizer.
        history_titles: per user, history titles oldest first.
        prompt_cfg: :class:`engine.llm.bigrec.prompts.PromptConfig`.
        beams: beam width (1 = greedy).
        max_new_tokens: generated tokens per user (room is reserved in ``cutoff_len``).
        batch_size: prompts per ``generate`` call.

    Returns:
        The cleaned best-beam answer per user (see :func:`clean_generation`).
    """
    model.eval()
    dev = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for s in range(0, len(history_titles), batch_size):
        prompts = [encode_prompt(tokenizer, h, prompt_cfg, reserve_tokens=max_new_tokens)
                   for h in history_titles[s : s + batch_size]]
        ids, mask = _left_pad(prompts, pad)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), num_beams=beams,
                             num_return_sequences=1, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, use_cache=True)
        new = gen[:, ids.shape[1]:].cpu()
        out.extend(clean_generation(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    return out


def _base_context(model):
    dis = getattr(model, "disable_adapter", None)
    return dis() if callable(dis) and hasattr(model, "peft_config") else contextlib.nullcontext()


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 32, base: bool = True) -> np.ndarray:
    """Last-token, last-layer hidden state of every text (BIGRec's grounding embedding).

    Args:
        model: causal LM (peft-wrapped or not).
        tokenizer: its tokenizer (special tokens added, e.g. BOS; an empty text falls back
            to the EOS token so every text has at least one token).
        texts: the texts.
        batch_size: texts per forward.
        base: disable the LoRA adapter while embedding (the BASE model's space).

    Returns:
        ``[len(texts), hidden]`` float32 array.
    """
    model.eval()
    dev = _device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    ctx = _base_context(model) if base else contextlib.nullcontext()
    with ctx:
        for s in range(0, len(texts), batch_size):
            enc = [list(tokenizer(str(t), add_special_tokens=True)["input_ids"]) or [tokenizer.eos_token_id]
                   for t in texts[s : s + batch_size]]
            ids, mask = _left_pad(enc, pad)
            out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_hidden_states=True,
                        use_cache=False)
            rows.append(out.hidden_states[-1][:, -1, :].float().cpu().numpy())
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(rows).astype(np.float32, copy=False)


def base_fingerprint(base: str) -> str:
    """A short hash identifying a base model: config, tokenizer and weight files (name + size +
    mtime) of a local folder, or the Hub id itself."""
    p = Path(base)
    h = hashlib.sha256()
    if not p.is_dir():
        h.update(str(base).encode())
        return h.hexdigest()[:16]
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model") or f.name.startswith("tokenizer")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


def title_cache_path(cache_dir: str | os.PathLike, base: str, titles: Sequence[str]) -> Path:
    """``cache_dir/item-emb-<hash of base model and titles>.npy``."""
    h = hashlib.sha256(base_fingerprint(base).encode())
    for t in titles:
        h.update(str(t).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return Path(cache_dir) / f"item-emb-{h.hexdigest()[:20]}.npy"


def cached_title_embeddings(cache_dir: str | os.PathLike, base: str, titles: Sequence[str],
                            compute: Callable[[Sequence[str]], np.ndarray]) -> tuple[np.ndarray, bool]:
    """Title embeddings from the disk cache, or computed with ``compute`` and cached.

    Args:
        cache_dir: cache folder.
        base: base model folder / id (part of the key).
        titles: distinct titles, in index order (part of the key).
        compute: ``titles -> [T, d]`` array, called on a miss.

    Returns:
        ``(embeddings, hit)``.
    """
    path = title_cache_path(cache_dir, base, titles)
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == len(titles):
            return emb, True
    emb = np.asarray(compute(titles), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps({"base": str(base), "titles": len(titles),
                                                        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0}))
    return emb, False


def score_generations(query_emb: np.ndarray, title_emb: np.ndarray, index: TitleIndex,
                      targets: Sequence[Sequence[int]], *, ks: Sequence[int] = DEFAULT_KS,
                      chunk: int = 4096) -> tuple[dict, np.ndarray]:
    """Ground every generation and compute Recall/NDCG@K.

    Args:
        query_emb: ``[U, d]`` embeddings of the generated texts.
        title_emb: ``[T, d]`` embeddings of ``index.titles``.
        index: the catalogue's title index.
        targets: per user, the period's item ids.
        ks: cut-offs.
        chunk: titles per grounding block.

    Returns:
        ``(metrics, ranked)``: the :func:`engine.metrics.recall_ndcg` dict and the
        ``[U, max(ks)]`` grounded item ids.
    """
    k = max(ks)
    if len(query_emb) == 0:
        return recall_ndcg([], [], ks=ks), np.zeros((0, k), dtype=np.int64)
    ranked = ground(query_emb, title_emb, index, k, chunk=chunk)
    return recall_ndcg(ranked.tolist(), targets, ks=ks), ranked
