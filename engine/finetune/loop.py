"""The fine-tune loop over ``backend.encode_train`` / ``backend.train_loss``: one function for the
local run and every data-parallel rank (DDP or DeepSpeed), with epoch checkpoints and early stopping.

One global batch, any number of ranks. Each optimiser step takes ``batch_size`` positions of the
epoch's seeded permutation (whole batches only; cycled when the data is short); rank r takes the
r-th contiguous slice of them and cuts it into micro-batches. The micro-batches of a step are
therefore the same for every world size, and with the ranks' gradient averaging one step is the
local step: local, DDP and DeepSpeed runs of one config train the same adapter up to float
rounding (dropout draws differ per rank: compare with dropout 0). A backend whose loss needs the
whole batch (textrec's in-batch negatives) gets ``rank``/``world`` in ``train_loss`` and gathers
what it needs itself; the loop never looks inside a batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.errors import ResumeError
from engine.finetune.adapter import export_trained, full_finetune, trained_checksum
from engine.finetune.config import FinetuneConfig
from engine.finetune.steppers import _to, build_stepper

__all__ = ["train", "run_epoch", "train_epoch", "validation_loss", "mean_loss", "epoch_shard", "steps_per_epoch",
           "encode_examples", "new_state", "update_state", "write_state", "read_state", "copy_tree",
           "samples_per_second", "STATE_FILE", "BEST_ADAPTER_DIR"]

STATE_FILE = "state.json"
BEST_ADAPTER_DIR = "best_adapter"


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(values: Sequence[float], world: int, op: str = "sum") -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    d = _dist()
    if d is not None and world > 1:
        d.all_reduce(t, op=d.ReduceOp.MAX if op == "max" else d.ReduceOp.SUM)
    return t.tolist()


def _rng_seed(seed: int, epoch: int, rank: int, salt: str = "") -> int:
    return int(hashlib.sha256(f"{salt}{seed}/{epoch}/{rank}".encode()).hexdigest()[:12], 16)


def steps_per_epoch(n: int, cfg: FinetuneConfig, world: int = 1) -> int:
    """Optimiser steps per epoch: whole effective batches only (the remainder of each
    epoch's permutation is dropped; the next epoch draws a fresh permutation), at least 1."""
    del world  # the effective batch already counts every rank
    return max(1, n // cfg.batch_size)


def epoch_shard(n: int, *, epoch: int, seed: int, rank: int, world: int, per_rank: int) -> np.ndarray:
    """A seeded permutation of ``n`` dealt round-robin to ``world`` ranks (cycled when short).

    Returns:
        ``[per_rank]`` positions of rank ``rank``.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    need = per_rank * world
    if need > n:
        perm = np.resize(perm, need)
    return perm[rank : need : world]


def _epoch_order(n: int, *, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's positions, ``steps * batch_size`` of them: ``default_rng([seed, epoch])``'s
    permutation, cut to whole batches (cycled when ``n < batch_size``)."""
    steps = max(1, n // batch_size)
    return np.resize(np.random.default_rng([seed, epoch]).permutation(n), steps * batch_size)


def run_epoch(stepper, make_batch: Callable[[np.ndarray], dict], n: int, *, cfg: FinetuneConfig, epoch: int,
              rank: int = 0, world: int = 1, salt: str = "", t_start: float | None = None) -> dict:
    """One epoch of optimiser steps on this rank (every rank of a group calls it).

    Args:
        stepper: a :mod:`engine.finetune.steppers` stepper.
        make_batch: positions (into the training samples) -> a model batch.
        n: number of training samples.
        cfg: batch size, micro-batch, seed, time budget.
        epoch: 0-based epoch (seeds the order and the dropout RNG).
        rank, world: data-parallel position.
        salt: of the dropout seed (a backend's, to keep its earlier runs reproducible).
        t_start: when training started (the time budget counts from it; default now).

    Returns:
        ``{"train_loss": mean over all ranks' micro-batches, "steps": optimiser steps, "samples":
        samples seen on all ranks, "seconds": wall time, "stopped_by_time_budget": bool}``.
    """
    t0 = time.perf_counter()
    t_start = t0 if t_start is None else t_start
    B = cfg.batch_size
    b = B // world
    micro = b if cfg.micro_batch is None else int(cfg.micro_batch)
    order = _epoch_order(n, batch_size=B, seed=cfg.seed, epoch=epoch)
    torch.manual_seed(_rng_seed(cfg.seed, epoch, rank, salt))
    stepper.train()
    losses: list[float] = []
    done, stopped = 0, False
    budget = getattr(cfg, "time_budget_s", None)
    for s in range(len(order) // B):
        mine = order[s * B + rank * b : s * B + (rank + 1) * b]
        for m in range(0, b, micro):
            losses.append(stepper.micro_step(make_batch(mine[m : m + micro])))
        done += 1
        if budget is not None:
            # rank 0's clock decides, so that every rank stops after the same step
            over = rank == 0 and time.perf_counter() - t_start >= budget
            if _all_reduce([float(over)], world, "max")[0] > 0:
                stopped = True
                break
    stepper.eval()
    tot = _all_reduce([sum(losses), float(len(losses))], world)
    return {"train_loss": tot[0] / tot[1] if tot[1] else float("nan"), "steps": done, "samples": done * B,
            "seconds": time.perf_counter() - t0, "stopped_by_time_budget": stopped}


@torch.no_grad()
def mean_loss(model, make_batch: Callable[[list[int]], dict], n: int, loss_fn, *, micro_batch: int, rank: int = 0,
              world: int = 1, device="cpu") -> float:
    """Mean of a batch-independent per-sample loss over ``n`` samples, all ranks together.

    Each rank scores positions ``rank::world``; sums and counts are all-reduced, so every rank
    returns the same number.

    Returns:
        The mean loss, or ``nan`` when there are no samples.
    """
    model.eval()
    mine = list(range(rank, n, world))
    tot = torch.zeros(2, dtype=torch.float64)
    for s in range(0, len(mine), micro_batch):
        batch = _to(make_batch(mine[s : s + micro_batch]), device)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            loss = loss_fn(model, batch)
        tot[0] += float(loss.double().sum())
        tot[1] += loss.numel()
    tot = torch.tensor(_all_reduce(tot.tolist(), world), dtype=torch.float64)
    return float(tot[0] / tot[1]) if tot[1] > 0 else float("nan")


# ------------------------------------------------- BIGRec's pre-tokenised entry points (jobs/tune.py)
def encode_examples(tokenizer, histories, targets, titles, prompt_cfg, *, max_history: int) -> list[dict]:
    """Tokenise (history item ids, target item id) pairs as BIGRec training samples (the newest
    ``max_history`` titles; see :func:`engine.llm.bigrec.prompts.encode_sample`)."""
    from engine.llm.bigrec.prompts import encode_sample

    out = []
    for h, t in zip(histories, targets):
        h = list(h)[-max_history:] if max_history > 0 else []
        out.append(encode_sample(tokenizer, [titles[int(i)] for i in h], titles[int(t)], prompt_cfg))
    return out


def train_epoch(stepper, encoded: Sequence[dict], *, cfg: FinetuneConfig, epoch: int, rank: int, world: int,
                pad_id: int) -> dict:
    """:func:`run_epoch` over pre-tokenised BIGRec samples (:func:`encode_examples`)."""
    from engine.llm.bigrec.prompts import collate

    return run_epoch(stepper, lambda pos: collate([encoded[int(i)] for i in pos], pad_id), len(encoded), cfg=cfg,
                     epoch=epoch, rank=rank, world=world)


def validation_loss(model, encoded: Sequence[dict], *, micro_batch: int, rank: int, world: int, pad_id: int,
                    device) -> float:
    """:func:`mean_loss` of BIGRec's per-sample causal-LM loss over pre-tokenised samples."""
    from engine.llm.bigrec.prompts import collate, per_sample_causal_lm_loss

    return mean_loss(model, lambda pos: collate([encoded[i] for i in pos], pad_id), len(encoded),
                     per_sample_causal_lm_loss, micro_batch=micro_batch, rank=rank, world=world, device=device)


# ------------------------------------------------------------------ resumable state
def new_state(cfg: FinetuneConfig, n_train: int, n_val: int) -> dict:
    """The resumable training state kept in every epoch checkpoint (``state.json``)."""
    return {"fingerprint": cfg.fingerprint(), "epoch": 0, "history": [], "best_val_loss": None,
            "best_epoch": None, "bad_epochs": 0, "stopped_early": False, "stopped_by_time_budget": False,
            "n_train": n_train, "n_val": n_val}


def update_state(state: dict, cfg: FinetuneConfig, epoch_stats: dict, val_loss: float) -> bool:
    """Record an epoch; returns True when ``val_loss`` is the best so far (export the adapter).

    Early stopping: ``stopped_early`` turns on after ``cfg.patience`` epochs without a
    strictly lower validation loss. Without validation samples (nan) the last epoch is best.
    """
    state["epoch"] += 1
    rec = {"epoch": state["epoch"], **{k: epoch_stats[k] for k in ("train_loss", "steps", "samples", "seconds")},
           "val_loss": None if math.isnan(val_loss) else val_loss}
    state["history"].append(rec)
    if epoch_stats.get("stopped_by_time_budget"):
        state["stopped_by_time_budget"] = True
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


def _gather_objects(obj, world: int) -> list:
    d = _dist()
    if d is None or world == 1:
        return [obj]
    out = [None] * world
    d.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------ the loop
def train(backend, data: dict, cfg: FinetuneConfig, *, report: Callable[[dict, Path, str], None], rank: int = 0,
          world: int = 1, device="cpu", on_gpu: bool = False, wrap_model: Callable | None = None,
          restore: Path | None = None, log: Callable[[str], None] | None = None,
          on_epoch: Callable[[nn.Module, dict], dict] | None = None) -> dict:
    """Fine-tune ``backend``'s LoRA (or, for a ``full_finetune`` backend, its whole model) on
    ``data``: the local run, or one data-parallel rank.

    Every epoch: :func:`run_epoch`, the validation loss (mean ``backend.per_sample_loss`` over the
    validation samples), early stopping, the best adapter (or model:
    :func:`engine.finetune.adapter.export_trained`) so far, per-rank checksums of the trained
    weights, and a checkpoint (state, best adapter, optimiser) handed to ``report``. Determinism: the epoch's
    order is ``default_rng([seed, epoch])`` and the dropout RNG is reseeded at every epoch start
    from (seed, epoch, rank), so a run resumed from an epoch checkpoint continues exactly the curve
    of an uninterrupted one. An invocation that trains no epoch (``epochs=0``, or a finished run)
    still reports one checkpoint holding the current adapter.

    Args:
        backend: an :class:`engine.llm.protocol.LLMBackend` (its model is built here, on its device).
        data: ``train_history``, ``train_target``, ``val_history``, ``val_target`` (lists of item ids).
        cfg: the validated config.
        report: ``report(metrics, checkpoint_dir, name)``, called on every rank after each epoch with
            a folder that holds this rank's part of the checkpoint (gone after the call).
        rank, world: data-parallel position (``torch.distributed`` initialised when world > 1).
        device: where batches go (the backend's device).
        on_gpu: DeepSpeed on GPUs.
        wrap_model: DDP wrapper for ``strategy="ddp"`` (e.g. ``ray.train.torch.prepare_model``).
        restore: a checkpoint folder to resume from (as ``report`` got it).
        log: progress lines (rank 0).
        on_epoch: ``on_epoch(model, epoch_record) -> extra metrics`` after each epoch's validation
            loss (e.g. a ranking metric for Ray Tune); the extras join the epoch's record and the
            metrics handed to ``report``.

    Returns:
        The final state (``history`` with per-epoch losses, checksums, steps; ``best_epoch``, ...).

    Raises:
        ResumeError: ``restore`` was written by another config.
    """
    model = backend.build_model()
    hist, tgt = data["train_history"], data["train_target"]
    vh, vt = data["val_history"], data["val_target"]
    n = len(tgt)

    def make_train(pos):
        return backend.encode_train([hist[int(i)] for i in pos], [tgt[int(i)] for i in pos])

    def make_val(pos):
        return backend.encode_samples(list(pos), [vh[i] for i in pos], [vt[i] for i in pos])

    whole_batch = bool(getattr(backend, "in_batch_negatives", False))

    def loss_fn(module, batch):
        if whole_batch:  # the backend gathers the other ranks' part of the batch itself
            return backend.train_loss(module, batch, rank=rank, world=world)
        return backend.train_loss(module, batch)

    stepper = build_stepper(model, cfg, world=world, total_steps=steps_per_epoch(n, cfg, world) * cfg.epochs,
                            device=device, on_gpu=on_gpu, loss_fn=loss_fn, wrap_model=wrap_model,
                            bf16=getattr(backend, "train_bf16", None), full_model=full_finetune(backend))
    salt = getattr(backend, "dropout_seed_salt", "")
    state = new_state(cfg, n, len(vt))
    work = Path(tempfile.mkdtemp(prefix="dealrec-ft-"))
    best_dir = work / BEST_ADAPTER_DIR
    try:
        if restore is not None:
            prev = read_state(Path(restore))
            if prev["fingerprint"] != state["fingerprint"]:
                raise ResumeError(f"the checkpoint in {cfg.out} was written by another config; "
                                  "rerun with --overwrite or another --out")
            state = prev
            stepper.load(Path(restore))
            copy_tree(Path(restore) / BEST_ADAPTER_DIR, best_dir)
        ran = 0
        t_start = time.perf_counter()
        while state["epoch"] < cfg.epochs and not state["stopped_early"] and not state.get("stopped_by_time_budget"):
            if cfg.stop_after_epochs is not None and ran >= cfg.stop_after_epochs:
                break
            stats = run_epoch(stepper, make_train, n, cfg=cfg, epoch=state["epoch"], rank=rank, world=world,
                              salt=salt, t_start=t_start)
            val = mean_loss(stepper.model, make_val, len(vt), backend.per_sample_loss, micro_batch=cfg.micro,
                            rank=rank, world=world, device=device) if len(vt) else float("nan")
            if update_state(state, cfg, stats, val):
                export_trained(backend, stepper.model, best_dir, rank=rank, zero3=stepper.zero3)
            rec = state["history"][-1]
            if on_epoch is not None:
                rec["extra"] = {k: float(v) for k, v in on_epoch(stepper.model, dict(rec)).items()}
            rec["rank_checksums"] = _gather_objects(trained_checksum(backend, stepper.model, zero3=stepper.zero3),
                                                    world)
            rec["optimizer_steps"] = stepper.optimizer_steps
            ran += 1
            if log is not None and rank == 0:
                log(f"[finetune] epoch {rec['epoch']}: train loss {rec['train_loss']:.4f}, val loss "
                    f"{rec['val_loss']}, {rec['steps']} steps, {rec['seconds']:.1f}s")
            _checkpoint(state, stepper, best_dir, rank, report, f"epoch-{state['epoch']:04d}")
        if ran == 0:
            if not best_dir.exists():
                export_trained(backend, stepper.model, best_dir, rank=rank, zero3=stepper.zero3)
            state["final_checksums"] = _gather_objects(trained_checksum(backend, stepper.model, zero3=stepper.zero3),
                                                       world)
            _checkpoint(state, stepper, best_dir, rank, report, f"epoch-{state['epoch']:04d}-final")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return state


def _checkpoint(state: dict, stepper, best_dir: Path, rank: int, report, name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="dealrec-ckpt-") as tmp:
        tmp = Path(tmp)
        if rank == 0:
            write_state(tmp, state)
            copy_tree(best_dir, tmp / BEST_ADAPTER_DIR)
        stepper.save(tmp, rank=rank)
        rec = state["history"][-1] if state["history"] else {}
        val = rec.get("val_loss")
        report({"epoch": state["epoch"], "train_loss": rec.get("train_loss", float("nan")),
                "val_loss": float("nan") if val is None else val, **rec.get("extra", {})}, tmp, name)
