"""Few-shot LoRA fine-tune of the BIGRec LLM on a selected subset: Ray Train + DeepSpeed.

A ``TorchTrainer`` runs one worker loop per data-parallel rank: it loads the base LLM and
LoRA (engine.llm.bigrec.model), wraps it with ``deepspeed.initialize`` (ZeRO-2 by default; ZeRO-3 and
CPU offload selectable; bf16 + NCCL on GPU, fp32 + gloo on CPU) or, with
``--strategy ddp``, with ``ray.train.torch.prepare_model``, and trains on the selected
samples. Every epoch it reports a Ray Train checkpoint (LoRA + optimiser state, the
training state and the best adapter so far); a rerun with the same ``--out`` resumes
from the latest one. Early stopping on the validation loss (valid users: history ->
first valid target). Outputs in OUT: ``adapter/`` (best epoch, peft ``save_pretrained``
format), ``finetune.json`` (config, per-epoch losses, wall time, steps, samples/s,
per-rank LoRA checksums), ``ray_train/`` (Ray Train run and checkpoints).

On a cluster (the data folder and OUT must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/finetune.py --data /shared/games \\
        --selected /shared/runs/games/selected.parquet --out /shared/runs/games/ft \\
        --model /models/llama-7b --workers 4 --batch-size 128 --micro-batch 4 --epochs 50 \\
        --prompt games

Tiny local variant (CPU, tiny LLaMA built from the catalogue, 2 DeepSpeed workers)::

    python jobs/finetune.py --data /tmp/games --all --out /tmp/ft --workers 2 \\
        --batch-size 8 --micro-batch 2 --epochs 2 --prompt games

(``dealrec finetune ...`` takes the same arguments.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time

import numpy as np

from engine.config import collect_problems, raise_if, versions
from engine.data.schema import check_samples, read_id_column, read_items, read_sample_rows, read_split
from engine.errors import ConfigError, DataError, ResumeError
from engine.finetune import (
    BEST_ADAPTER_DIR,
    FinetuneConfig,
    copy_tree,
    samples_per_second,
)
from engine.llm.bigrec.model import resolve_base
from engine.rundir import atomic_write_bytes, output_errors, read_json
from engine.llm.bigrec.prompts import PROMPTS

CONFIG_FILE = "finetune_config.json"
REPORT_FILE = "finetune.json"
RAY_RUN_NAME = "ray_train"


# ---------------------------------------------------------------- argument parsing
def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """LLM options shared by finetune, evaluate and tune."""
    g = parser.add_argument_group("LLM")
    g.add_argument("--model", "--llm", default="tiny",
                   help="'tiny' (built from the catalogue), 'smollm2' (pretrained, offline), a local HF folder or Hub id")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=int, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    g.add_argument("--cache-dir", default=".cache/dealrec", help="cache of tiny bases and item embeddings")
    g.add_argument("--llm-seed", type=int, default=0, help="seed of the tiny base and LoRA init")
    g.add_argument("--prompt", default="generic", choices=sorted(PROMPTS), help="prompt wording preset")


def llm_config_from_args(args) -> dict:
    return {"model": args.model, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
            "lora_dropout": args.lora_dropout, "target_modules": list(args.target_modules),
            "cache_dir": str(Path(args.cache_dir).resolve()), "seed": args.llm_seed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec finetune`."""
    parser.add_argument("--data", required=True, help="prepared data folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--selected", help="RUN/selected.parquet of a prune run (column sample_id)")
    src.add_argument("--all", action="store_true", help="every sample (the full fine-tune baseline)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--strategy", default="deepspeed", choices=["deepspeed", "ddp"])
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="ZeRO CPU offload")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="one GPU per worker")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts after a worker or node loss, each from the last epoch "
                             "checkpoint (-1 = unlimited)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="effective batch = micro x accumulation x workers")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after-epochs", type=int, default=None,
                        help="end this invocation after N epochs; rerun to resume")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --out with another config")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    add_llm_arguments(parser)


