"""Configuration of the TIGER recommender (validated as a whole)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import dataclass_from_dict
from engine.errors import ConfigError, check

__all__ = ["TigerConfig"]


@dataclass
class TigerConfig:
    """TIGER (Rajput et al., NeurIPS'23): a T5 encoder-decoder over semantic-ID tokens.

    Defaults are the paper's model (4 + 4 layers, 6 heads, d_model 128, MLP 1024, dropout 0.1,
    2,000 hashed user tokens, 20 history items). Every problem is reported at once (ConfigError).
    """

    num_layers: int = field(default=4, metadata={"help": "encoder layers"})
    num_decoder_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_heads: int = field(default=6, metadata={"help": "attention heads"})
    d_model: int = field(default=128, metadata={"help": "model width"})
    d_kv: int = field(default=64, metadata={"help": "width of each attention head"})
    d_ff: int = field(default=1024, metadata={"help": "MLP width"})
    dropout: float = field(default=0.1, metadata={"help": "dropout (training only; off when scoring and ranking)"})
    feed_forward_proj: str = field(default="relu", metadata={"help": "T5 MLP: relu | gated-gelu"})
    relative_attention_num_buckets: int = field(default=32, metadata={"help": "relative-position buckets"})
    relative_attention_max_distance: int = field(default=128, metadata={"help": "relative-position max distance"})
    tie_embeddings: bool = field(default=False, metadata={"help": "tie the LM head to the token embedding"})
    n_user_tokens: int = field(default=2000, metadata={"help": "hashed user-id tokens (0: none)"})
    user_key_items: int = field(default=1, metadata={
        "help": "the user token hashes the user's oldest N history items (the protocol carries no user id; "
                "the oldest items are the same in the train, valid and test histories of a user)"})
    max_items: int = field(default=20, metadata={"help": "history items kept (the most recent)"})
    checkpoint: str = field(default="", metadata={"help": "start from this saved TIGER folder (default: seeded init)"})
    seed: int = field(default=0, metadata={"help": "seeds the initialisation"})
    beam_width: int = field(default=20, metadata={"help": "constrained beam width when ranking (at least k is used)"})
    rank_batch_size: int = field(default=64, metadata={"help": "users per beam-search batch"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda | cuda:N | auto (build_model's device)"})

    def __post_init__(self) -> None:
        p: list[str] = []

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("num_layers", "num_decoder_layers", "num_heads", "d_model", "d_kv", "d_ff",
                     "relative_attention_num_buckets", "relative_attention_max_distance", "max_items",
                     "beam_width", "rank_batch_size"):
            v = getattr(self, name)
            check(p, is_int(v) and v >= 1, f"{name}={v!r}: must be an int >= 1")
        check(p, isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
              and math.isfinite(self.dropout) and 0 <= self.dropout < 1, f"dropout={self.dropout!r}: must be in [0, 1)")
        check(p, self.feed_forward_proj in ("relu", "gated-gelu", "gelu", "gated-relu"),
              f"feed_forward_proj={self.feed_forward_proj!r}: expected relu, gelu, gated-relu or gated-gelu")
        check(p, isinstance(self.tie_embeddings, bool), f"tie_embeddings={self.tie_embeddings!r}: must be true or false")
        check(p, is_int(self.n_user_tokens) and self.n_user_tokens >= 0,
              f"n_user_tokens={self.n_user_tokens!r}: must be an int >= 0")
        check(p, is_int(self.user_key_items) and self.user_key_items >= 1,
              f"user_key_items={self.user_key_items!r}: must be an int >= 1")
        if not isinstance(self.checkpoint, str):
            p.append(f"checkpoint={self.checkpoint!r}: must be a folder path or empty")
        elif self.checkpoint and not (Path(self.checkpoint) / "config.json").is_file():
            p.append(f"checkpoint={self.checkpoint!r}: no config.json there; give a folder saved by "
                     "engine.llm.tiger.save_model")
        check(p, is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r}: must be an int >= 0")
        check(p, isinstance(self.device, str) and (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
              f"device={self.device!r}: expected auto, cpu, cuda or cuda:N")
        if p:
            raise ConfigError(p, config="TigerConfig")

    @classmethod
    def from_dict(cls, d: dict | TigerConfig) -> TigerConfig:
        """Build from a dict (unknown keys reported with the valid ones) or copy a config."""
        return dataclass_from_dict(cls, d, config="TigerConfig")

    def to_dict(self) -> dict:
        return asdict(self)
