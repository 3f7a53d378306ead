"""Configuration of the surrogate recommender and its training (validated as a whole)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.errors import ConfigError, check


MODELS = ("sasrec", "bert4rec")
DISTRIBUTED = ("local", "ray_train")
LOSSES = ("full", "sampled")


@dataclass
class SurrogateConfig:
    """Configuration of the surrogate recommender and its training (validated as a whole)."""

    model: str = field(default="sasrec", metadata={"help": "surrogate architecture: 'sasrec' or 'bert4rec'"})
    hidden: int = field(default=64, metadata={"help": "embedding / hidden size (paper: 64)"})
    n_blocks: int = field(default=2, metadata={"help": "transformer blocks (paper: 2)"})
    n_heads: int = field(default=2, metadata={"help": "attention heads; must divide hidden (paper: 2)"})
    max_len: int = field(default=50, metadata={"help": "positions per sequence: the last max_len items (paper: 50)"})
    dropout: float = field(default=0.2, metadata={"help": "dropout in training; influence always runs in eval mode"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "L2 coefficient lambda: objective = mean CE + lambda/2 ||theta||^2 (use it as influence damping)"},
    )
    batch_size: int = field(default=256, metadata={"help": "training mini-batch size (samples)"})
    epochs: int = field(default=30, metadata={"help": "maximum training epochs"})
    patience: int = field(default=3, metadata={"help": "early stopping: epochs without a better validation Recall@K"})
    eval_k: int = field(default=20, metadata={"help": "K of the validation Recall@K / NDCG@K"})
    mask_prob: float = field(default=0.2, metadata={"help": "BERT4Rec cloze mask probability (ignored by SASRec)"})
    loss: str = field(
        default="full",
        metadata={
            "help": "per-sample loss: 'full' = softmax cross-entropy over every item (exact; cost ~ n_items per "
            "position); 'sampled' = softmax over the target and `negatives` items fixed by (seed, sample_id) "
            "(deterministic, batch-independent; cost ~ negatives per position, for large catalogues)"
        },
    )
    negatives: int = field(
        default=128,
        metadata={"help": "loss='sampled': negative items per sample (drawn afresh per step in training, "
                          "fixed by (seed, sample_id) in the influence loss)"},
    )
    loss_chunk: int = field(
        default=256,
        metadata={"help": "positions per full-softmax chunk (memory: chunk x n_items floats; 256 keeps it in cache)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of initialisation, shuffling and masks"})
    valid_users: int | None = field(
        default=None,
        metadata={"help": "early stopping evaluates a seeded random subset of this many validation users "
                          "(None = all): bounded validation time and memory on millions of users"})
    max_minutes: float | None = field(default=None, metadata={"help": "time box for training (None = no limit)"})
    shuffle_buffer: int = field(
        default=131_072,
        metadata={"help": "streamed training: samples held for shuffling. Each epoch reads the sample files in a "
                          "seeded random order into a buffer of at least this many samples and trains on a random "
                          "permutation of it, so batches mix many files even when the files are sorted (by user "
                          "id, by time); >= the number of samples = a full shuffle (~800 bytes per sample)"})
    log_every: int = field(default=50, metadata={"help": "log a progress line every this many batches (0 = never)"})
    distributed: str = field(
        default="local",
        metadata={
            "help": "where the surrogate trains: 'local' = train_surrogate in the calling process (small data); "
            "'ray_train' = a Ray Train TorchTrainer with num_workers DDP ranks (large data; "
            "jobs/surrogate_train.py). The engine itself never imports Ray"
        },
    )
    num_workers: int = field(
        default=2,
        metadata={
            "help": "Ray Train data-parallel ranks when distributed='ray_train' (ignored by 'local'); "
            "each rank trains on batch_size // num_workers samples per step, so batch_size must be a "
            "multiple of num_workers"
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise ConfigError listing all problems at once."""
        p: list[str] = []
        check(p, self.model in MODELS, f"model={self.model!r}: expected one of {MODELS}")
        check(p, isinstance(self.hidden, int) and self.hidden > 0, f"hidden={self.hidden!r}: must be a positive int")
        check(p, isinstance(self.n_blocks, int) and self.n_blocks >= 1, f"n_blocks={self.n_blocks!r}: must be >= 1")
        check(p, isinstance(self.n_heads, int) and self.n_heads >= 1, f"n_heads={self.n_heads!r}: must be >= 1")
        if isinstance(self.hidden, int) and isinstance(self.n_heads, int) and self.n_heads >= 1 and self.hidden > 0:
            check(p, self.hidden % self.n_heads == 0,
                  f"n_heads={self.n_heads}: must divide hidden={self.hidden} (e.g. n_heads=2)")
        check(p, isinstance(self.max_len, int) and self.max_len >= 1, f"max_len={self.max_len!r}: must be >= 1")
        check(p, 0.0 <= self.dropout < 1.0, f"dropout={self.dropout!r}: must be in [0, 1)")
        check(p, self.lr > 0, f"lr={self.lr!r}: must be > 0")
        check(p, self.weight_decay >= 0, f"weight_decay={self.weight_decay!r}: must be >= 0")
        check(p, isinstance(self.shuffle_buffer, int) and not isinstance(self.shuffle_buffer, bool)
              and self.shuffle_buffer >= 1, f"shuffle_buffer={self.shuffle_buffer!r}: must be an int >= 1")
        check(p, isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size={self.batch_size!r}: must be >= 1")
        check(p, isinstance(self.epochs, int) and self.epochs >= 1, f"epochs={self.epochs!r}: must be >= 1")
        check(p, isinstance(self.patience, int) and self.patience >= 1, f"patience={self.patience!r}: must be >= 1")
        check(p, isinstance(self.eval_k, int) and self.eval_k >= 1, f"eval_k={self.eval_k!r}: must be >= 1")
        check(p, self.valid_users is None or (isinstance(self.valid_users, int) and self.valid_users >= 1),
              f"valid_users={self.valid_users!r}: must be an int >= 1 or None (all)")
        check(p, 0.0 < self.mask_prob < 1.0, f"mask_prob={self.mask_prob!r}: must be in (0, 1)")
        check(p, self.loss in LOSSES, f"loss={self.loss!r}: expected one of {LOSSES}")
        check(p, isinstance(self.negatives, int) and not isinstance(self.negatives, bool) and self.negatives >= 1,
              f"negatives={self.negatives!r}: must be an int >= 1")
        check(p, isinstance(self.loss_chunk, int) and self.loss_chunk >= 1, f"loss_chunk={self.loss_chunk!r}: must be >= 1")
        check(p, self.max_minutes is None or self.max_minutes > 0, f"max_minutes={self.max_minutes!r}: must be > 0 or None")
        check(p, isinstance(self.log_every, int) and self.log_every >= 0, f"log_every={self.log_every!r}: must be >= 0")
        check(p, self.distributed in DISTRIBUTED, f"distributed={self.distributed!r}: expected one of {DISTRIBUTED}")
        num_workers_ok = isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool) \
            and self.num_workers >= 1
        check(p, num_workers_ok, f"num_workers={self.num_workers!r}: must be an int >= 1")
        if num_workers_ok and self.distributed == "ray_train" and isinstance(self.batch_size, int) \
                and self.batch_size >= 1:
            check(p, self.batch_size % self.num_workers == 0,
                  f"batch_size={self.batch_size} with num_workers={self.num_workers}: distributed='ray_train' "
                  f"needs batch_size to be a multiple of num_workers (per-rank batch = batch_size // num_workers)")
        if p:
            raise ConfigError(p, config="SurrogateConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SurrogateConfig:
        """Build from a dict; unknown keys are reported with the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError([f"unknown field {k!r}; valid fields: {sorted(names)}" for k in unknown],
                              config="SurrogateConfig")
        return cls(**dict(d))
