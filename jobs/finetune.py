"""Few-shot fine-tune of an LLM backend on a selected subset: in process, DDP or DeepSpeed.

ONE loop (:func:`engine.finetune.train`) over the backend protocol, for every backend
(``--backend bigrec``: LoRA on a causal LM, BIGRec's prompt and token-mean loss; ``--backend
textrec``: the MiniLM text encoder + LoRA, in-batch softmax with the item embeddings of every rank
gathered; ``--backend tiger``: every parameter of a T5 over the semantic IDs of
``--semantic-ids``, from a seeded init or ``--tiger-checkpoint``, model options ``--tiger-config``)
and every strategy: ``--strategy local`` runs it in this process without Ray (fastest on
a few cores); ``ddp`` and ``deepspeed`` run it as the per-worker function of a Ray Train
``TorchTrainer`` (DDP through ``ray.train.torch.prepare_model``; DeepSpeed ZeRO-2 by default,
ZeRO-3 and CPU offload selectable; bf16 + NCCL on GPU, fp32 + gloo on CPU). Local, DDP and
DeepSpeed runs of one config train the same adapter up to float rounding (with dropout 0).

Every epoch writes a checkpoint (LoRA + optimiser state, the training state and the best adapter
so far: Ray Train's in OUT/ray_train, the local run's in OUT/checkpoints); a rerun with the same
``--out`` resumes from the latest one, a finished run is not trained again, and a run of another
config is refused unless ``--overwrite``. Early stopping on the validation loss (valid users:
history -> first valid target; the backend's batch-independent per-sample loss).

Outputs in OUT: ``adapter/`` (best epoch, peft ``save_pretrained`` format; for a backend that
trains every parameter, tiger, ``model/`` instead: the whole model in the backend's
``save_model`` format, which ``--tiger-checkpoint`` and ``dealrec evaluate --adapter`` read),
``finetune.json`` (config, backend, per-epoch losses, wall time, steps, samples/s, per-rank
checksums of the trained weights),
``finetune_config.json`` (config + backend, read by ``dealrec evaluate``), ``manifest.json`` (the run
folder's stages ``train`` / ``evaluate`` with their config hashes: engine.rundir.RunDir), and with ``--split valid|test`` ``metrics.json`` +
``per_user.npz`` (Recall/NDCG@K of the adapter through the generic evaluator over
``backend.rank_items``; re-evaluated, never retrained, when only the evaluation options change).

On a cluster (the data folder and OUT must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/finetune.py --data /shared/games \\
        --selected /shared/runs/games/selected.parquet --out /shared/runs/games/ft \\
        --model /models/llama-7b --workers 4 --batch-size 128 --micro-batch 4 --epochs 50 \\
        --prompt games
    ray job submit --working-dir . -- python jobs/finetune.py --backend textrec --data /shared/games \\
        --selected /shared/runs/games/selected.parquet --out /shared/runs/games/textrec \\
        --strategy deepspeed --workers 4 --batch-size 32 --split test

Tiny local variants (CPU; tiny LLaMA built from the catalogue; MiniLM from its wheel)::

    python jobs/finetune.py --data /tmp/games --all --out /tmp/ft --strategy local \\
        --batch-size 8 --micro-batch 2 --epochs 2 --prompt games
    python jobs/finetune.py --data /tmp/games --all --out /tmp/ft-ds --workers 2 \\
        --batch-size 8 --micro-batch 2 --epochs 2 --prompt games
    python jobs/finetune.py --backend textrec --data /tmp/demo-data --all --out /tmp/textrec \\
        --strategy local --batch-size 8 --epochs 1 --split test --max-eval-users 50
    python jobs/semantic_ids.py --data /tmp/demo-data --out /tmp/demo-data/sid --levels 2 --codes 8
    python jobs/finetune.py --backend tiger --semantic-ids /tmp/demo-data/sid --data /tmp/demo-data --all \\
        --out /tmp/tiger --strategy ddp --workers 2 --epochs 2 --split test \\
        --tiger-config '{"d_model": 64, "d_ff": 256, "num_layers": 2, "num_decoder_layers": 2}'

(``dealrec finetune ...`` takes the same arguments.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from engine.config import collect_problems, raise_if, stable_hash, versions
from engine.data.schema import check_samples, read_id_column, read_items, read_sample_rows, read_split
from engine.errors import ConfigError, DataError, ResumeError
from engine.finetune import BEST_ADAPTER_DIR, FinetuneConfig, copy_tree, read_state, samples_per_second
from engine.llm.bigrec.prompts import PROMPTS
from engine.metrics import DEFAULT_KS
from engine.rundir import RunDir, atomic_write_bytes, output_errors
from jobs.backend_args import add_backend_arguments, backend_record, tiger_config_fields

__all__ = ["add_arguments", "config_from_args", "fit", "run", "load_examples", "evaluate_adapter",
           "evaluate_splits", "read_per_user", "check_resume", "trained_dir", "trained_dir_name", "BACKEND_DEFAULTS"]

CONFIG_FILE = "finetune_config.json"
REPORT_FILE = "finetune.json"
METRICS_FILE = "metrics.json"
PER_USER_FILE = "per_user.npz"
ADAPTER_DIR = "adapter"
#: what a full fine-tune (a ``full_finetune`` backend: tiger) exports instead of adapter/: the whole model
MODEL_DIR = "model"
RAY_RUN_NAME = "ray_train"
LOCAL_CKPT_DIR = "checkpoints"
#: per backend, the training options a command line leaves unset (BIGRec's paper settings; the
#: text encoder's sizing run of issue #8: constant lr 1e-3, batch 32, whole-batch steps)
BACKEND_DEFAULTS = {
    "bigrec": {"lr": 1e-4, "lr_schedule": "linear", "warmup_steps": 20, "max_grad_norm": 1.0, "batch_size": 16,
               "micro_batch": 4, "max_history": 10, "prompt": "generic", "target_modules": ["q_proj", "v_proj"]},
    "textrec": {"lr": 1e-3, "lr_schedule": "constant", "warmup_steps": 0, "max_grad_norm": 0.0, "batch_size": 32,
                "micro_batch": None, "max_history": None, "prompt": "games", "target_modules": ["query", "value"]},
    # TIGER: every parameter of a small T5 trains; AdamW 1e-3 with a short warm-up, whole per-rank
    # slices (no accumulation needed), the backend keeps its own max_items most recent items
    "tiger": {"lr": 1e-3, "lr_schedule": "linear", "warmup_steps": 10, "max_grad_norm": 1.0, "batch_size": 32,
              "micro_batch": None, "max_history": None, "prompt": "generic", "target_modules": ["q_proj", "v_proj"]},
}


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
            "lora_dropout": args.lora_dropout,
            "target_modules": list(args.target_modules or BACKEND_DEFAULTS["bigrec"]["target_modules"]),
            "cache_dir": str(Path(args.cache_dir).resolve()), "seed": args.llm_seed}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec finetune` (training options left unset take the backend's defaults)."""
    parser.add_argument("--data", required=True, help="prepared data folder")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--selected", help="RUN/selected.parquet of a prune run (column sample_id)")
    src.add_argument("--all", action="store_true", help="every sample (the full fine-tune baseline)")
    parser.add_argument("--out", required=True, help="output folder")
    add_backend_arguments(parser)
    parser.add_argument("--strategy", default="deepspeed", choices=["local", "ddp", "deepspeed"],
                        help="local: in this process, no Ray; ddp / deepspeed: Ray Train workers")
    parser.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    parser.add_argument("--offload", action="store_true", help="ZeRO CPU offload")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="one GPU per worker")
    parser.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--max-failures", type=int, default=3,
                        help="worker-group restarts after a worker or node loss, each from the last epoch "
                             "checkpoint (-1 = unlimited)")
    parser.add_argument("--lr", type=float, default=None, help="bigrec 1e-4, textrec 1e-3, tiger 1e-3")
    parser.add_argument("--lr-schedule", choices=["linear", "constant"], default=None,
                        help="bigrec and tiger linear (warm-up + decay), textrec constant")
    parser.add_argument("--warmup-steps", type=int, default=None, help="bigrec 20, textrec 0, tiger 10")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="bigrec 1.0, textrec 0 (none), tiger 1.0")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="effective batch = micro x accumulation x workers (bigrec 16, textrec and tiger 32)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="bigrec 4; textrec (in-batch negatives) and tiger take the whole per-rank slice")
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=None, help="newest history items kept (bigrec 10, textrec all)")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--val-samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after-epochs", type=int, default=None,
                        help="end this invocation after N epochs; rerun to resume")
    parser.add_argument("--time-budget-s", type=float, default=None, help="stop training after this wall time")
    parser.add_argument("--split", default="none", choices=["none", "valid", "test"],
                        help="evaluate the adapter after training (engine.evaluate.evaluate_backend)")
    parser.add_argument("--max-eval-users", type=int, default=None, help="seeded subset of users (default all)")
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process (local strategy)")
    parser.add_argument("--overwrite", action="store_true", help="discard a previous run in --out with another config")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    add_llm_arguments(parser)
    parser.set_defaults(prompt=None, target_modules=None)  # per backend (BACKEND_DEFAULTS)