def config_from_args(args) -> FinetuneConfig:
    """Build and validate the FinetuneConfig (every problem, paths included, in one error).

    Raises:
        ConfigError: listing every problem.
    """
    fields = dict(
        data=str(Path(args.data).resolve()), out=str(Path(args.out).resolve()),
        selected=str(Path(args.selected).resolve()) if args.selected else None, all_samples=bool(args.all),
        llm=llm_config_from_args(args), prompt=args.prompt, cutoff_len=args.cutoff_len,
        max_history=args.max_history, strategy=args.strategy, zero_stage=args.zero, offload=args.offload,
        workers=args.workers, use_gpu={"auto": None, "yes": True, "no": False}[args.gpu],
        workers_cpu=args.worker_cpus, max_failures=args.max_failures, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, epochs=args.epochs,
        batch_size=args.batch_size, micro_batch=args.micro_batch, patience=args.patience,
        val_samples=args.val_samples, seed=args.seed, stop_after_epochs=args.stop_after_epochs,
    )
    built, problems = collect_problems([("finetune", lambda: FinetuneConfig(**fields))])
    cfg = built.get("finetune")
    path_cfg = cfg if cfg is not None else _PathsOnly(fields)
    problems.extend(path_cfg.path_problems())
    raise_if(problems, config="finetune")
    return cfg


class _PathsOnly:
    """The path checks of FinetuneConfig on raw fields (when the config itself failed)."""

    def __init__(self, fields: dict):
        self.__dict__.update(fields)

    path_problems = FinetuneConfig.path_problems


# ---------------------------------------------------------------- data for the workers
def load_examples(cfg: FinetuneConfig) -> dict:
    """Read the training and validation examples of a run on the driver.

    Returns:
        ``{"titles", "train_history", "train_target", "train_ids", "val_history", "val_target"}``
        (plain lists, shipped to the workers through the object store).

    Raises:
        DataError: bad data (unreadable files, duplicate sample ids, unknown items) or a bad
            selected file (unreadable, missing column, unknown or duplicate sample ids).
    """
    items = read_items(cfg.data)
    titles = items.column("title").to_pylist()
    n = check_samples(cfg.data, n_items=len(titles))
    if cfg.selected is not None:
        ids = read_id_column(cfg.selected, "sample_id")
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise DataError(f"sample_id outside 0..{n - 1} of {cfg.data}", path=cfg.selected, field="sample_id",
                            value=int(bad[0]))
        if np.unique(ids).size != ids.size:
            raise DataError("duplicate sample ids", path=cfg.selected, field="sample_id",
                            value=int(ids[np.flatnonzero(np.diff(np.sort(ids)) == 0)[0]]))
        ids = np.sort(ids)
    else:
        ids = np.arange(n, dtype=np.int64)
    if ids.size == 0:
        raise DataError("no samples selected", path=cfg.selected, field="sample_id")
    sub = read_sample_rows(cfg.data, ids)  # only the selected rows, one samples file at a time
    valid = read_split(cfg.data, "valid")
    vh = valid.column("history").to_pylist()
    vt = valid.column("targets").to_pylist()
    keep = [i for i, t in enumerate(vt) if t]
    rng = np.random.default_rng(cfg.seed)
    if len(keep) > cfg.val_samples:
        keep = sorted(rng.choice(keep, size=cfg.val_samples, replace=False).tolist())
    return {
        "titles": titles,
        "train_ids": ids.tolist(),
        "train_history": sub.column("history").to_pylist(),
        "train_target": sub.column("target").to_pylist(),
        "val_history": [vh[i] for i in keep],
        "val_target": [vt[i][0] for i in keep],
    }


