"""Train the surrogate recommender with Ray Train (PyTorch DDP): the ``distributed="ray_train"`` path.

``SurrogateConfig.distributed`` picks where the surrogate of the influence score trains:
``"local"`` runs :func:`engine.surrogate.train_surrogate` in the calling process (small data;
what ``jobs/prune.py`` does today), ``"ray_train"`` runs the same epoch loop here, on a
``TorchTrainer`` with ``cfg.num_workers`` data-parallel ranks (large data). Every rank reads the
samples Parquet files of the data folder one at a time (a seeded file order per epoch, a
seeded row order per file, the same on every rank) and trains on its slice ``perm[rank::world]``
of each file with ``batch_size // num_workers`` samples per step (so one DDP step matches a local
step of the streamed loop on ``batch_size`` samples); rank 0 runs the validation Recall@K and
its early-stopping decision reaches every rank. Rank 0 saves the best model
(:func:`engine.surrogate.save_surrogate`) into a Ray Train checkpoint; the driver copies it to
``out_dir`` and returns :func:`engine.surrogate.load_surrogate` of it.

Outputs in OUT: ``model.pt`` + ``config.json`` (the surrogate, ``load_surrogate(OUT)``),
``history.json`` (per-epoch metrics), ``surrogate_train.json`` (config, history, per-rank
parameter checksums, wall time, workers, GPU use) and ``ray_train/`` (the Ray Train run).

Data: each worker holds one samples file at a time (its encoded matrices, about ``2 x max_len x
8`` bytes per sample of that file) and rank 0 a seeded subset of ``valid_users`` validation
users, so memory does not grow with the number of samples; every rank reads every file (the
reads, not the compute, scale with the number of workers).

On a cluster (the data folder and OUT must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/surrogate_train.py --data /shared/games \\
        --out /shared/runs/games/surrogate --num-workers 4 --batch-size 1024

Tiny local variant (CPU, 2 gloo ranks)::

    dealrec prepare --format synthetic --out /tmp/demo-data
    python jobs/surrogate_train.py --data /tmp/demo-data --out /tmp/demo-sur --num-workers 2 \\
        --epochs 3 --hidden 16 --n-blocks 1 --max-len 20

From Python (Ray initialised or not)::

    model, history = train_surrogate_ray("/tmp/demo-data", n_items, SurrogateConfig(
        distributed="ray_train", num_workers=2), out_dir="/tmp/demo-sur")
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from engine import surrogate as sur
from engine.config import versions
from engine.data.schema import read_items, read_split, sample_loaders
from engine.errors import ConfigError, DataError
from engine.surrogate import SurrogateConfig

RAY_RUN_NAME = "ray_train"
REPORT_FILE = "surrogate_train.json"
HISTORY_FILE = "history.json"
MODEL_FILES = ("model.pt", "config.json", HISTORY_FILE)

__all__ = ["param_checksum", "train_loop_per_worker", "train_surrogate_ray"]


def param_checksum(model) -> str:
    """SHA-256 of every state-dict tensor (name, dtype, shape, bytes), in name order: equal iff bit-identical."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        a = v.detach().cpu().contiguous().numpy()
        h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- the per-worker loop
