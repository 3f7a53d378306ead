"""BIGRec prompts: Alpaca records, tokenisation with oldest-first history truncation, batching
and the batch-independent per-sample causal-LM loss.

The wording follows the DEALRec authors' BIGRec data (``code/finetune/data/gen_fewshot.py`` at
Linxyhaha/DEALRec): the input is ``<prefix>T1; T2; ...; Tk;`` (titles oldest first, newlines
removed), the output is the bare target title, and the Alpaca template wraps both. Training
tokenisation follows their ``finetune.py``: the tokenizer's own special tokens (BOS for LLaMA),
EOS appended, labels = input ids (``train_on_inputs``) or -100 over the prompt part.

Truncation differs on purpose: the authors drop the oldest title until the text fits and then
let the tokenizer cut the tail (which can cut the response); we drop oldest titles until the
WHOLE sequence, response and EOS included, fits ``cutoff_len`` tokens, and only cut tokens when
even an empty history does not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from engine.errors import ConfigError, check

__all__ = [
    "PromptConfig",
    "PROMPTS",
    "TEMPLATE_HEADER",
    "get_prompt_config",
    "make_record",
    "render_prompt",
    "encode_sample",
    "encode_prompt",
    "collate",
    "per_sample_causal_lm_loss",
]

IGNORE_INDEX = -100

# The trailing space after "request." is in the authors' template; kept so prompts match theirs.
TEMPLATE_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
)


@dataclass
class PromptConfig:
    """How a user sequence becomes a BIGRec prompt.

    Attributes:
        instruction: the task instruction (``### Instruction:`` section).
        input_prefix: text before the history titles (``### Input:`` section).
        cutoff_len: maximum tokens of a tokenised sample (prompt + response + EOS); the oldest
            history titles are dropped until it fits.
        train_on_inputs: loss over the whole sequence (BIGRec default) or, when False, over the
            response (and EOS) only.
        separator: text between two titles.
        terminator: text after the last title (the authors end the list with ``;``).
    """

    instruction: str = field(metadata={"help": "task instruction text"})
    input_prefix: str = field(metadata={"help": "text before the history titles"})
    cutoff_len: int = field(default=512, metadata={"help": "max tokens per sample, response and EOS included"})
    train_on_inputs: bool = field(default=True, metadata={"help": "loss on the prompt too (BIGRec) or response only"})
    separator: str = field(default="; ", metadata={"help": "between two titles"})
    terminator: str = field(default=";", metadata={"help": "after the last title"})

    def __post_init__(self) -> None:
        problems: list[str] = []
        check(problems, isinstance(self.instruction, str) and self.instruction.strip() != "",
              f"instruction must be a non-empty string, got {self.instruction!r}")
        check(problems, isinstance(self.input_prefix, str),
              f"input_prefix must be a string, got {self.input_prefix!r}")
        check(problems, isinstance(self.cutoff_len, int) and not isinstance(self.cutoff_len, bool)
              and self.cutoff_len >= 16,
              f"cutoff_len must be an int >= 16, got {self.cutoff_len!r}")
        check(problems, isinstance(self.train_on_inputs, bool),
              f"train_on_inputs must be true or false, got {self.train_on_inputs!r}")
        check(problems, isinstance(self.separator, str), f"separator must be a string, got {self.separator!r}")
        check(problems, isinstance(self.terminator, str), f"terminator must be a string, got {self.terminator!r}")
        if problems:
            raise ConfigError(problems, config="PromptConfig")

    def to_dict(self) -> dict:
        return asdict(self)


PROMPTS: dict[str, PromptConfig] = {
    "games": PromptConfig(
        instruction="Given the game products that the user purchased before, please recommend a new "
        "game product that the user likes to the user.",
        input_prefix="The user has purchased the following game products before, with titles as: ",
    ),
    "book": PromptConfig(
        instruction="Given the books that the user purchased before, please recommend a new book that "
        "the user likes to the user.",
        input_prefix="The user has purchased the following books before, with titles as: ",
    ),
    "microlens": PromptConfig(
        instruction="Given the micro-videos that the user watched before, please recommend a new "
        "micro-video that the user likes to the user.",
        input_prefix="The user has watched the following micro-videos before, with titles as: ",
    ),
    "movies": PromptConfig(
        instruction="Given the movies that the user watched before, please recommend a new movie that "
        "the user likes to the user.",
        input_prefix="The user has watched the following movies before, with titles as: ",
    ),
    "generic": PromptConfig(
        instruction="Given the items that the user interacted with before, please recommend a new item "
        "that the user likes to the user.",
        input_prefix="The user has interacted with the following items before, with titles as: ",
    ),
}


def get_prompt_config(spec: str | dict | PromptConfig, **overrides) -> PromptConfig:
    """A PromptConfig from a preset name, a dict of fields, or a PromptConfig (copied).

    Args:
        spec: preset name in :data:`PROMPTS`, a dict of PromptConfig fields (it may hold
            ``preset`` naming the base preset), or a PromptConfig.
        **overrides: fields to replace (e.g. ``cutoff_len=256``).

    Returns:
        A validated PromptConfig.

    Raises:
        ConfigError: unknown preset, unknown field, or invalid values.
    """
    if isinstance(spec, PromptConfig):
        base = spec.to_dict()
    elif isinstance(spec, str):
        if spec not in PROMPTS:
            raise ConfigError([f"unknown prompt preset {spec!r}; choose one of {sorted(PROMPTS)}"],
                              config="PromptConfig")
        base = PROMPTS[spec].to_dict()
    elif isinstance(spec, dict):
        spec = dict(spec)
        preset = spec.pop("preset", None)
        base = get_prompt_config(preset).to_dict() if preset is not None else {}
        base.update(spec)
    else:
        raise ConfigError([f"prompt config must be a preset name, dict or PromptConfig, got {type(spec).__name__}"],
                          config="PromptConfig")
    base.update(overrides)
    known = set(PromptConfig.__dataclass_fields__)
    unknown = sorted(set(base) - known)
    if unknown:
        raise ConfigError([f"unknown field {k!r}; known fields: {sorted(known)}" for k in unknown],
                          config="PromptConfig")
    return PromptConfig(**base)


def _clean(title: str) -> str:
    # The authors strip newlines from titles; a newline would also break the template sections.
    return str(title).replace("\r", "").replace("\n", "")


def _history_text(history_titles: Sequence[str], cfg: PromptConfig) -> str:
    if len(history_titles) == 0:
        return cfg.input_prefix.rstrip()
    return cfg.input_prefix + cfg.separator.join(_clean(t) for t in history_titles) + cfg.terminator


def make_record(history_titles: Sequence[str], target_title: str | None, cfg: PromptConfig) -> dict:
    """The Alpaca record of one sample (the format of the few-shot JSON).

    Args:
        history_titles: titles of the history, oldest first (not truncated here).
        target_title: the target title, or None for a prompt without answer.
        cfg: prompt wording.

    Returns:
        ``{"instruction": str, "input": str, "output": str}`` (output ``""`` when no target).
    """
    return {
        "instruction": cfg.instruction,
        "input": _history_text(history_titles, cfg),
        "output": "" if target_title is None else _clean(target_title),
    }


def render_prompt(record: dict, *, with_output: bool) -> str:
    """The Alpaca text of a record.

    Args:
        record: dict with ``instruction``, ``input`` and ``output``.
        with_output: append the output after ``### Response:\\n`` (training); False gives the
            generation prompt.

    Returns:
        The prompt text.
    """
    text = (
        f"{TEMPLATE_HEADER}### Instruction:\n{record['instruction']}\n\n"
        f"### Input:\n{record['input']}\n\n### Response:\n"
    )
    if with_output:
        text += record.get("output") or ""
    return text


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not ids or ids[-1] != eos):
        return ids + [eos]
    return ids


def _max_fitting(n: int, length_of, limit: int) -> int:
    """Largest k in [0, n] with length_of(k) <= limit (length_of(k): tokens with the k newest titles).

    Token counts grow with k (a longer title list never tokenises shorter), so a binary search
    finds the same k as the authors' drop-one-at-a-time loop in O(log n) tokenisations.
    Returns -1 when even k = 0 does not fit.
    """
    if length_of(n) <= limit:
        return n
    if length_of(0) > limit:
        return -1
    lo, hi = 0, n  # length_of(lo) fits, length_of(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length_of(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo


def _newest(history_titles: Sequence[str], k: int) -> list[str]:
    titles = list(history_titles)
    return titles[len(titles) - k:] if k > 0 else []


def encode_sample(tokenizer, history_titles: Sequence[str], target_title: str, cfg: PromptConfig) -> dict:
    """Tokenise one training/scoring sample with oldest-first history truncation.

    Args:
        tokenizer: a Hugging Face tokenizer (its special tokens, e.g. BOS, are added).
        history_titles: history titles, oldest first.
        target_title: the target title.
        cfg: prompt wording, ``cutoff_len`` and ``train_on_inputs``.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "n_history_kept": int}``: EOS appended;
        labels equal input_ids, or are -100 over the prompt when ``cfg.train_on_inputs`` is False.
        If even an empty history does not fit, the sequence is cut to ``cutoff_len`` tokens
        (no EOS), as the tokenizer's own truncation would.
    """
    eos = tokenizer.eos_token_id
    cache: dict[int, list[int]] = {}

    def full(k: int) -> list[int]:
        if k not in cache:
            rec = make_record(_newest(history_titles, k), target_title, cfg)
            cache[k] = _with_eos(_ids(tokenizer, render_prompt(rec, with_output=True)), eos)
        return cache[k]

    n = len(history_titles)
    k = _max_fitting(n, lambda j: len(full(j)), cfg.cutoff_len)
    if k < 0:
        k = 0
        input_ids = full(0)[: cfg.cutoff_len]
    else:
        input_ids = full(k)
    if cfg.train_on_inputs:
        labels = list(input_ids)
    else:
        rec = make_record(_newest(history_titles, k), None, cfg)
        n_prompt = min(len(_ids(tokenizer, render_prompt(rec, with_output=False))), len(input_ids))
        labels = [IGNORE_INDEX] * n_prompt + list(input_ids[n_prompt:])
    return {"input_ids": list(input_ids), "labels": labels, "n_history_kept": k}


def encode_prompt(tokenizer, history_titles: Sequence[str], cfg: PromptConfig, *, reserve_tokens: int = 0) -> list[int]:
    """Tokenise a generation prompt (no response), oldest titles dropped until it fits.

    Args:
        tokenizer: a Hugging Face tokenizer.
        history_titles: history titles, oldest first.
        cfg: prompt wording and ``cutoff_len``.
        reserve_tokens: tokens kept free for the generated answer
            (prompt length <= ``cutoff_len - reserve_tokens``).

    Returns:
        The prompt's token ids (ends with ``### Response:\\n``; no EOS). Cut to the limit if even
        an empty history does not fit.
    """
    limit = max(1, cfg.cutoff_len - int(reserve_tokens))
    cache: dict[int, list[int]] = {}

    def ids(k: int) -> list[int]:
        if k not in cache:
            rec = make_record(_newest(history_titles, k), None, cfg)
            cache[k] = _ids(tokenizer, render_prompt(rec, with_output=False))
        return cache[k]

    k = _max_fitting(len(history_titles), lambda j: len(ids(j)), limit)
    return ids(k) if k >= 0 else ids(0)[:limit]


def collate(encoded: Sequence[dict], pad_token_id: int, length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad encoded samples into a batch.

    Args:
        encoded: dicts with ``input_ids`` and ``labels`` (as from :func:`encode_sample`).
        pad_token_id: id written into padded positions.
        length: pad to this many positions (default: the longest sample; never shorter than it).

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels`` as LongTensors [B, T]; labels are -100
        on padding.
    """
    if len(encoded) == 0:
        raise ValueError("collate needs at least one sample")
    T = max(max(len(e["input_ids"]) for e in encoded), int(length or 0))
    B = len(encoded)
    input_ids = torch.full((B, T), int(pad_token_id), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention[i, :n] = 1
        labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def per_sample_causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sample's causal-LM loss: mean next-token cross-entropy over its own valid tokens.

    Args:
        model: a causal LM returning ``.logits`` [B, T, V] (HF or peft-wrapped).
        batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 = ignored), on the model's device.

    Returns:
        Tensor [B] (float32). A sample without any valid token gets 0. With right padding and an
        attention mask, padding never changes a sample's loss (up to float rounding).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1, :].float()
    target = batch["labels"][:, 1:].to(logits.device)
    valid = target != IGNORE_INDEX
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.clamp_min(0).reshape(-1),
        reduction="none",
    ).view(target.shape)
    tok = tok * valid
    count = valid.sum(dim=1).clamp_min(1)
    return tok.sum(dim=1) / count