# ---------------------------------------------------------------- the per-worker loop
def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: build LLM + LoRA, DeepSpeed or DDP, train with epoch checkpoints."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from engine import finetune as ft
    from engine.llm.bigrec.model import load_llm

    cfg = FinetuneConfig.from_dict(config["cfg"])
    payload = ray.get(config["payload"])
    from jobs.worker import worker_setup

    rank, world, device, on_gpu = worker_setup(cfg.workers_cpu)
    llm_cfg = dataclasses.replace(cfg.llm, model=config["base"], device=str(device),
                                  dtype="bfloat16" if on_gpu else "float32")
    model, tok = load_llm(llm_cfg, trainable=True)
    prompt_cfg = cfg.prompt_config()
    titles = payload["titles"]
    train_enc = ft.encode_examples(tok, payload["train_history"], payload["train_target"], titles, prompt_cfg,
                                   max_history=cfg.max_history)
    val_enc = ft.encode_examples(tok, payload["val_history"], payload["val_target"], titles, prompt_cfg,
                                 max_history=cfg.max_history)
    total_steps = ft.steps_per_epoch(len(train_enc), cfg, world) * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    zero3 = cfg.strategy == "deepspeed" and cfg.zero_stage == 3
    if cfg.strategy == "deepspeed":
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=params,
            config=ft.deepspeed_config(cfg, world_size=world, on_gpu=on_gpu),
            lr_scheduler=lambda opt: ft.make_scheduler(opt, cfg, total_steps),
        )
        stepper = ft.DeepSpeedStepper(engine)
    else:
        wrapped = ray.train.torch.prepare_model(model, move_to_device=False)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        stepper = ft.TorchStepper(wrapped, opt, ft.make_scheduler(opt, cfg, total_steps),
                                  accumulation=cfg.batch_size // (cfg.micro_batch * world),
                                  max_grad_norm=cfg.max_grad_norm, device=device)

    state = ft.new_state(cfg, len(train_enc), len(val_enc))
    work = Path(tempfile.mkdtemp(prefix="dealrec-ft-"))
    best_dir = work / BEST_ADAPTER_DIR
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            prev = ft.read_state(Path(d))
            if prev["fingerprint"] != state["fingerprint"]:
                raise ResumeError(f"the checkpoint in {cfg.out} was written by another config; "
                                  "rerun with --overwrite or another --out")
            state = prev
            stepper.load(Path(d))
            copy_tree(Path(d) / BEST_ADAPTER_DIR, best_dir)
    pad_id = tok.pad_token_id
    ran = 0
    while state["epoch"] < cfg.epochs and not state["stopped_early"]:
        if cfg.stop_after_epochs is not None and ran >= cfg.stop_after_epochs:
            break
        stats = ft.train_epoch(stepper, train_enc, cfg=cfg, epoch=state["epoch"], rank=rank, world=world,
                               pad_id=pad_id)
        val = ft.validation_loss(stepper.model, val_enc, micro_batch=cfg.micro_batch, rank=rank, world=world,
                                 pad_id=pad_id, device=device)
        improved = ft.update_state(state, cfg, stats, val)
        if improved:
            ft.export_adapter(stepper.model, best_dir, rank=rank, zero3=zero3)
        check = ft.lora_checksum(stepper.model, zero3=zero3)
        sums = [check]
        if world > 1:
            import torch.distributed as dist

            sums = [None] * world
            dist.all_gather_object(sums, check)
        rec = state["history"][-1]
        rec["rank_checksums"] = sums
        rec["optimizer_steps"] = stepper.optimizer_steps
        ran += 1
        with tempfile.TemporaryDirectory(prefix="dealrec-ckpt-") as tmp:
            tmp = Path(tmp)
            if rank == 0:
                ft.write_state(tmp, state)
                copy_tree(best_dir, tmp / BEST_ADAPTER_DIR)
            stepper.save(tmp, rank=rank)
            has_files = any(tmp.iterdir())
            metrics = {"epoch": state["epoch"], "train_loss": rec["train_loss"],
                       "val_loss": rec["val_loss"] if rec["val_loss"] is not None else float("nan")}
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)) if has_files else None,
                             checkpoint_dir_name=f"epoch-{state['epoch']:04d}")
    shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- driver
def _cluster_has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def check_resume(cfg: FinetuneConfig, *, overwrite: bool = False) -> bool:
    """Whether ``cfg.out`` holds a run of another config that ``overwrite`` will discard;
    changes nothing.

    Raises:
        ResumeError: it does and ``overwrite`` is false.
        DataError: its finetune_config.json is unreadable.
    """
    cfg_file = Path(cfg.out) / CONFIG_FILE
    if not cfg_file.exists():
        return False
    prev = read_json(cfg_file, hint="; delete it to start this fine-tune afresh, or use another --out")
    if prev.get("fingerprint") == cfg.fingerprint():
        return False
    if not overwrite:
        raise ResumeError(f"{cfg.out} holds a fine-tune with another config (see {cfg_file}); "
                          "rerun with --overwrite or use another --out")
    return True


