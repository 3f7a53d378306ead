"""BIGRec's ranking: beam-search generation with the adapter, base-model embedding of the
answer, a disk cache of item-title embeddings, grounding to items (moved out of
``engine/evaluate.py``; :meth:`engine.llm.bigrec.backend.BigRecBackend.rank_items` is built on
:func:`rank_by_generation`).

Protocol (docs/method.md#samples, BIGRec's evaluate.py, with the choices made explicit):

- prompt: the newest ``max_history`` history titles (:class:`GenerationConfig`), oldest titles
  dropped further until the prompt fits ``cutoff_len - max_new_tokens``.
- generation: beam search (``beams``, greedy inside beams, no sampling) with the LoRA
  adapter on; the best beam is decoded, special tokens dropped, surrounding spaces and
  quotes stripped.
- embedding: the last-layer hidden state of the last token (left padding, so the last
  position is the last real token) of the text, computed with the BASE model (adapter
  disabled), for generated texts and item titles alike, so both live in one space (the
  authors embed both with the base LLaMA).
- grounding: L2 nearest distinct titles, expanded to items, excluded items dropped
  (:func:`engine.grounding.ground`).
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
from engine.llm.bigrec.prompts import encode_prompt

__all__ = [
    "GenerationConfig",
    "generate_texts",
    "embed_texts",
    "clean_generation",
    "base_fingerprint",
    "title_cache_path",
    "load_title_embeddings",
    "store_title_embeddings",
    "cached_title_embeddings",
    "rank_by_generation",
    "score_generations",
    "eval_requests",
]


@dataclass
class GenerationConfig:
    """How BIGRec ranks: generation, embedding and grounding knobs (validated up front)."""

    beams: int = field(default=4, metadata={"help": "beam-search width (BIGRec: 4)"})
    max_new_tokens: int = field(default=32, metadata={"help": "tokens generated per user"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate() call / answers per embedding batch"})
    title_batch_size: int = field(default=32, metadata={"help": "titles per embedding batch"})
    max_history: int = field(default=10, metadata={"help": "newest history titles in a prompt"})
    chunk: int = field(default=4096, metadata={"help": "titles per grounding block (memory knob)"})

    def __post_init__(self) -> None:
        p: list[str] = []
        for name in ("beams", "max_new_tokens", "batch_size", "title_batch_size", "chunk"):
            v = getattr(self, name)
            check(p, isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be an int >= 1")
        check(p, isinstance(self.max_history, int) and self.max_history >= 0,
              f"max_history={self.max_history!r} must be >= 0")
        if p:
            raise ConfigError(p, config="GenerationConfig")

    @classmethod
    def from_dict(cls, d: "dict | GenerationConfig | None") -> "GenerationConfig":
        if d is None:
            return cls()
        if isinstance(d, cls):
            return cls(**asdict(d))
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError([f"unknown generation option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}"],
                              config="GenerationConfig")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def eval_requests(split_table, titles: Sequence[str], *, max_history: int, max_users: int | None = None,
                  seed: int = 0) -> dict:
    """The users to evaluate and their prompts' history titles (BIGRec's own user list, used by
    ``jobs/tune.py``; the generic evaluator builds users with :func:`engine.evaluate.eval_users`).

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


def load_title_embeddings(path: str | os.PathLike, n_titles: int) -> np.ndarray | None:
    """The cached ``[n_titles, d]`` embeddings at ``path``, or None (absent or of another length)."""
    path = Path(path)
    if path.exists():
        emb = np.load(path)
        if emb.shape[0] == n_titles:
            return emb
    return None


def store_title_embeddings(path: str | os.PathLike, emb: np.ndarray, *, base: str) -> None:
    """Write ``emb`` to the cache file ``path`` atomically (concurrent writers are safe), with a
    small JSON beside it saying which base and how many titles."""
    path = Path(path)
    emb = np.asarray(emb, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, emb)
    os.replace(tmp, path)
    (path.with_suffix(".json")).write_text(json.dumps({"base": str(base), "titles": int(emb.shape[0]),
                                                        "dim": int(emb.shape[1]) if emb.ndim == 2 else 0}))


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
    emb = load_title_embeddings(path, len(titles))
    if emb is not None:
        return emb, True
    emb = np.asarray(compute(titles), dtype=np.float32)
    store_title_embeddings(path, emb, base=base)
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


@torch.no_grad()
def rank_by_generation(model, tokenizer, titles: Sequence[str], index: TitleIndex, title_emb: np.ndarray,
                       histories: Sequence[Sequence[int]], k: int, prompt_cfg, gen: GenerationConfig, *,
                       exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """BIGRec's top-``k`` items per user: generate an answer, embed it, ground it.

    Args:
        model: the LoRA causal LM (adapter on for generation; disabled while embedding).
        tokenizer: its tokenizer.
        titles: title of every item id.
        index: ``engine.grounding.index_titles(titles)``.
        title_emb: ``[len(index.titles), d]`` base-model embeddings of the distinct titles.
        histories: per user, history item ids oldest first (the newest ``gen.max_history`` are shown).
        k: items per user.
        prompt_cfg: :class:`engine.llm.bigrec.prompts.PromptConfig`.
        gen: generation knobs.
        exclude: per user, item ids never returned (None: nothing excluded).

    Returns:
        int64 ``[U, k]`` item ids, best first; -1 pads rows when fewer than ``k`` items remain.
    """
    if len(histories) == 0:
        return np.zeros((0, k), dtype=np.int64)
    hist_titles = [[titles[int(j)] for j in (list(h)[-gen.max_history:] if gen.max_history > 0 else [])]
                   for h in histories]
    texts = generate_texts(model, tokenizer, hist_titles, prompt_cfg, beams=gen.beams,
                           max_new_tokens=gen.max_new_tokens, batch_size=gen.batch_size)
    q = embed_texts(model, tokenizer, texts, batch_size=gen.batch_size, base=True)
    return ground(q, title_emb, index, k, chunk=gen.chunk, exclude=exclude, pad=True)
