"""Few-shot LoRA fine-tuning of the BIGRec LLM: the per-worker pieces (no Ray here).

What lives here (jobs/finetune.py wires it into a Ray Train ``TorchTrainer``):

- :class:`FinetuneConfig`: every knob, validated as a whole (one ConfigError listing all
  problems). Defaults follow BIGRec (lr 1e-4, 20 warm-up steps, linear decay, effective
  batch 128, cutoff 512) except those that only make sense for LLaMA-7B on GPUs
  (``epochs`` is 3 rather than 50 with early stopping).
- :func:`deepspeed_config`: the DeepSpeed JSON config (ZeRO 0-3, optional CPU offload,
  bf16 on GPU / fp32 on CPU, AdamW with ``torch_adam`` so nothing compiles on CPU).
- :func:`encode_examples`: (history ids, target id) pairs -> tokenised BIGRec samples.
- :class:`DeepSpeedStepper` / :class:`TorchStepper`: one micro-batch of forward, backward
  and (at accumulation boundaries) optimiser step, for a DeepSpeed engine or a plain /
  DDP-wrapped module; :func:`train_epoch` and :func:`validation_loss` drive either.
- checkpoint helpers (training state, optimiser state, best adapter) and
  :func:`lora_checksum` (to check that every rank holds the same LoRA weights).

Determinism: the epoch's sample order is ``default_rng([seed, epoch])``, and the torch
RNG (LoRA dropout) is reseeded at every epoch start from (seed, epoch, rank), so a run
resumed from an epoch checkpoint continues exactly the curve of an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import collect_problems, stable_hash
from engine.errors import ConfigError, check
from engine.llm.bigrec.model import LLMConfig
from engine.llm.bigrec.prompts import PROMPTS, collate, encode_sample, get_prompt_config, per_sample_causal_lm_loss

__all__ = [
    "FinetuneConfig",
    "deepspeed_config",
    "encode_examples",
    "lr_lambda",
    "make_scheduler",
    "steps_per_epoch",
    "epoch_shard",
    "DeepSpeedStepper",
    "TorchStepper",
    "train_epoch",
    "validation_loss",
    "lora_checksum",
    "export_adapter",
    "STATE_FILE",
    "BEST_ADAPTER_DIR",
]

STRATEGIES = ("deepspeed", "ddp")
STATE_FILE = "state.json"
BEST_ADAPTER_DIR = "best_adapter"
TORCH_STATE_FILE = "torch_state.pt"
DS_DIR = "deepspeed"
DS_TAG = "ds"
# Fields that may change between a run and its resume without invalidating the checkpoint.
RESUME_FREE_FIELDS = ("stop_after_epochs", "workers_cpu", "out", "use_gpu", "max_failures")


@dataclass
class FinetuneConfig:
    """Few-shot fine-tune of the BIGRec LoRA LLM (validated as a whole in ``__post_init__``).

    The effective batch is ``micro_batch * accumulation * workers``; give ``batch_size`` and
    the accumulation is derived (it must divide exactly).
    """

    data: str = field(metadata={"help": "prepared data folder (dealrec prepare)"})
    out: str = field(metadata={"help": "output folder: adapter/, finetune.json, Ray Train run"})
    selected: str | None = field(default=None, metadata={"help": "selected.parquet (column sample_id) of a prune run"})
    all_samples: bool = field(default=False, metadata={"help": "fine-tune on every sample (full baseline)"})
    llm: LLMConfig = field(default_factory=LLMConfig, metadata={"help": "base model + LoRA (engine.llm.bigrec.model.LLMConfig)"})
    prompt: str = field(default="generic", metadata={"help": "prompt preset: " + ", ".join(PROMPTS)})
    cutoff_len: int = field(default=512, metadata={"help": "max tokens per sample (BIGRec: 512)"})
    max_history: int = field(default=10, metadata={"help": "newest history titles kept in a prompt (BIGRec data: 10)"})
    strategy: str = field(default="deepspeed", metadata={"help": "deepspeed | ddp"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage 0-3"})
    offload: bool = field(default=False, metadata={"help": "ZeRO CPU offload of optimizer (and params at stage 3)"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (data-parallel ranks)"})
    use_gpu: bool | None = field(default=None, metadata={"help": "one GPU per worker; None = when the cluster has GPUs"})
    workers_cpu: float = field(default=1.0, metadata={"help": "CPUs reserved per worker (CPU runs)"})
    max_failures: int = field(default=3, metadata={"help": "Ray Train restarts of the worker group after a worker or node loss, each from the last epoch checkpoint (-1 = unlimited)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (BIGRec: 1e-4)"})
    warmup_steps: int = field(default=20, metadata={"help": "linear warm-up optimiser steps (BIGRec: 20)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 disables)"})
    epochs: int = field(default=3, metadata={"help": "max epochs (BIGRec: 50 with early stopping)"})
    batch_size: int = field(default=16, metadata={"help": "effective batch (BIGRec: 128) = micro x accum x workers"})
    micro_batch: int = field(default=4, metadata={"help": "samples per forward per worker"})
    patience: int = field(default=2, metadata={"help": "early stop after this many epochs without a better val loss"})
    val_samples: int = field(default=256, metadata={"help": "validation samples (valid users: history -> first target)"})
    seed: int = field(default=0, metadata={"help": "data order, dropout and validation subset"})
    stop_after_epochs: int | None = field(
        default=None, metadata={"help": "end this invocation after N more epochs (the run stays resumable)"})

    def __post_init__(self) -> None:
        if isinstance(self.llm, dict):
            built, problems = collect_problems([("llm", lambda: LLMConfig.from_dict(self.llm))])
            self.llm = built.get("llm", self.llm)
        else:
            problems = []
        p = problems

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        check(p, isinstance(self.data, str) and self.data != "", f"data must be a folder path, got {self.data!r}")
        check(p, isinstance(self.out, str) and self.out != "", f"out must be a folder path, got {self.out!r}")
        check(p, (self.selected is not None) != bool(self.all_samples),
              f"give exactly one of selected (got {self.selected!r}) or all_samples (got {self.all_samples!r})")
        check(p, self.prompt in PROMPTS, f"prompt={self.prompt!r} is unknown; use one of {sorted(PROMPTS)}")
        check(p, is_int(self.cutoff_len) and self.cutoff_len >= 16, f"cutoff_len={self.cutoff_len!r} must be an int >= 16")
        check(p, is_int(self.max_history) and self.max_history >= 0, f"max_history={self.max_history!r} must be >= 0")
        check(p, self.strategy in STRATEGIES, f"strategy={self.strategy!r} must be one of {STRATEGIES}")
        check(p, self.zero_stage in (0, 1, 2, 3), f"zero_stage={self.zero_stage!r} must be 0, 1, 2 or 3")
        check(p, not (self.offload and self.zero_stage == 0), "offload needs zero_stage >= 1")
        check(p, not (self.offload and self.strategy != "deepspeed"), "offload needs strategy=deepspeed")
        check(p, is_int(self.workers) and self.workers >= 1, f"workers={self.workers!r} must be an int >= 1")
        check(p, isinstance(self.max_failures, int) and self.max_failures >= -1,
              f"max_failures={self.max_failures!r} must be an integer >= -1 (-1 = unlimited)")
        check(p, isinstance(self.workers_cpu, (int, float)) and self.workers_cpu > 0,
              f"workers_cpu={self.workers_cpu!r} must be > 0")
        check(p, isinstance(self.lr, (int, float)) and 0 < self.lr < 1, f"lr={self.lr!r} must be in (0, 1)")
        check(p, is_int(self.warmup_steps) and self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps!r} must be >= 0")
        check(p, isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
              f"weight_decay={self.weight_decay!r} must be >= 0")
        check(p, isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0,
              f"max_grad_norm={self.max_grad_norm!r} must be >= 0")
        check(p, is_int(self.epochs) and self.epochs >= 1, f"epochs={self.epochs!r} must be an int >= 1")
        check(p, is_int(self.micro_batch) and self.micro_batch >= 1, f"micro_batch={self.micro_batch!r} must be >= 1")
        check(p, is_int(self.batch_size) and self.batch_size >= 1, f"batch_size={self.batch_size!r} must be >= 1")
        if all(is_int(v) and v >= 1 for v in (self.batch_size, self.micro_batch, self.workers)):
            per = self.micro_batch * self.workers
            check(p, self.batch_size % per == 0,
                  f"batch_size={self.batch_size} must be a multiple of micro_batch x workers = {per} "
                  f"(e.g. --batch-size {max(per, (self.batch_size // per) * per)})")
        check(p, is_int(self.patience) and self.patience >= 1, f"patience={self.patience!r} must be an int >= 1")
        check(p, is_int(self.val_samples) and self.val_samples >= 0, f"val_samples={self.val_samples!r} must be >= 0")
        check(p, is_int(self.seed), f"seed={self.seed!r} must be an int")
        check(p, self.stop_after_epochs is None or (is_int(self.stop_after_epochs) and self.stop_after_epochs >= 1),
              f"stop_after_epochs={self.stop_after_epochs!r} must be null or an int >= 1")
        if p:
            raise ConfigError(p, config="FinetuneConfig")

    def path_problems(self) -> list[str]:
        """Problems with the input and output paths, as seen from this machine (the driver checks
        them; workers on other nodes do not need them)."""
        p: list[str] = []
        if self.selected is not None and not Path(self.selected).exists():
            p.append(f"selected file {self.selected!r} does not exist; pass RUN/selected.parquet of a prune run")
        if not Path(self.data).is_dir():
            p.append(f"data folder {self.data!r} does not exist; run `dealrec prepare` first")
        from engine.rundir import writable_problem  # read-only, inside a file: found before any work

        why = writable_problem(self.out, option="--out")
        if why:
            p.append(why)
        return p

    @property
    def accumulation(self) -> int:
        """Gradient-accumulation steps per optimiser step."""
        return self.batch_size // (self.micro_batch * self.workers)

    def prompt_config(self):
        """The :class:`engine.llm.bigrec.prompts.PromptConfig` of this run (preset + ``cutoff_len``)."""
        return get_prompt_config(self.prompt, cutoff_len=self.cutoff_len)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["llm"] = self.llm.to_dict()
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
        """Hash of the fields that a resumed run must share with the run it resumes."""
        d = self.to_dict()
        for k in RESUME_FREE_FIELDS:
            d.pop(k, None)
        return stable_hash(d)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then linear decay to 0 (transformers' ``linear`` schedule, as BIGRec).

    Args:
        step: optimiser steps done.
        warmup_steps: steps of the warm-up ramp.
        total_steps: steps of the whole run.

    Returns:
        The multiplier of the peak learning rate.
    """
    if step < warmup_steps:
        return float(step + 1) / float(warmup_steps + 1)
    return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))