def fit(cfg: FinetuneConfig, *, overwrite: bool = False, payload: dict | None = None) -> dict:
    """Run (or resume) the fine-tune described by ``cfg``; Ray must be initialised.

    Every input is read and checked before anything is written: the run's config
    (``finetune_config.json``) is committed to ``cfg.out`` only once the data and selection
    are known good, so a failed start never blocks a corrected rerun into the same folder.

    Args:
        cfg: validated config.
        overwrite: discard a previous run in ``cfg.out`` made with another config.
        payload: what :func:`load_examples` returned for ``cfg`` (read here when None).

    Returns:
        The report written to ``OUT/finetune.json``.

    Raises:
        ResumeError: ``cfg.out`` holds a run of another config and ``overwrite`` is false.
        DataError: bad input data.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(cfg.out)
    discard = check_resume(cfg, overwrite=overwrite)
    t0 = time.perf_counter()
    if payload is None:
        payload = load_examples(cfg)
    base = resolve_base(cfg.llm, payload["titles"])
    if Path(base).exists():
        base = str(Path(base).resolve())
    # inputs good: only now is the run's config committed (and a run of another config discarded)
    with output_errors(out, option="--out"):
        out.mkdir(parents=True, exist_ok=True)
        if discard:
            for p in (out / RAY_RUN_NAME, out / "adapter", out / REPORT_FILE):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    atomic_write_bytes(out / CONFIG_FILE, json.dumps({"fingerprint": cfg.fingerprint(), "config": cfg.to_dict()},
                                                      indent=2).encode(), option="--out")
    use_gpu = _cluster_has_gpus(ray) if cfg.use_gpu is None else bool(cfg.use_gpu)
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "payload": ray.put(payload), "base": base},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cfg.workers_cpu}),
        run_config=ray.train.RunConfig(
            name=RAY_RUN_NAME, storage_path=str(out),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    wall = time.perf_counter() - t0
    ckpt = result.checkpoint
    if ckpt is None:
        raise ResumeError(f"the Ray Train run in {out / RAY_RUN_NAME} reported no checkpoint")
    with ckpt.as_directory() as d:
        from engine.finetune import read_state

        state = read_state(Path(d))
        adapter_src = Path(d) / BEST_ADAPTER_DIR
        tmp = out / f".adapter.tmp-{os.getpid()}"
        try:
            with output_errors(out, option="--out"):
                copy_tree(adapter_src, tmp)
                if tmp.exists():
                    shutil.rmtree(out / "adapter", ignore_errors=True)
                    os.replace(tmp, out / "adapter")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    hist = state["history"]
    report = {
        "config": cfg.to_dict(),
        "base_model": base,
        "use_gpu": use_gpu,
        "n_train": state["n_train"],
        "n_val": state["n_val"],
        "epochs_done": state["epoch"],
        "finished": state["epoch"] >= cfg.epochs or state["stopped_early"],
        "stopped_early": state["stopped_early"],
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"],
        "history": hist,
        "train_losses": [h["train_loss"] for h in hist],
        "val_losses": [h["val_loss"] for h in hist],
        "optimizer_steps": hist[-1]["optimizer_steps"] if hist else 0,
        "train_seconds": sum(h["seconds"] for h in hist),
        "samples_per_s": samples_per_second(hist),
        "seconds_per_step": (sum(h["seconds"] for h in hist) / max(1, sum(h["steps"] for h in hist))),
        "wall_s_this_invocation": wall,
        "checkpoint": ckpt.path,
        "versions": versions(),
    }
    atomic_write_bytes(out / REPORT_FILE, json.dumps(report, indent=2, default=str).encode(), option="--out")
    return report


def run(args) -> int:
    """Entry point of `dealrec finetune` / `python jobs/finetune.py`.

    Returns:
        0 on success.

    Raises:
        ConfigError, DataError, ResumeError: reported by the CLI as one message.
    """
    cfg = config_from_args(args)
    # bad data, a bad --selected or a run of another config fail here, before Ray starts
    check_resume(cfg, overwrite=args.overwrite)
    payload = load_examples(cfg)
    import ray

    if not ray.is_initialized():
        ray.init(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    rep = fit(cfg, overwrite=args.overwrite, payload=payload)
    print(f"fine-tune: {rep['epochs_done']} epoch(s), {rep['optimizer_steps']} optimiser steps, "
          f"{rep['samples_per_s']:.1f} samples/s, best epoch {rep['best_epoch']} "
          f"(val loss {rep['best_val_loss']}), wall {rep['wall_s_this_invocation']:.1f}s")
    for h in rep["history"]:
        print(f"  epoch {h['epoch']:>3}  train {h['train_loss']:.4f}  val {h['val_loss']}  {h['seconds']:.1f}s")
    print(f"adapter: {Path(cfg.out) / 'adapter'}  report: {Path(cfg.out) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
