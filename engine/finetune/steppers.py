"""One micro-batch of forward, backward and (at accumulation boundaries) optimiser step, on a plain
module, a DDP-wrapped one or a DeepSpeed engine; the learning-rate schedule; the DeepSpeed config.

The loss is the backend's (``loss_fn(module, batch)``): the steppers never look inside a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from engine.finetune.adapter import peft_module
from engine.finetune.config import FinetuneConfig

__all__ = ["lr_lambda", "make_scheduler", "deepspeed_config", "DeepSpeedStepper", "TorchStepper", "build_stepper",
           "causal_lm_loss"]

TORCH_STATE_FILE = "torch_state.pt"
DS_DIR = "deepspeed"
DS_TAG = "ds"


def causal_lm_loss(module, batch: dict) -> torch.Tensor:
    """Hugging Face's token-mean causal-LM loss of a batch (the default ``loss_fn``: BIGRec's)."""
    return module(**batch, use_cache=False).loss


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

    def __init__(self, warmup_steps: int, total_steps: int, constant: bool = False):
        self.warmup_steps, self.total_steps, self.constant = warmup_steps, total_steps, constant

    def __call__(self, step: int) -> float:
        if self.constant:
            return 1.0
        return lr_lambda(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: FinetuneConfig, total_steps: int):
    """``cfg.lr_schedule`` as a ``LambdaLR`` over optimiser steps (``constant``: the factor is 1.0)."""
    constant = getattr(cfg, "lr_schedule", "linear") == "constant"
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(cfg.warmup_steps, total_steps, constant))


def deepspeed_config(cfg: FinetuneConfig, *, world_size: int, on_gpu: bool, bf16: bool | None = None) -> dict:
    """The DeepSpeed JSON config of a run.

    Args:
        cfg: the fine-tune config (batch sizes, ZeRO stage, offload, optimiser).
        world_size: number of data-parallel ranks.
        on_gpu: DeepSpeed's compiled CPU Adam for offload on GPU; torch AdamW (nothing to compile) on CPU.
        bf16: bf16 training (default: on GPU); a backend may keep fp32 everywhere.

    Returns:
        A dict to pass as ``deepspeed.initialize(config=...)``.
    """
    micro = cfg.batch_size // world_size if cfg.micro_batch is None else cfg.micro_batch
    acc = cfg.batch_size // (micro * world_size)
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": on_gpu, "reduce_scatter": True})
    if cfg.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # On CPU, torch's AdamW avoids compiling fused_adam / cpu_adam (~50 s each, docs/architecture.md#the-stack-checked-versions-and-traps);
    # with offload on GPU DeepSpeed's CPU Adam is the fast path and worth its compile.
    torch_adam = not (on_gpu and cfg.offload)
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": acc,
        "train_batch_size": micro * acc * world_size,
        "gradient_clipping": float(cfg.max_grad_norm),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(on_gpu if bf16 is None else bf16 and on_gpu)},
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


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class DeepSpeedStepper:
    """One micro-batch step on a DeepSpeed engine (it accumulates, clips and schedules by itself).

    Args:
        engine: from ``deepspeed.initialize``.
        loss_fn: ``loss_fn(engine, batch) -> scalar`` (default: :func:`causal_lm_loss`).
    """

    def __init__(self, engine, loss_fn: Callable | None = None):
        self.engine = engine
        self.model = engine.module
        self.device = engine.device
        self.loss_fn = loss_fn or causal_lm_loss
        self.zero3 = int(engine.zero_optimization_stage()) == 3

    def micro_step(self, batch: dict) -> float:
        """Forward + backward (+ optimiser step at the boundary); returns the micro-batch loss."""
        loss = self.loss_fn(self.engine, _to(batch, self.device))
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach().float())

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
        loss_fn: ``loss_fn(module, batch) -> scalar`` (default: :func:`causal_lm_loss`).
        full_model: every parameter trains (a full fine-tune): checkpoints hold every trainable
            parameter by name instead of the LoRA state dict.
    """

    zero3 = False

    def __init__(self, model, optimizer, scheduler, *, accumulation: int, max_grad_norm: float, device,
                 loss_fn: Callable | None = None, full_model: bool = False):
        self.engine = model
        self.model = getattr(model, "module", model)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.accumulation, self.max_grad_norm = accumulation, max_grad_norm
        self.device = torch.device(device)
        self.loss_fn = loss_fn or causal_lm_loss
        self.full_model = bool(full_model)
        self._micro = 0
        self._steps = 0

    def micro_step(self, batch: dict) -> float:
        """Forward + backward (+ optimiser step every ``accumulation`` calls); returns the loss."""
        self._micro += 1
        boundary = self._micro % self.accumulation == 0
        sync = getattr(self.engine, "no_sync", None)
        with sync() if (sync is not None and not boundary) else nullcontext():
            loss = self.loss_fn(self.engine, _to(batch, self.device))
            (loss / self.accumulation).backward()
        if boundary:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._steps += 1
        return float(loss.detach().float())

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def save(self, ckpt_dir: Path, *, rank: int = 0) -> None:
        """Rank 0 writes the trained weights (LoRA, or every trainable parameter of a full
        fine-tune) + optimiser + scheduler (replicas are identical)."""
        if rank != 0:
            return
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "steps": self._steps, "micro": self._micro}
        if self.full_model:
            state["model"] = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            from peft import get_peft_model_state_dict

            state["lora"] = get_peft_model_state_dict(peft_module(self.model))
        torch.save(state, Path(ckpt_dir) / TORCH_STATE_FILE)

    def load(self, ckpt_dir: Path) -> None:
        st = torch.load(Path(ckpt_dir) / TORCH_STATE_FILE, map_location=self.device, weights_only=False)
        if self.full_model:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, t in st["model"].items():
                    params[n].copy_(t)
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(peft_module(self.model), st["lora"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self._steps, self._micro = int(st["steps"]), int(st["micro"])


def build_stepper(model, cfg: FinetuneConfig, *, world: int, total_steps: int, device, on_gpu: bool = False,
                  loss_fn: Callable | None = None, wrap_model: Callable | None = None, bf16: bool | None = None,
                  full_model: bool = False):
    """The stepper of ``cfg.strategy`` over ``model``'s trainable parameters (LoRA, or all of them).

    Args:
        model: the backend's model, on ``device``.
        cfg: strategy, ZeRO stage, optimiser and schedule.
        world: data-parallel ranks (``torch.distributed`` initialised when > 1).
        total_steps: optimiser steps of the whole run (the linear schedule's end).
        device: where batches go.
        on_gpu: DeepSpeed on GPUs (bf16 unless ``bf16=False``, NCCL).
        loss_fn: the backend's ``loss_fn(module, batch)``.
        wrap_model: for ``ddp``, the DDP wrapper (e.g. ``ray.train.torch.prepare_model``); None = none.
        bf16: see :func:`deepspeed_config`.
        full_model: a full fine-tune (:class:`TorchStepper` checkpoints every trainable parameter;
            DeepSpeed saves its module's trainable parameters either way).

    Returns:
        A :class:`DeepSpeedStepper` (``deepspeed``) or :class:`TorchStepper` (``local``, ``ddp``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.strategy == "deepspeed":
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params,
            config=deepspeed_config(cfg, world_size=world, on_gpu=on_gpu, bf16=bf16),
            lr_scheduler=lambda opt: make_scheduler(opt, cfg, total_steps))
        return DeepSpeedStepper(engine, loss_fn)
    wrapped = wrap_model(model) if (wrap_model is not None and cfg.strategy == "ddp") else model
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return TorchStepper(wrapped, opt, make_scheduler(opt, cfg, total_steps),
                        accumulation=cfg.batch_size // ((cfg.batch_size // world if cfg.micro_batch is None
                                                         else cfg.micro_batch) * world),
                        max_grad_norm=cfg.max_grad_norm, device=device, loss_fn=loss_fn, full_model=full_model)