class _Schedule:
    """Picklable LR lambda (a LambdaLR state_dict keeps callable objects' __dict__)."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_lambda(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int):
    """The BIGRec learning-rate schedule as a ``LambdaLR`` over optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.warmup_steps, total_steps))


def deepspeed_config(cfg: FinetuneConfig, *, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed JSON config of a run.

    Args:
        cfg: the fine-tune config (batch sizes, ZeRO stage, offload, optimiser).
        world_size: number of data-parallel ranks.
        on_gpu: bf16 and DeepSpeed's compiled CPU Adam for offload on GPU; fp32 and torch
            AdamW (nothing to compile) on CPU.

    Returns:
        A dict to pass as ``deepspeed.initialize(config=...)``.
    """
    acc = cfg.batch_size // (cfg.micro_batch * world_size)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu, "reduce_scatter": True})
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # On CPU, torch's AdamW avoids compiling fused_adam / cpu_adam (~50 s each, STACK.md);
    # with offload on GPU DeepSpeed's CPU Adam is the fast path and worth its compile.
    torch_adam = not (on_gpu and cfg.offload)
    conf = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": acc,
        "train_batch_size": cfg.micro_batch * acc * world_size,
        "gradient_clipping": float(cfg.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(on_gpu)},
        "fp16": {"enabled": False},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": cfg.weight_decay,
                       "torch_adam": torch_adam},
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": not torch_adam,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return conf


def encode_examples(
    tokenizer,
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    titles: Sequence[str],
    prompt_cfg,
    *,
    max_history: int,
) -> list[dict]:
    """Tokenise (history item ids, target item id) pairs as BIGRec training samples.

    Args:
        tokenizer: the LLM's tokenizer.
        histories: per sample, item ids oldest first; the newest ``max_history`` are used.
        targets: per sample, the target item id.
        titles: item titles indexed by item id.
        prompt_cfg: :class:`engine.llm.bigrec.prompts.PromptConfig`.
        max_history: newest titles kept (0 = none).

    Returns:
        Dicts ``{"input_ids", "labels", "n_history_kept"}`` (see ``engine.llm.bigrec.prompts.encode_sample``).
    """
    out = []
    for h, t in zip(histories, targets):
        h = list(h)[-max_history:] if max_history > 0 else []
        out.append(encode_sample(tokenizer, [titles[int(i)] for i in h], titles[int(t)], prompt_cfg))
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class DeepSpeedStepper:
    """One micro-batch step on a DeepSpeed engine (it accumulates and clips by itself)."""

    def __init__(self, engine):
        self.engine = engine
        self.model = engine.module
        self.device = engine.device

    def micro_step(self, batch: dict) -> float:
        """Forward + backward (+ optimiser step at the boundary); returns the micro-batch loss."""
        out = self.engine(**_to(batch, self.device), use_cache=False)
        self.engine.backward(out.loss)
        self.engine.step()
        return float(out.loss.detach().float())

    @property
    def optimizer_steps(self) -> int:
        return int(self.engine.global_steps)

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, ckpt_dir: Path, *, rank: int = 0) -> None:
        """Every rank must call: each writes its ZeRO partition of the optimiser state."""
        del rank
        self.engine.save_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, ckpt_dir: Path) -> None:
        self.engine.load_checkpoint(str(ckpt_dir / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)


class TorchStepper:
    """One micro-batch step on a plain or DDP-wrapped module with a torch optimiser.

    Args:
        model: the module (``DistributedDataParallel`` or not).
        optimizer: e.g. ``torch.optim.AdamW`` over the LoRA parameters.
        scheduler: LR scheduler stepped once per optimiser step.
        accumulation: micro-batches per optimiser step.
        max_grad_norm: clip the global gradient norm (0 disables).
        device: where batches go.
    """

    def __init__(self, model, optimizer, scheduler, *, accumulation: int, max_grad_norm: float, device):
        self.engine = model
        self.model = getattr(model, "module", model)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.device = torch.device(device)
        self._micro = 0
        self._steps = 0

    def micro_step(self, batch: dict) -> float:
        """Forward + backward (+ optimiser step every ``accumulation`` calls); returns the loss."""
        self._micro += 1
        boundary = self._micro % self.accumulation == 0
        sync = getattr(self.engine, "no_sync", None)
        ctx = sync() if (sync is not None and not boundary) else _nullcontext()
        with ctx:
            out = self.engine(**_to(batch, self.device), use_cache=False)
            (out.loss / self.accumulation).backward()
        if boundary:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._steps += 1
        return float(out.loss.detach().float())

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, ckpt_dir: Path, *, rank: int = 0) -> None:
        """Rank 0 writes LoRA weights + optimiser + scheduler (replicas are identical)."""
        if rank != 0:
            return
        from peft import get_peft_model_state_dict

        torch.save({"lora": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "steps": self._steps, "micro": self._micro},
                   ckpt_dir / TORCH_STATE_FILE)

    def load(self, ckpt_dir: Path) -> None:
        from peft import set_peft_model_state_dict

        st = torch.load(ckpt_dir / TORCH_STATE_FILE, map_location=self.device, weights_only=False)
        set_peft_model_state_dict(self.model, st["lora"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self._steps, self._micro = int(st["steps"]), int(st["micro"])


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def epoch_shard(n: int, *, epoch: int, seed: int, rank: int, world: int, per_rank: int) -> np.ndarray:
    """This rank's sample positions for an epoch: a seeded permutation dealt round-robin.

    Args:
        n: number of samples.
        epoch, seed: the permutation is ``default_rng([seed, epoch]).permutation(n)``.
        rank, world: data-parallel position.
        per_rank: samples per rank (the permutation is cycled when short, so every rank
            runs the same number of steps).

    Returns:
        ``[per_rank]`` positions into the sample list.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    need = per_rank * world
    if need > n:
        perm = np.resize(perm, need)
    return perm[rank : need : world]


def steps_per_epoch(n: int, cfg: FinetuneConfig, world: int) -> int:
    """Optimiser steps per epoch: whole effective batches only (the remainder of each
    epoch's permutation is dropped; the next epoch draws a fresh permutation), at least 1."""
    del world  # the effective batch already counts every rank
    return max(1, n // cfg.batch_size)


def train_epoch(
    stepper,
    encoded: Sequence[dict],
    *,
    cfg: FinetuneConfig,
    epoch: int,
    rank: int,
    world: int,
    pad_id: int,
) -> dict:
    """Run one epoch of micro-steps on this rank.

    Args:
        stepper: :class:`DeepSpeedStepper` or :class:`TorchStepper`.
        encoded: every training sample (each rank sees all and takes its shard).
        cfg: batch sizes and seed.
        epoch: 0-based epoch (seeds the order and the dropout RNG).
        rank, world: data-parallel position.
        pad_id: the tokenizer's pad id.

    Returns:
        ``{"train_loss": mean over this run's micro-batches on all ranks, "steps": optimiser
        steps, "samples": samples seen on all ranks, "seconds": wall time}``.
    """
    t0 = time.perf_counter()
    acc = cfg.batch_size // (cfg.micro_batch * world)
    steps = steps_per_epoch(len(encoded), cfg, world)
    per_rank = steps * acc * cfg.micro_batch
    idx = epoch_shard(len(encoded), epoch=epoch, seed=cfg.seed, rank=rank, world=world, per_rank=per_rank)
    torch.manual_seed(_rng_seed(cfg.seed, epoch, rank))
    stepper.train()
    losses = []
    for s in range(0, per_rank, cfg.micro_batch):
        batch = collate([encoded[int(i)] for i in idx[s : s + cfg.micro_batch]], pad_id)
        losses.append(stepper.micro_step(batch))
    stepper.eval()
    tot = torch.tensor([sum(losses), float(len(losses))], dtype=torch.float64)
    d = _dist()
    if d is not None and world > 1:
        d.all_reduce(tot)
    return {"train_loss": float(tot[0] / tot[1]), "steps": steps, "samples": per_rank * world,
            "seconds": time.perf_counter() - t0}


def _rng_seed(seed: int, epoch: int, rank: int) -> int:
    return int(hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).hexdigest()[:12], 16)


@torch.no_grad()
def validation_loss(model, encoded: Sequence[dict], *, micro_batch: int, rank: int, world: int, pad_id: int,
                    device) -> float:
    """Mean per-sample causal-LM loss over the validation samples, all ranks together.

    Each rank scores positions ``rank::world``; sums and counts are all-reduced, so every
    rank returns the same number (batch-independent: each sample is the mean over its
    own tokens).

    Returns:
        The mean loss, or ``nan`` when there are no validation samples.
    """
    model.eval()
    mine = list(range(rank, len(encoded), world))
    tot = torch.zeros(2, dtype=torch.float64)
    for s in range(0, len(mine), micro_batch):
        batch = collate([encoded[i] for i in mine[s : s + micro_batch]], pad_id)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            loss = per_sample_causal_lm_loss(model, _to(batch, device))
        tot[0] += float(loss.double().sum())
        tot[1] += loss.numel()
    d = _dist()
    if d is not None and world > 1:
        d.all_reduce(tot)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


def _lora_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if "lora_" in n]


