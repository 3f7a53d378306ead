"""The shared LoRA sentence encoder of both towers (:func:`build_model`) and a tiny seeded BERT for tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import ConfigError
from engine.llm.textrec.config import TextRecConfig


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