def early_stopping_split(data: str | os.PathLike, sur_cfg: SurrogateConfig, n_items: int | None = None):
    """The validation users the surrogate early-stops on (a seeded subset of ``valid_users``),
    item ids checked against ``n_items``; None, with a loud warning on stderr, when no user has
    a validation item: a Recall of 0.0 on nobody would stop training after ``patience`` epochs
    for no reason (the surrogate then trains every epoch and keeps the last)."""
    from engine.data.schema import check_item_ids

    valid = read_split(data, "valid", max_rows=sur_cfg.valid_users, seed=sur_cfg.seed)
    path = Path(data) / "valid.parquet"
    targets = valid.column("targets").combine_chunks().flatten()
    if n_items is not None:
        check_item_ids(valid.column("history").combine_chunks().flatten().to_numpy(), n_items, path=path,
                       field="history")
        check_item_ids(targets.to_numpy(), n_items, path=path, field="targets")
    if len(targets):
        return valid
    print(f"[surrogate] WARNING: {path} has no user with a validation item: no early stopping, the surrogate "
          f"trains all {sur_cfg.epochs} epochs (prepare the data with a valid share > 0 to early-stop)",
          file=sys.stderr, flush=True)
    return None


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: read the data, run :func:`engine.surrogate.train_surrogate` as one DDP rank."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(int(config["threads"]))
    cfg = SurrogateConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # every rank streams every samples file (one in memory at a time) and trains on its stride
    samples = sample_loaders(config["data"])
    valid = early_stopping_split(config["data"], cfg) if rank == 0 else None  # validation runs on rank 0

    def wrap(module):
        return ray.train.torch.prepare_model(module)  # DDP when world > 1; moves to this rank's device

    model, history = sur.train_surrogate(
        samples, int(config["n_items"]), cfg, valid=valid, log=lambda s: print(s, flush=True),
        rank=rank, world_size=world, wrap_model=wrap)
    del samples
    checksum = param_checksum(model)
    sums = [checksum]
    if world > 1:
        import torch.distributed as dist

        sums = [None] * world
        dist.all_gather_object(sums, checksum)
    recalls = [h["recall"] for h in history if "recall" in h]
    metrics = {"epochs": len(history), "best_recall": max(recalls) if recalls else float("nan"),
               "train_loss": history[-1]["train_loss"] if history else float("nan"), "rank_checksums": sums}
    with tempfile.TemporaryDirectory(prefix="dealrec-sur-") as tmp:
        checkpoint = None
        if rank == 0:
            sur.save_surrogate(model, cfg, tmp)
            (Path(tmp) / HISTORY_FILE).write_text(json.dumps({"history": history, "rank_checksums": sums}, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name="final")


# ---------------------------------------------------------------- driver
def _cluster_has_gpus(ray) -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def train_surrogate_ray(
    data_dir: str | os.PathLike,
    n_items: int,
    cfg: SurrogateConfig,
    *,
    out_dir: str | os.PathLike,
    log: Callable[[str], None] = print,
    use_gpu: bool | None = None,
    cpus_per_worker: float = 1.0,
    max_failures: int = 3,
    storage_path: str | os.PathLike | None = None,
) -> tuple[sur.SASRec | sur.BERT4Rec, list[dict[str, float]]]:
    """Train the surrogate on ``cfg.num_workers`` Ray Train DDP ranks; save it in ``out_dir`` and load it.

    Initialises Ray (``RAY_ADDRESS`` or a local instance) when it is not. ``cfg.distributed`` is
    not consulted (this IS the ``"ray_train"`` path); the same ``cfg`` with
    ``distributed="local"`` and ``train_surrogate`` gives the driver-side result, and with
    ``num_workers=1`` both agree to float rounding.

    Args:
        data_dir: prepared data folder (``dealrec prepare``), on storage every node sees.
        n_items: catalogue size (rows of the items table).
        cfg: surrogate config; ``cfg.num_workers`` ranks, ``cfg.batch_size`` a multiple of it.
        out_dir: output folder (created): ``model.pt``, ``config.json``, ``history.json``,
            ``surrogate_train.json`` and (unless ``storage_path``) the Ray Train run ``ray_train/``.
        log: receives the summary lines on the driver (workers print their progress lines;
            Ray forwards them to the driver's console).
        use_gpu: one GPU per worker (NCCL); None = where the cluster has GPUs. CPU uses gloo.
        cpus_per_worker: CPUs reserved per CPU worker (also its torch thread count).
        storage_path: Ray Train storage (default ``out_dir``); the run ``ray_train`` in it is
            replaced (this job does not resume).

    Returns:
        (the best model, loaded from ``out_dir``, in eval mode; the per-epoch history).

    Raises:
        ConfigError: bad config or n_items. DataError: bad data folder.
        ray.train.TrainingFailedError: a worker failed (its error is attached).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg.validate()
    if not isinstance(n_items, int) or n_items < 1:
        raise ConfigError([f"n_items={n_items!r}: must be a positive int"], config="train_surrogate_ray")
    problems = []
    if cfg.batch_size % cfg.num_workers:
        problems.append(f"batch_size={cfg.batch_size} must be a multiple of num_workers={cfg.num_workers}")
    if cpus_per_worker <= 0:
        problems.append(f"cpus_per_worker={cpus_per_worker!r}: must be > 0")
    if problems:
        raise ConfigError(problems, config="train_surrogate_ray")
    data = Path(data_dir).resolve()
    # fail on the driver, not in every worker, when the folder is not prepared
    read_split(data, "valid", max_rows=1)
    sample_loaders(data)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(storage_path).resolve() if storage_path is not None else out
    shutil.rmtree(storage / RAY_RUN_NAME, ignore_errors=True)  # a fresh run, never a resume
    from jobs.ray_init import init_ray

    init_ray(runtime_env={"env_vars": {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}})
    use_gpu = _cluster_has_gpus(ray) if use_gpu is None else bool(use_gpu)
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t0 = time.perf_counter()
    log(f"[surrogate] Ray Train: {cfg.num_workers} worker(s), {'GPU/nccl' if use_gpu else 'CPU/gloo'}, "
        f"{cfg.model}, batch {cfg.batch_size} = {cfg.num_workers} x {cfg.batch_size // cfg.num_workers}")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "data": str(data), "n_items": int(n_items),
                           "threads": max(1, int(cpus_per_worker))},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu,
            resources_per_worker=None if use_gpu else {"CPU": cpus_per_worker}),
        # a lost worker or node restarts the group (training is seeded: the restart retrains
        # the same model from the start); after that many losses the stage fails, saying so
        run_config=ray.train.RunConfig(name=RAY_RUN_NAME, storage_path=str(storage),
                                       failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                       worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise DataError("the Ray Train run reported no checkpoint", path=storage / RAY_RUN_NAME)
    with result.checkpoint.as_directory() as d:
        for name in MODEL_FILES:  # copy, then rename: a reader never sees half a file
            tmp = out / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(Path(d) / name, tmp)
            os.replace(tmp, out / name)
    saved = json.loads((out / HISTORY_FILE).read_text())
    history, sums = saved["history"], saved["rank_checksums"]
    model = sur.load_surrogate(out)
    report = {
        "config": cfg.to_dict(), "data": str(data), "n_items": int(n_items), "num_workers": cfg.num_workers,
        "use_gpu": use_gpu, "history": history, "rank_checksums": sums,
        "ranks_identical": len(set(sums)) == 1, "checksum_loaded": param_checksum(model),
        "wall_s": wall, "checkpoint": result.checkpoint.path, "versions": versions(),
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str))
    for h in history:
        log(f"[surrogate] epoch {int(h['epoch'])} " + " ".join(
            f"{k}={v:.4f}" for k, v in h.items() if k != "epoch"))
    log(f"[surrogate] Ray Train done in {wall:.1f}s: {len(history)} epoch(s); rank checksums "
        f"{'identical' if report['ranks_identical'] else 'DIFFER'} ({sums[0][:12]}); model in {out}")
    return model, history


# ---------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data``, ``--out`` and one option per SurrogateConfig field (``--num-workers``, ``--epochs``, ...)."""
    parser.add_argument("--data", required=True, help="prepared data folder (dealrec prepare)")
    parser.add_argument("--out", required=True, help="output folder (model.pt, config.json, reports)")
    parser.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per CPU worker")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")
    g = parser.add_argument_group("surrogate (SurrogateConfig)")
    for f in dataclasses.fields(SurrogateConfig):
        if f.name == "distributed":
            continue
        kind = float if f.default is None else type(f.default)
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata.get("help"))


def run(args: argparse.Namespace) -> int:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(SurrogateConfig) if f.name != "distributed"}
    cfg = SurrogateConfig(distributed="ray_train", **fields)
    n_items = read_items(args.data).num_rows
    from jobs.ray_init import init_ray

    init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    train_surrogate_ray(args.data, n_items, cfg, out_dir=args.out, cpus_per_worker=args.cpus_per_worker,
                        use_gpu={"auto": None, "yes": True, "no": False}[args.gpu])
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