class _gathered:
    """Gather ZeRO-3 partitioned parameters for reading (no-op for other stages)."""

    def __init__(self, params, zero3: bool):
        self.params, self.zero3 = params, zero3
        self._ctx = None

    def __enter__(self):
        if self.zero3:
            import deepspeed

            self._ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self._ctx is not None:
            return self._ctx.__exit__(*exc)
        return False


def lora_checksum(model, *, zero3: bool = False) -> dict:
    """A fingerprint of the LoRA weights: ``{"sum": float64 sum, "sha256": of the raw bytes}``.

    Args:
        model: the peft model (unwrapped).
        zero3: gather ZeRO-3 partitions first (collective: every rank must call).
    """
    named = _lora_params(model)
    h = hashlib.sha256()
    total = 0.0
    with _gathered([p for _, p in named], zero3):
        for n, p in sorted(named, key=lambda x: x[0]):
            t = p.detach().float().cpu().contiguous()
            h.update(n.encode())
            h.update(t.numpy().tobytes())
            total += float(t.double().sum())
    return {"sum": total, "sha256": h.hexdigest()[:16]}


def export_adapter(model, path: Path, *, rank: int, zero3: bool = False) -> None:
    """Write the LoRA adapter in peft format (``save_pretrained``) from rank 0.

    Args:
        model: the peft model (unwrapped from DDP / DeepSpeed).
        path: target folder (replaced).
        rank: only rank 0 writes; with ``zero3`` every rank must call (gather is collective).
        zero3: gather ZeRO-3 partitions first.
    """
    with _gathered([p for _, p in _lora_params(model)], zero3):
        if rank == 0:
            path = Path(path)
            if path.exists():
                shutil.rmtree(path)
            model.save_pretrained(str(path))