def config_from_args(args) -> FinetuneConfig:
    """Build and validate the FinetuneConfig (every problem, paths included, in one error).

    Raises:
        ConfigError: listing every problem.
    """
    d = BACKEND_DEFAULTS.get(args.backend, BACKEND_DEFAULTS["bigrec"])

    def pick(name):
        v = getattr(args, name, None)
        return d[name] if v is None else v

    textrec = None
    if args.backend == "textrec":
        textrec = {"prompt": pick("prompt"), "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                   "lora_dropout": args.lora_dropout, "target_modules": list(pick("target_modules")),
                   "seed": args.seed, "lr": pick("lr"), "epochs": args.epochs, "batch_size": pick("batch_size"),
                   "weight_decay": args.weight_decay}
        if args.textrec_model is not None:
            textrec["model"] = str(Path(args.textrec_model).resolve())
    tiger, semantic_ids = None, None
    tiger_fields, tiger_problems = tiger_config_fields(args)
    if args.backend == "tiger":  # validated by FinetuneConfig (fields, the semantic ids against the data)
        tiger = {"seed": args.seed, "device": "auto", **tiger_fields}
        semantic_ids = str(Path(args.semantic_ids).resolve()) if args.semantic_ids is not None else None
    llm = llm_config_from_args(argparse.Namespace(**{**vars(args), "target_modules": pick("target_modules")}))
    fields = dict(
        data=str(Path(args.data).resolve()), out=str(Path(args.out).resolve()),
        selected=str(Path(args.selected).resolve()) if args.selected else None, all_samples=bool(args.all),
        backend=args.backend, llm=llm, prompt=pick("prompt") if args.backend == "bigrec" else "generic",
        cutoff_len=args.cutoff_len, max_history=pick("max_history"), textrec=textrec, tiger=tiger,
        semantic_ids=semantic_ids, strategy=args.strategy,
        zero_stage=args.zero, offload=args.offload, workers=args.workers,
        use_gpu={"auto": None, "yes": True, "no": False}[args.gpu], workers_cpu=args.worker_cpus,
        max_failures=args.max_failures, lr=pick("lr"), lr_schedule=pick("lr_schedule"),
        warmup_steps=pick("warmup_steps"), weight_decay=args.weight_decay, max_grad_norm=pick("max_grad_norm"),
        epochs=args.epochs, batch_size=pick("batch_size"), micro_batch=pick("micro_batch"), patience=args.patience,
        val_samples=args.val_samples, seed=args.seed, stop_after_epochs=args.stop_after_epochs,
        time_budget_s=args.time_budget_s, split=args.split, max_eval_users=args.max_eval_users,
        eval_seed=args.eval_seed, ks=tuple(args.ks), threads=args.threads,
    )
    built, problems = collect_problems([("finetune", lambda: FinetuneConfig(**fields))])
    problems.extend(tiger_problems)
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
def load_examples(cfg: FinetuneConfig, *, checked: tuple[list[str], int] | None = None) -> dict:
    """Read the training and validation examples of a run on the driver.

    Histories are cut to the newest ``cfg.max_history`` items here, once for every backend.
    ``checked``: ``(titles, n_samples)`` of ``cfg.data`` already read and checked by the caller
    (``dealrec tune``'s driver), so that each trial neither re-reads the catalogue nor re-scans
    every samples file.

    Returns:
        ``{"titles", "train_history", "train_target", "train_ids", "val_history", "val_target"}``
        (plain lists, shipped to the workers through the object store).

    Raises:
        DataError: bad data (unreadable files, duplicate sample ids, unknown items) or a bad
            selected file / sample id list (unreadable, missing column, unknown or duplicate ids).
    """
    if checked is None:
        titles = read_items(cfg.data).column("title").to_pylist()
        n = check_samples(cfg.data, n_items=len(titles))
    else:
        titles, n = checked
    if cfg.all_samples:
        ids = np.arange(n, dtype=np.int64)
    else:
        src = cfg.selected if cfg.selected is not None else "sample_ids"
        ids = read_id_column(cfg.selected, "sample_id") if cfg.selected is not None else \
            np.asarray(cfg.sample_ids, dtype=np.int64)
        bad = ids[(ids < 0) | (ids >= n)]
        if bad.size:
            raise DataError(f"sample_id outside 0..{n - 1} of {cfg.data}", path=src, field="sample_id",
                            value=int(bad[0]))
        if np.unique(ids).size != ids.size:
            raise DataError("duplicate sample ids", path=src, field="sample_id",
                            value=int(ids[np.flatnonzero(np.diff(np.sort(ids)) == 0)[0]]))
        ids = np.sort(ids)
    if ids.size == 0:
        raise DataError("no samples selected", path=cfg.selected, field="sample_id")
    sub = read_sample_rows(cfg.data, ids)  # only the selected rows, one samples file at a time
    keep_hist = (lambda h: list(h)) if cfg.max_history is None else \
        (lambda h: list(h)[-cfg.max_history:] if cfg.max_history > 0 else [])
    keep: list[int] = []
    vh: list = []
    vt: list = []
    if cfg.val_samples > 0:
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
        "train_history": [keep_hist(h) for h in sub.column("history").to_pylist()],
        "train_target": sub.column("target").to_pylist(),
        "val_history": [keep_hist(vh[i]) for i in keep],
        "val_target": [vt[i][0] for i in keep],
    }


