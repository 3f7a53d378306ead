"""The fine-tune config (:class:`FinetuneConfig`): every knob of one run, any backend, validated as a whole."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import collect_problems, stable_hash
from engine.errors import ConfigError, check
from engine.llm.bigrec.model import LLMConfig
from engine.llm.bigrec.prompts import PROMPTS, get_prompt_config
from engine.metrics import DEFAULT_KS

__all__ = ["FinetuneConfig", "STRATEGIES", "SCHEDULES", "RESUME_FREE_FIELDS", "EVAL_FIELDS"]

STRATEGIES = ("local", "ddp", "deepspeed")
SCHEDULES = ("linear", "constant")
SPLITS = ("none", "valid", "test")
# Fields that may change between a run and its resume without invalidating the checkpoint.
RESUME_FREE_FIELDS = ("stop_after_epochs", "workers_cpu", "out", "use_gpu", "max_failures", "threads")
# Backends whose get_backend options FinetuneConfig builds (backend_options), and the fields they use.
OPTIONS_OF = {"bigrec": ("llm", "prompt", "cutoff_len"), "textrec": ("textrec",), "tiger": ("tiger", "semantic_ids")}
# Fields of one backend only, left out of to_dict() (and so of the fingerprint) while unset, so
# that the configs and run fingerprints of the other backends are those they had before TIGER.
OMITTED_WHEN_NONE = ("tiger", "semantic_ids")
# Fields of the evaluation after training: a change re-evaluates the trained adapter, never retrains it.
EVAL_FIELDS = ("split", "max_eval_users", "eval_seed", "ks")


def _is_int(v) -> bool:
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclass
class FinetuneConfig:
    """Few-shot fine-tune of an LLM backend (validated as a whole in ``__post_init__``): its LoRA,
    or every parameter of a ``full_finetune`` backend (TIGER).

    The effective batch is ``micro_batch * accumulation * world`` (world = ``workers``, 1 for
    ``strategy="local"``); the accumulation is derived and must divide exactly. A backend whose
    loss takes in-batch negatives (textrec) sees the whole batch in one step: its ``micro_batch``
    is the per-rank slice (leave it None). Defaults follow BIGRec (lr 1e-4, 20 warm-up steps,
    linear decay); ``epochs`` is 3 rather than BIGRec's 50 with early stopping.
    """

    data: str = field(metadata={"help": "prepared data folder (dealrec prepare)"})
    out: str = field(metadata={"help": "output folder: adapter/, finetune.json, checkpoints"})
    selected: str | None = field(default=None, metadata={"help": "selected.parquet (column sample_id) of a prune run"})
    sample_ids: list[int] | None = field(default=None, metadata={"help": "the training sample ids, given directly"})
    all_samples: bool = field(default=False, metadata={"help": "fine-tune on every sample (full baseline)"})
    backend: str = field(default="bigrec", metadata={"help": "LLM backend (engine.llm.BACKENDS)"})
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"help": "bigrec: base model + LoRA (LLMConfig)"})
    prompt: str = field(default="generic", metadata={"help": "bigrec: prompt preset: " + ", ".join(PROMPTS)})
    cutoff_len: int = field(default=512, metadata={"help": "bigrec: max tokens per sample (BIGRec: 512)"})
    max_history: int | None = field(default=10, metadata={"help": "newest history items kept per sample (None: all; BIGRec data: 10)"})
    textrec: dict | None = field(default=None, metadata={"help": "textrec: encoder + LoRA (TextRecConfig fields)"})
    tiger: dict | None = field(default=None, metadata={"help": "tiger: the T5 model (TigerConfig fields)"})
    semantic_ids: str | None = field(default=None, metadata={
        "help": "tiger: the semantic-ID folder written by `dealrec semantic-ids` (--semantic-ids)"})
    strategy: str = field(default="deepspeed", metadata={"help": "local (in process, no Ray) | ddp | deepspeed"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    offload: bool = field(default=False, metadata={"help": "ZeRO CPU offload of optimizer (and params at stage 3)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (data-parallel ranks; ddp/deepspeed)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "one GPU per worker; None = when the cluster has GPUs"})
    workers_cpu: float = field(default=1.0, metadata={"help": "CPUs reserved per worker (CPU runs)"})
    max_failures: int = field(default=3, metadata={"help": "Ray Train restarts of the worker group after a worker or node loss, each from the last epoch checkpoint (-1 = unlimited)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (BIGRec: 1e-4)"})
    lr_schedule: str = field(default="linear", metadata={"help": "linear (warm-up, then linear decay to 0) | constant"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up optimiser steps (BIGRec: 20)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    epochs: int = field(default=3, metadata={"help": "max epochs (0: export the initial adapter; BIGRec: 50 with early stopping)"})
    batch_size: int = field(default=16, metadata={"help": "effective batch (BIGRec: 128) = micro x accum x workers"})
    micro_batch: int | None = field(default=4, metadata={"help": "samples per forward per worker (None: the whole per-rank slice)"})
    patience: int = field(default=2, metadata={"help": "early stop after this many epochs without a better val loss"})
    val_samples: int = field(default=256, metadata={"help": "validation samples (valid users: history -> first target)"})
    seed: int = field(default=0, metadata={"help": "data order, dropout and validation subset"})
    stop_after_epochs: int | None = field(
        default=None, metadata={"help": "end this invocation after N more epochs (the run stays resumable)"})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop training after this many seconds (the full-data wall-time baseline)"})
    split: str = field(default="none", metadata={"help": "evaluation after training: none | valid | test"})
    max_eval_users: int | None = field(default=None, metadata={"help": "seeded subset of evaluation users (None: all)"})
    eval_seed: int = field(default=0, metadata={"help": "seed of that subset (fixed across runs: paired comparisons)"})
    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata={"help": "cut-offs K of Recall/NDCG@K"})
    threads: int = field(default=0, metadata={"help": "torch threads of this process, local strategy (0: as is)"})

    def __post_init__(self) -> None:
        from engine.llm import BACKENDS, backend_class

        p: list[str] = []
        if isinstance(self.llm, dict):
            built, problems = collect_problems([("llm", lambda: LLMConfig.from_dict(self.llm))])
            self.llm = built.get("llm", self.llm)
            p.extend(problems)
        if isinstance(self.ks, list):
            self.ks = tuple(self.ks)
        if self.backend == "textrec":
            from engine.llm.textrec import TextRecConfig

            built, problems = collect_problems([("textrec", lambda: TextRecConfig.from_dict(self.textrec or {}))])
            if "textrec" in built:
                self.textrec = built["textrec"].to_dict()
            p.extend(problems)
        if self.backend == "tiger":
            from engine.llm.tiger import TigerConfig

            try:
                self.tiger = TigerConfig.from_dict(self.tiger or {}).to_dict()
            except ConfigError as e:  # named by the job option each field comes from
                p.extend(f"tiger ({'--tiger-checkpoint' if x.startswith('checkpoint=') else '--tiger-config'}): {x}"
                         for x in e.problems)
            check(p, isinstance(self.semantic_ids, str) and self.semantic_ids != "",
                  "semantic_ids: backend 'tiger' needs the folder written by `dealrec semantic-ids --data DATA "
                  "--out DIR` (--semantic-ids DIR)")
        else:
            check(p, self.tiger is None and self.semantic_ids is None,
                  f"tiger options (tiger, semantic_ids) given for backend={self.backend!r}; pass backend='tiger' "
                  "or drop them")
        check(p, self.backend in BACKENDS, f"backend={self.backend!r}: expected one of {sorted(BACKENDS)}")
        check(p, self.backend not in BACKENDS or self.backend in OPTIONS_OF,
              f"backend={self.backend!r}: the fine-tune builds the options of {sorted(OPTIONS_OF)} only "
              "(FinetuneConfig.backend_options); use one of those")
        check(p, self.backend == "textrec" or self.textrec is None,
              f"textrec options given for backend={self.backend!r}; pass backend='textrec' or drop them")
        cls = backend_class(self.backend) if self.backend in BACKENDS else None
        whole_batch = bool(getattr(cls, "in_batch_negatives", False))

        check(p, isinstance(self.data, str) and self.data != "", f"data must be a folder path, got {self.data!r}")
        check(p, isinstance(self.out, str) and self.out != "", f"out must be a folder path, got {self.out!r}")
        given = [n for n, v in (("selected", self.selected is not None), ("sample_ids", self.sample_ids is not None),
                                ("all_samples", bool(self.all_samples))) if v]
        check(p, len(given) == 1, f"give exactly one of selected, sample_ids or all_samples (got {given or 'none'})")
        if self.sample_ids is not None:
            ok = len(self.sample_ids) > 0 and all(_is_int(i) and i >= 0 for i in self.sample_ids)
            check(p, ok, "sample_ids must be a non-empty list of ints >= 0")
            if ok:
                self.sample_ids = [int(i) for i in self.sample_ids]
        check(p, self.prompt in PROMPTS, f"prompt={self.prompt!r} is unknown; use one of {sorted(PROMPTS)}")
        check(p, _is_int(self.cutoff_len) and self.cutoff_len >= 16, f"cutoff_len={self.cutoff_len!r} must be an int >= 16")
        check(p, self.max_history is None or (_is_int(self.max_history) and self.max_history >= 0),
              f"max_history={self.max_history!r} must be None (all) or an int >= 0")
        check(p, self.strategy in STRATEGIES, f"strategy={self.strategy!r} must be one of {STRATEGIES}")
        check(p, self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        if cls is not None and not getattr(cls, "supports_zero3", True):
            check(p, self.zero_stage != 3, f"zero_stage={self.zero_stage!r}: backend {self.backend!r} takes 0, 1 or 2 "
                  "(a LoRA on a small model gains nothing from ZeRO-3)")
        check(p, not (self.offload and self.zero_stage == 0), "offload needs zero_stage >= 1")
        check(p, not (self.offload and self.strategy != "deepspeed"), "offload needs strategy=deepspeed")
        check(p, _is_int(self.workers) and self.workers >= 1, f"workers={self.workers!r} must be an int >= 1")
        check(p, _is_int(self.max_failures) and self.max_failures >= -1,
              f"max_failures={self.max_failures!r} must be an integer >= -1 (-1 = unlimited)")
        check(p, isinstance(self.workers_cpu, (int, float)) and self.workers_cpu > 0,
              f"workers_cpu={self.workers_cpu!r} must be > 0")
        check(p, isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr={self.lr!r} must be in (0, 1)")
        check(p, self.lr_schedule in SCHEDULES, f"lr_schedule={self.lr_schedule!r} must be one of {SCHEDULES}")
        check(p, _is_int(self.warmup_steps) and self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps!r} must be >= 0")
        check(p, isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
              f"weight_decay={self.weight_decay!r} must be >= 0")
        check(p, isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0,
              f"max_grad_norm={self.max_grad_norm!r} must be >= 0")
        check(p, _is_int(self.epochs) and self.epochs >= 0, f"epochs={self.epochs!r} must be an int >= 0")
        check(p, self.micro_batch is None or (_is_int(self.micro_batch) and self.micro_batch >= 1),
              f"micro_batch={self.micro_batch!r} must be None or an int >= 1")
        min_batch = 2 if whole_batch else 1
        check(p, _is_int(self.batch_size) and self.batch_size >= min_batch,
              f"batch_size={self.batch_size!r} must be an int >= {min_batch}"
              + (" (in-batch negatives need two samples)" if whole_batch else ""))
        if (_is_int(self.workers) and self.workers >= 1 and _is_int(self.batch_size)
                and self.batch_size >= 1 and (self.micro_batch is None or _is_int(self.micro_batch))):
            world = self.world
            if self.micro_batch is None:
                check(p, self.batch_size % world == 0,
                      f"batch_size={self.batch_size} must be a multiple of workers={world} "
                      "(every rank takes an equal slice of the global batch)")
            elif self.micro_batch >= 1:
                per = self.micro_batch * world
                check(p, self.batch_size % per == 0,
                      f"batch_size={self.batch_size} must be a multiple of micro_batch x workers = {per} "
                      f"(e.g. --batch-size {max(per, (self.batch_size // per) * per)})")
                if whole_batch and self.batch_size % per == 0:
                    check(p, self.micro_batch * world == self.batch_size,
                          f"micro_batch={self.micro_batch}: backend {self.backend!r} takes its in-batch negatives "
                          "from the whole batch in one step; leave micro_batch unset (None)")
        check(p, _is_int(self.patience) and self.patience >= 1, f"patience={self.patience!r} must be an int >= 1")
        check(p, _is_int(self.val_samples) and self.val_samples >= 0, f"val_samples={self.val_samples!r} must be >= 0")
        check(p, _is_int(self.seed) and self.seed >= 0, f"seed={self.seed!r} must be an int >= 0")
        check(p, self.stop_after_epochs is None or (_is_int(self.stop_after_epochs) and self.stop_after_epochs >= 1),
              f"stop_after_epochs={self.stop_after_epochs!r} must be null or an int >= 1")
        check(p, self.time_budget_s is None or (isinstance(self.time_budget_s, (int, float))
                                               and math.isfinite(self.time_budget_s) and self.time_budget_s > 0),
              f"time_budget_s={self.time_budget_s!r} must be None or > 0 seconds")
        check(p, self.split in SPLITS, f"split={self.split!r}: expected one of {SPLITS}")
        check(p, self.max_eval_users is None or (_is_int(self.max_eval_users) and self.max_eval_users >= 1),
              f"max_eval_users={self.max_eval_users!r}: must be None (all) or an int >= 1")
        check(p, _is_int(self.eval_seed) and self.eval_seed >= 0, f"eval_seed={self.eval_seed!r}: must be an int >= 0")
        check(p, isinstance(self.ks, tuple) and len(self.ks) > 0 and all(_is_int(k) and k >= 1 for k in self.ks),
              f"ks={self.ks!r}: must be positive ints")
        check(p, _is_int(self.threads) and self.threads >= 0, f"threads={self.threads!r}: must be an int >= 0")
        if p:
            raise ConfigError(p, config="FinetuneConfig")

    @property
    def world(self) -> int:
        """Data-parallel ranks: ``workers``, or 1 for the local strategy."""
        return 1 if self.strategy == "local" else int(self.workers)

    @property
    def micro(self) -> int:
        """Samples per forward per rank (``micro_batch``, or the whole per-rank slice)."""
        return self.batch_size // self.world if self.micro_batch is None else int(self.micro_batch)

    @property
    def accumulation(self) -> int:
        """Gradient-accumulation steps per optimiser step."""
        return self.batch_size // (self.micro * self.world)

    def path_problems(self) -> list[str]:
        """Problems with the input and output paths, as seen from this machine (the driver checks
        them; workers on other nodes do not need them)."""
        p: list[str] = []
        if self.selected is not None and not Path(self.selected).exists():
            p.append(f"selected file {self.selected!r} does not exist; pass RUN/selected.parquet of a prune run")
        if not Path(self.data).is_dir():
            p.append(f"data folder {self.data!r} does not exist; run `dealrec prepare` first")
        if self.backend == "tiger" and self.semantic_ids:  # the codes of this catalogue, a fitting checkpoint
            from engine.llm.tiger.backend import option_problems

            opt = {"semantic_ids": "--semantic-ids", "checkpoint": "--tiger-checkpoint"}
            p.extend(f"{f} ({opt[f]}): {why}" for f, why in option_problems(self.tiger, self.semantic_ids, self.data))
        from engine.rundir import writable_problem  # read-only, inside a file: found before any work

        why = writable_problem(self.out, option="--out")
        if why:
            p.append(why)
        return p

    def prompt_config(self):
        """The :class:`engine.llm.bigrec.prompts.PromptConfig` of this run (preset + ``cutoff_len``)."""
        return get_prompt_config(self.prompt, cutoff_len=self.cutoff_len)

    def backend_options(self, *, base: str | None = None, device: str | None = None, on_gpu: bool = False) -> dict:
        """The keyword options of :func:`engine.llm.get_backend` for this run's backend.

        Args:
            base: BIGRec's resolved base model (a folder), so workers do not resolve it again.
            device: where the model goes (a worker's device).
            on_gpu: BIGRec trains in bf16 on GPUs.
        """
        if self.backend == "textrec":
            return {"config": {**self.textrec, **({"device": str(device)} if device is not None else {})}}
        if self.backend == "tiger":
            return {"config": {**self.tiger, **({"device": str(device)} if device is not None else {})},
                    "semantic_ids": self.semantic_ids}
        llm = self.llm.to_dict()
        if base is not None:
            llm["model"] = base
        if device is not None:
            llm.update(device=str(device), dtype="bfloat16" if on_gpu else "float32")
        return {"llm": llm, "prompt": self.prompt_config()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["llm"] = self.llm.to_dict()
        d["ks"] = list(self.ks)
        for k in OMITTED_WHEN_NONE:
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys reported).

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError([f"unknown field {k!r}" for k in unknown], config="FinetuneConfig")
        return cls(**d)

    def fingerprint(self) -> str:
        """Hash of the fields that a resumed run must share with the run it resumes (training only)."""
        d = self.to_dict()
        for k in (*RESUME_FREE_FIELDS, *EVAL_FIELDS):
            d.pop(k, None)
        return stable_hash(d)

    def eval_fingerprint(self) -> str:
        """Hash of the trained adapter's run and the evaluation fields."""
        return stable_hash({"train": self.fingerprint(), **{k: self.to_dict()[k] for k in EVAL_FIELDS}})