def new_state(cfg: FinetuneConfig, n_train: int, n_val: int) -> dict:
    """The resumable training state kept in every epoch checkpoint (``state.json``)."""
    return {"fingerprint": cfg.fingerprint(), "epoch": 0, "history": [], "best_val_loss": None,
            "best_epoch": None, "bad_epochs": 0, "stopped_early": False, "n_train": n_train, "n_val": n_val}


def update_state(state: dict, cfg: FinetuneConfig, epoch_stats: dict, val_loss: float) -> bool:
    """Record an epoch; returns True when ``val_loss`` is the best so far (export the adapter).

    Early stopping: ``stopped_early`` turns on after ``cfg.patience`` epochs without a
    strictly lower validation loss. Without validation samples (nan) the last epoch is best.
    """
    state["epoch"] += 1
    rec = {"epoch": state["epoch"], **{k: epoch_stats[k] for k in ("train_loss", "steps", "samples", "seconds")},
           "val_loss": None if math.isnan(val_loss) else val_loss}
    state["history"].append(rec)
    best = state["best_val_loss"]
    improved = math.isnan(val_loss) or best is None or val_loss < best
    if improved:
        state["best_val_loss"] = None if math.isnan(val_loss) else val_loss
        state["best_epoch"] = state["epoch"]
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] += 1
        if state["bad_epochs"] >= cfg.patience:
            state["stopped_early"] = True
    return improved


def write_state(ckpt_dir: Path, state: dict) -> None:
    (Path(ckpt_dir) / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))


def read_state(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / STATE_FILE).read_text())


def copy_tree(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src`` (no-op when ``src`` is missing)."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def samples_per_second(history: Sequence[dict]) -> float:
    """Training throughput over the recorded epochs (samples / training seconds)."""
    secs = sum(h["seconds"] for h in history)
    return float(sum(h["samples"] for h in history) / secs) if secs > 0 else 0.0