def _base_model(cfg: FinetuneConfig, titles: Sequence[str]) -> str | None:
    """BIGRec's resolved base (built once on the driver for ``tiny``); None for other backends."""
    if cfg.backend != "bigrec":
        return None
    from engine.llm.bigrec.model import resolve_base

    base = resolve_base(cfg.llm, titles)
    return str(Path(base).resolve()) if Path(base).exists() else base


# ---------------------------------------------------------------- the per-worker loop
def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the backend's model on this rank's device, :func:`engine.finetune.train`."""
    import ray
    import ray.train
    import ray.train.torch

    from engine import finetune as ft
    from engine.llm import get_backend
    from jobs.worker import worker_setup

    cfg = FinetuneConfig.from_dict(config["cfg"])
    payload = ray.get(config["payload"])
    rank, world, device, on_gpu = worker_setup(cfg.workers_cpu)
    backend = get_backend(cfg.backend, payload["titles"],
                          **cfg.backend_options(base=config["base"], device=device, on_gpu=on_gpu))

    def report(metrics: dict, ckpt_dir: Path, name: str) -> None:
        has_files = any(Path(ckpt_dir).iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)) if has_files else None,
                         checkpoint_dir_name=name)

    restore = None
    ckpt = ray.train.get_checkpoint()
    work = Path(tempfile.mkdtemp(prefix="dealrec-restore-"))
    try:
        if ckpt is not None:
            restore = Path(ckpt.to_directory(str(work / "ckpt")))
        ft.train(backend, payload, cfg, report=report, rank=rank, world=world, device=device, on_gpu=on_gpu,
                 wrap_model=lambda m: ray.train.torch.prepare_model(m, move_to_device=False), restore=restore,
                 log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _train_ray(cfg: FinetuneConfig, payload: dict, base: str | None, finish) -> dict:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.ray_init import init_ray

    init_ray(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}})
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0 if cfg.use_gpu is None else bool(cfg.use_gpu)
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    out = Path(cfg.out)
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
    if result.checkpoint is None:
        raise ResumeError(f"the Ray Train run in {out / RAY_RUN_NAME} reported no checkpoint")
    with result.checkpoint.as_directory() as d:
        return finish(Path(d), use_gpu, result.checkpoint.path)


def _train_local(cfg: FinetuneConfig, payload: dict, base: str | None, finish, log) -> dict:
    """The same loop in this process (no Ray, no process group); checkpoints in OUT/checkpoints."""
    import torch

    from engine import finetune as ft
    from engine.llm import get_backend

    use_gpu = torch.cuda.is_available() if cfg.use_gpu is None else bool(cfg.use_gpu)
    if use_gpu and not torch.cuda.is_available():
        raise ConfigError(["use_gpu=True: this machine has no CUDA device; use --gpu no"], config="finetune")
    device = "cuda" if use_gpu else "cpu"
    root = Path(cfg.out) / LOCAL_CKPT_DIR

    def epochs_done() -> list[Path]:
        return sorted(p for p in root.glob("epoch-*") if p.is_dir()) if root.is_dir() else []

    def report(metrics: dict, ckpt_dir: Path, name: str) -> None:
        with output_errors(root, option="--out"):
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ckpt_dir, tmp)
            shutil.rmtree(root / name, ignore_errors=True)
            os.replace(tmp, root / name)
            for old in epochs_done()[:-2]:  # as Ray Train's num_to_keep=2
                shutil.rmtree(old, ignore_errors=True)

    done = epochs_done()
    backend = get_backend(cfg.backend, payload["titles"],
                          **cfg.backend_options(base=base, device=device, on_gpu=use_gpu))
    ft.train(backend, payload, cfg, report=report, device=device, on_gpu=use_gpu,
             restore=done[-1] if done else None, log=log)
    last = epochs_done()[-1]
    return finish(last, use_gpu, str(last))


# ---------------------------------------------------------------- driver
def trained_dir_name(backend: str) -> str:
    """The folder in OUT of what a fine-tune of ``backend`` trained: ``adapter`` (the LoRA
    adapter, peft format), or ``model`` for a backend that trains every parameter (its class
    attribute ``full_finetune``: tiger, the backend's ``save_model`` format)."""
    from engine.llm import backend_class

    return MODEL_DIR if getattr(backend_class(backend), "full_finetune", False) else ADAPTER_DIR


def trained_dir(cfg: FinetuneConfig) -> Path:
    """``OUT/adapter`` or ``OUT/model`` of this run (:func:`trained_dir_name`)."""
    return Path(cfg.out) / trained_dir_name(cfg.backend)


#: the outputs of each stage of a fine-tune run folder (deleted when the stage is redone)
STAGE_OUTPUTS = {"train": [RAY_RUN_NAME, LOCAL_CKPT_DIR, ADAPTER_DIR, MODEL_DIR, REPORT_FILE, CONFIG_FILE],
                 "evaluate": [METRICS_FILE, PER_USER_FILE]}


def run_dir(cfg: FinetuneConfig) -> RunDir:
    """The run folder ``cfg.out`` (its manifest.json; nothing is created until a stage starts)."""
    return RunDir(cfg.out, STAGE_OUTPUTS, create=False)


def stage_hashes(cfg: FinetuneConfig) -> dict[str, str]:
    """Config hash per stage: ``train`` (the fine-tune's fingerprint) and, with a split, ``evaluate``
    (the training's hash + the evaluation options, so a retrained adapter is evaluated again)."""
    h = {"train": cfg.fingerprint()}
    if cfg.split != "none":
        h["evaluate"] = stable_hash({"train": h["train"], "evaluate": cfg.eval_fingerprint()})
    return h


def check_resume(cfg: FinetuneConfig, *, overwrite: bool = False) -> bool:
    """Whether ``cfg.out`` holds a training of another config that ``overwrite`` will discard;
    changes nothing. Changed evaluation options alone are not refused: the adapter is evaluated again.

    Raises:
        ResumeError: it does and ``overwrite`` is false.
        DataError: its manifest.json is unreadable.
    """
    return "train" in run_dir(cfg).plan(stage_hashes(cfg), overwrite=overwrite, recompute=("evaluate",))


def _finished_report(cfg: FinetuneConfig) -> dict | None:
    """The report of a finished training of this config in ``cfg.out`` (None: train)."""
    rd = run_dir(cfg)
    st = rd.manifest["stages"].get("train", {})
    if not (rd.done("train") and st.get("config_hash") == cfg.fingerprint() and trained_dir(cfg).is_dir()):
        return None
    try:
        rep = json.loads(rd.path(REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rep if rep.get("finished") else None


def _json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode(), option="--out")


def fit(cfg: FinetuneConfig, *, overwrite: bool = False, payload: dict | None = None, log=print) -> dict:
    """Run (or resume) the fine-tune described by ``cfg``, then its evaluation (``cfg.split``).

    Every input is read and checked before anything is written: the run's config
    (``finetune_config.json``) is committed to ``cfg.out`` only once the data and selection
    are known good, so a failed start never blocks a corrected rerun into the same folder. A
    finished run of the same config is not trained again; an evaluation of the same adapter
    and evaluation options is not repeated. ``ddp``/``deepspeed`` start Ray when it is not running.

    Args:
        cfg: validated config.
        overwrite: discard a previous run in ``cfg.out`` made with another config.
        payload: what :func:`load_examples` returned for ``cfg`` (read here when None).
        log: progress lines (None: quiet).

    Returns:
        The report written to ``OUT/finetune.json``, plus ``metrics`` (``metrics.json``, None for
        split none), ``trained`` and ``evaluated`` (False: reused).

    Raises:
        ConfigError: bad paths.
        ResumeError: ``cfg.out`` holds a run of another config and ``overwrite`` is false.
        DataError: bad input data.
    """
    log = log or (lambda *_: None)
    raise_if(cfg.path_problems(), config="finetune")
    hashes = stage_hashes(cfg)
    discard = check_resume(cfg, overwrite=overwrite)
    report = None if discard else _finished_report(cfg)
    trained = report is None
    if trained:
        t0 = time.perf_counter()
        if payload is None:
            payload = load_examples(cfg)
        base = _base_model(cfg, payload["titles"])
        # inputs good: only now is the run's config committed (and a run of another config discarded)
        rd = run_dir(cfg)
        with output_errors(cfg.out, option="--out"):
            rd.check(hashes, overwrite=overwrite, recompute=("evaluate",))
            _drop_evaluations(rd)  # this branch trains: metrics beside the folder are of an earlier model
            rd.set(backend=backend_record(cfg.backend, cfg.backend_options()))  # the run folder names its backend
        _write_config(cfg)
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        log(f"[finetune] {cfg.backend}: {len(payload['train_ids'])} samples, {cfg.epochs} epoch(s), batch "
            f"{cfg.batch_size} = {cfg.micro} x {cfg.accumulation} x {cfg.world}, strategy {cfg.strategy}")

        def finish(ckpt_dir: Path, use_gpu: bool, where: str) -> dict:
            return _finish(cfg, ckpt_dir, use_gpu=use_gpu, where=where, base=base, wall=time.perf_counter() - t0)

        report = _train_local(cfg, payload, base, finish, log) if cfg.strategy == "local" else \
            _train_ray(cfg, payload, base, finish)
        if report["finished"]:  # an invocation cut short (--max-epochs-this-invocation) resumes on rerun
            rd.finish("train", report["wall_s"], epochs_done=report["epochs_done"], backend=cfg.backend,
                      trained=trained_dir_name(cfg.backend))
    else:
        rd = run_dir(cfg)
        rd.check(hashes, overwrite=overwrite, recompute=("evaluate",))
        rd.set(backend=backend_record(cfg.backend, cfg.backend_options()))
        _write_config(cfg)  # the same training; the evaluation options of this call
    metrics, evaluated = _evaluate_run(cfg)
    return {**report, "metrics": metrics, "trained": trained, "evaluated": evaluated}


def _drop_evaluations(rd: RunDir) -> None:
    """Forget what ``dealrec evaluate`` recorded in this folder (stages ``evaluate:<file>``, see
    jobs/evaluate.py ``eval_run``) and delete those metrics files: a training that runs (a first
    run, a resumed one, one redone with ``--overwrite``, or one whose exported model is gone)
    makes another model, so metrics of an earlier one must neither be read as this model's nor
    block its evaluation."""
    from jobs.evaluate import eval_run

    stale = [s for s in rd.manifest["stages"] if s.startswith("evaluate:")]
    for stage in stale:
        erd, _ = eval_run(rd.root / stage.split(":", 1)[1])
        erd.reset(stage)
        del rd.manifest["stages"][stage]
    if stale:
        rd.save()


def _write_config(cfg: FinetuneConfig) -> None:
    _json(Path(cfg.out) / CONFIG_FILE, {"fingerprint": cfg.fingerprint(), "config": cfg.to_dict(),
                                        "backend": backend_record(cfg.backend, cfg.backend_options())})


def _finish(cfg: FinetuneConfig, ckpt_dir: Path, *, use_gpu: bool, where: str, base: str | None,
            wall: float) -> dict:
    """Copy the final checkpoint's best adapter (or model: :func:`trained_dir`) to OUT/adapter
    (OUT/model) and write OUT/finetune.json."""
    out = Path(cfg.out)
    state = read_state(ckpt_dir)
    name = trained_dir_name(cfg.backend)
    tmp = out / f".{name}.tmp-{os.getpid()}"
    try:
        with output_errors(out, option="--out"):
            copy_tree(ckpt_dir / BEST_ADAPTER_DIR, tmp)
            if tmp.exists():
                shutil.rmtree(out / name, ignore_errors=True)
                os.replace(tmp, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hist = state["history"]
    secs = sum(h["seconds"] for h in hist)
    steps = hist[-1]["optimizer_steps"] if hist else 0
    report = {
        "fingerprint": cfg.fingerprint(),
        "config": cfg.to_dict(),
        "backend": backend_record(cfg.backend, cfg.backend_options()),
        "base_model": base,
        "strategy": cfg.strategy,
        "world": cfg.world,
        "use_gpu": use_gpu,
        "n_train": state["n_train"],
        "n_val": state["n_val"],
        "epochs_done": state["epoch"],
        "finished": bool(state["epoch"] >= cfg.epochs or state["stopped_early"] or state.get("stopped_by_time_budget")),
        "stopped_early": state["stopped_early"],
        "stopped_by_time_budget": bool(state.get("stopped_by_time_budget")),
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"],
        "history": hist,
        "train_losses": [h["train_loss"] for h in hist],
        "val_losses": [h["val_loss"] for h in hist],
        "optimizer_steps": steps,
        "rank_checksums": hist[-1]["rank_checksums"] if hist else state.get("final_checksums"),
        "train_seconds": secs,
        "samples_per_s": samples_per_second(hist),
        "seconds_per_step": secs / max(1, sum(h["steps"] for h in hist)),
        "wall_s_this_invocation": wall,
        "wall_s": wall,
        "checkpoint": where,
        "versions": versions(),
    }
    _json(out / REPORT_FILE, report)
    return report


# ---------------------------------------------------------------- evaluation after training
def _evaluate_run(cfg: FinetuneConfig) -> tuple[dict | None, bool]:
    if cfg.split == "none":
        return None, False
    out = Path(cfg.out)
    fp = cfg.eval_fingerprint()
    f = out / METRICS_FILE
    rd = run_dir(cfg)
    if rd.done("evaluate") and f.exists() and (out / PER_USER_FILE).exists():
        try:
            return json.loads(f.read_text()), False
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    metrics = evaluate_adapter(cfg, trained_dir(cfg))
    per_user, user_ids = metrics.pop("per_user"), metrics.pop("user_ids")
    tmp = out / f".{PER_USER_FILE}.tmp-{os.getpid()}.npz"
    with output_errors(out, option="--out"):
        np.savez_compressed(tmp, user_ids=np.asarray(user_ids, dtype=str), **per_user)
        os.replace(tmp, out / PER_USER_FILE)
    metrics.update(split=cfg.split, eval_fingerprint=fp, config=cfg.to_dict(),
                   backend=backend_record(cfg.backend, cfg.backend_options()))
    _json(f, metrics)
    rd.finish("evaluate", time.perf_counter() - t0, split=cfg.split, users=metrics.get("users"), backend=cfg.backend)
    return metrics, True


def evaluate_adapter(cfg: FinetuneConfig, adapter: str | os.PathLike) -> dict:
    """Recall/NDCG@K of ``adapter`` on ``cfg.split`` through the generic evaluator (seeded
    ``cfg.max_eval_users`` subset drawn with ``cfg.eval_seed``, not the training seed, so every run
    of a comparison sees the same users; history items excluded).

    Returns:
        ``recall@K``/``ndcg@K``, ``users``, ``per_user`` ({metric: [users]}), ``user_ids``, ``seconds``.
    """
    from engine.llm import get_backend

    titles = read_items(cfg.data).column("title").to_pylist()
    backend = get_backend(cfg.backend, titles, **cfg.backend_options())
    return _evaluate(backend, cfg.data, adapter, {cfg.split: cfg.max_eval_users}, eval_seed=cfg.eval_seed,
                     ks=cfg.ks)[cfg.split]


def evaluate_splits(textrec, data: str | os.PathLike, adapter: str | os.PathLike, max_users: dict[str, int | None],
                    *, eval_seed: int = 0, ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict]:
    """:func:`evaluate_adapter` of a textrec adapter on several splits with ONE loaded model.

    Args:
        textrec: the TextRecConfig (or dict) the adapter was trained with.
        data: prepared data folder.
        adapter: the exported adapter folder.
        max_users: ``{split: seeded user subset size or None (all)}``, evaluated in this order.
        eval_seed: draws the user subsets.
        ks: cut-offs.

    Returns:
        ``{split: evaluate_adapter-like result}``.
    """
    from engine.llm import get_backend
    from engine.llm.textrec import TextRecConfig

    titles = read_items(data).column("title").to_pylist()
    backend = get_backend("textrec", titles, config=TextRecConfig.from_dict(textrec).to_dict())
    return _evaluate(backend, data, adapter, max_users, eval_seed=eval_seed, ks=ks)


def _evaluate(backend, data, adapter, max_users: dict[str, int | None], *, eval_seed: int,
              ks: Sequence[int]) -> dict[str, dict]:
    from engine.evaluate import evaluate_backend

    model = backend.load_model(str(adapter))
    out = {}
    for split, n in max_users.items():
        r = evaluate_backend(backend, model, data, split, ks=ks, max_users=n, seed=eval_seed)
        out[split] = {**r["metrics"], "per_user": r["per_user"], "user_ids": r["user_ids"],
                      "seconds": r["timings"]["total_s"], "seconds_per_user": r["timings"]["per_user_s"]}
    return out


def read_per_user(out: str | os.PathLike) -> dict:
    """``{"user_ids": array, metric: array}`` of a finished run's ``per_user.npz``."""
    with np.load(Path(out) / PER_USER_FILE) as z:
        return {k: z[k] for k in z.files}


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
    payload = None if _finished_report(cfg) is not None else load_examples(cfg)
    if cfg.strategy != "local":
        from jobs.ray_init import init_ray

        init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    rep = fit(cfg, overwrite=args.overwrite, payload=payload)
    print(f"fine-tune ({cfg.backend}, {cfg.strategy} x{cfg.world}): {rep['epochs_done']} epoch(s), "
          f"{rep['optimizer_steps']} optimiser steps, {rep['samples_per_s']:.1f} samples/s, best epoch "
          f"{rep['best_epoch']} (val loss {rep['best_val_loss']}), wall {rep['wall_s_this_invocation']:.1f}s"
          + ("" if rep["trained"] else " (finished before; not trained again)"))
    for h in rep["history"]:
        print(f"  epoch {h['epoch']:>3}  train {h['train_loss']:.4f}  val {h['val_loss']}  {h['seconds']:.1f}s")
    if rep["metrics"] is not None:
        m = rep["metrics"]
        print(f"{cfg.split}: " + "  ".join(f"{k} {m[k]:.4f}" for k in m if "@" in k) + f"  ({m['users']} users)")
    print(f"{trained_dir_name(cfg.backend)}: {trained_dir(cfg)}  report: {Path(cfg.out) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
