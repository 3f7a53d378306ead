"""Ray Tune over DEALRec's lambda and K (and optionally budget / method) on cached scores.

Reuses the scores of one prune run (``RUN_DIR/scores.parquet``: sample_id, influence,
effort, optionally grand / el2n): nothing is rescored. Each trial selects a subset with
``engine.selection.select`` and fine-tunes the LoRA LLM on it, IN PROCESS on one worker
(plain torch AdamW through the same epoch loop as `dealrec finetune`; no Ray Train
inside a trial: on CPU a nested TorchTrainer adds worker start-up and a process group
per trial for no speed-up, and the trials themselves are the parallelism). After every
epoch the trial reports, on a seeded subset of validation users:

- ``ndcg@20`` / ``recall@20`` (the trial metric by default): generate (beam search),
  ground to items with base-model title embeddings (computed once on the driver and
  cached), multi-target NDCG@20 over the users' valid items;
- ``val_loss``: the causal-LM loss on (valid history -> first valid item), cheaper, and
  the better signal when the model is too small to recommend anything (``--metric val_loss``).

ASHA stops weak trials early (time attribute: epochs). Outputs: ``RUN_DIR/tune_results.parquet``
(one row per trial: config, last metrics, epochs run), a printed table, and
``RUN_DIR/best_config.json`` (the selection config of the best trial, readable by
`dealrec prune`), plus the Ray Tune experiment in ``RUN_DIR/tune/``.

On a cluster::

    ray job submit --working-dir . -- python jobs/tune.py --run /shared/runs/games \\
        --data /shared/games --samples 15 --budget 1024 --epochs 10 --model /models/llama-7b \\
        --trial-gpus 1 --prompt games

Tiny local variant (CPU, 4 trials, 2 at a time)::

    python jobs/tune.py --run /tmp/run --data /tmp/games --samples 4 --budget 64 --epochs 2 \\
        --val-users 16 --beams 1 --max-new-tokens 8

(``dealrec tune ...`` takes the same arguments.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import versions
from engine.data.schema import (
    check_samples,
    parquet_rows,
    read_items,
    read_sample_rows,
    read_split,
)
from engine.errors import ConfigError, DataError, ResumeError, check
from engine.scores import read_scores
from engine.rundir import atomic_write_bytes, atomic_write_with, writable_problem
from engine.selection import METHODS, REQUIRED_SCORES, SelectionConfig
from jobs.finetune import add_llm_arguments, llm_config_from_args

RESULTS_FILE = "tune_results.parquet"
BEST_FILE = "best_config.json"
METRICS = ("ndcg@20", "recall@20", "val_loss")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec tune`."""
    parser.add_argument("--run", required=True, help="prune run folder holding scores.parquet")
    parser.add_argument("--data", required=True, help="prepared data folder of that run")
    parser.add_argument("--samples", type=int, default=4, help="Ray Tune trials")
    parser.add_argument("--method", nargs="+", default=["dealrec"], choices=list(METHODS),
                        help="selection method(s) to search over")
    parser.add_argument("--lam", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0, 2.0],
                        help="lambda values (paper: 0.1 0.3 0.5 1.0 2.0)")
    parser.add_argument("--groups", type=int, nargs="+", default=[25, 50, 75], help="K values (paper: 25 50 75)")
    parser.add_argument("--budget", type=int, nargs="+", default=None,
                        help="budget value(s); default: the run's selected.parquet size, else min(1024, n)")
    parser.add_argument("--hard-prune", type=float, default=0.1)
    parser.add_argument("--metric", default="ndcg@20", choices=list(METRICS))
    parser.add_argument("--epochs", type=int, default=2, help="max epochs per trial (ASHA max_t)")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period (epochs)")
    parser.add_argument("--val-users", type=int, default=64, help="validation users per evaluation")
    parser.add_argument("--beams", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--trial-cpus", type=float, default=1.0)
    parser.add_argument("--trial-gpus", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--address", default=None, help="Ray address")
    add_llm_arguments(parser)


# ---------------------------------------------------------------- driver-side inputs
def check_args(args, n: int, scores: dict) -> tuple[list[int], list[str]]:
    """Validate the search space against the run (every problem at once).

    Returns:
        ``(budgets, problems)``.
    """
    p: list[str] = []
    run_dir = Path(args.run)
    budgets = args.budget
    if budgets is None:
        sel = run_dir / "selected.parquet"
        budgets = [parquet_rows(sel)] if sel.exists() else [min(1024, n)]
    check(p, args.samples >= 1, f"samples={args.samples} must be >= 1")
    check(p, args.epochs >= 1 and 1 <= args.grace <= args.epochs, f"need 1 <= grace ({args.grace}) <= epochs ({args.epochs})")
    check(p, args.val_users >= 1, f"val-users={args.val_users} must be >= 1")
    check(p, args.max_concurrent >= 1, f"max-concurrent={args.max_concurrent} must be >= 1")
    check(p, args.batch_size % args.micro_batch == 0,
          f"batch-size={args.batch_size} must be a multiple of micro-batch={args.micro_batch}")
    for m in args.method:
        missing = [s for s in REQUIRED_SCORES[m] if s not in scores]
        check(p, not missing, f"method {m!r} needs score column(s) {missing} in {run_dir / 'scores.parquet'}")
    for m in args.method:
        for b in budgets:
            for lam in args.lam:
                for g in args.groups:
                    try:
                        SelectionConfig(method=m, budget=b, lam=lam, groups=g, hard_prune=args.hard_prune,
                                        seed=args.seed).validate(n)
                    except ConfigError as e:
                        p.extend(x for x in e.problems if x not in p)
    return budgets, p


# ---------------------------------------------------------------- one trial
def trial(config: dict, shared: dict) -> None:
    """One Tune trial: select, fine-tune in process, report validation metrics every epoch."""
    import torch
    from ray import tune

    from engine import finetune as ft
    from engine.evaluate import embed_texts, generate_texts, score_generations
    from engine.llm.bigrec.model import load_llm
    from engine.selection import select

    s = shared["settings"]
    if s["trial_gpus"] <= 0:
        torch.set_num_threads(max(1, int(s["trial_cpus"])))
    sel_cfg = SelectionConfig(method=config["method"], budget=int(config["budget"]), lam=float(config["lam"]),
                              groups=int(config["groups"]), hard_prune=s["hard_prune"], seed=s["seed"])
    idx = select(config["method"], shared["scores"], sel_cfg).indices
    llm = dict(shared["llm"], device="cuda" if s["trial_gpus"] > 0 else "cpu")
    cfg = ft.FinetuneConfig(
        data=shared["data"], out=".", all_samples=True, llm=llm, prompt=s["prompt"], cutoff_len=s["cutoff_len"],
        max_history=s["max_history"], strategy="ddp", workers=1, lr=s["lr"], warmup_steps=s["warmup_steps"],
        epochs=s["epochs"], batch_size=s["batch_size"], micro_batch=s["micro_batch"], seed=s["seed"])
    model, tok = load_llm(cfg.llm, trainable=True)
    device = next(model.parameters()).device
    pcfg = cfg.prompt_config()
    titles = shared["titles"]
    # only the selected rows are read (one file at a time), in the selection's order
    rows = read_sample_rows(shared["data"], idx)
    at = {int(s): k for k, s in enumerate(rows.column("sample_id").to_pylist())}
    hist, tgt = rows.column("history").to_pylist(), rows.column("target").to_pylist()
    enc = ft.encode_examples(tok, [hist[at[int(i)]] for i in idx], [tgt[at[int(i)]] for i in idx], titles, pcfg,
                             max_history=cfg.max_history)
    val = shared["val"]
    val_enc = ft.encode_examples(tok, val["history"], [t[0] for t in val["targets"]], titles, pcfg,
                                 max_history=cfg.max_history)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = ft.steps_per_epoch(len(enc), cfg, 1) * cfg.epochs
    stepper = ft.TorchStepper(model, opt, ft.make_scheduler(opt, cfg, total), accumulation=cfg.accumulation,
                              max_grad_norm=cfg.max_grad_norm, device=device)
    pad = tok.pad_token_id
    hist_titles = [[titles[j] for j in h] for h in val["history"]]
    for epoch in range(cfg.epochs):
        stats = ft.train_epoch(stepper, enc, cfg=cfg, epoch=epoch, rank=0, world=1, pad_id=pad)
        vl = ft.validation_loss(model, val_enc, micro_batch=cfg.micro_batch, rank=0, world=1, pad_id=pad,
                                device=device)
        out = {"epoch": epoch + 1, "val_loss": vl, "train_loss": stats["train_loss"], "n_selected": int(len(idx)),
               "train_seconds": stats["seconds"]}
        if s["metric"] != "val_loss" or epoch == cfg.epochs - 1:
            texts = generate_texts(model, tok, hist_titles, pcfg, beams=s["beams"],
                                   max_new_tokens=s["max_new_tokens"], batch_size=8)
            q = embed_texts(model, tok, texts, batch_size=16, base=True)
            m, _ = score_generations(q, shared["title_emb"], shared["index"], val["targets"], ks=(20,))
            out.update({"ndcg@20": m["ndcg@20"], "recall@20": m["recall@20"]})
        else:
            out.update({"ndcg@20": float("nan"), "recall@20": float("nan")})
        tune.report(out)


# ---------------------------------------------------------------- driver
def validate_inputs(args) -> tuple[Path, str, dict, list[int], dict]:
    """Everything checkable before Ray starts: the prune run's scores against the data, the
    search space, the LLM config (every problem at once).

    Returns:
        ``(run_dir, data, scores, budgets, llm_config_dict)``.

    Raises:
        ConfigError: invalid search space or LLM config. DataError: missing or inconsistent scores / data.
    """
    from engine.llm.bigrec.model import LLMConfig

    run_dir = Path(args.run).resolve()
    data = str(Path(args.data).resolve())
    # the results, best_config.json and the Ray Tune experiment are written into --run
    why = writable_problem(run_dir, option="--run")
    if why:
        raise ConfigError([why], config="tune")
    n = check_samples(data, n_items=read_items(data).num_rows)
    scores = read_scores(run_dir, n)
    budgets, problems = check_args(args, n, scores)
    if not len(read_split(data, "valid").column("targets").combine_chunks().flatten()):
        problems.append(f"{Path(data) / 'valid.parquet'} has no user with a validation item: nothing to tune on "
                        "(prepare the data with a valid share > 0)")
    llm = llm_config_from_args(args)
    try:
        LLMConfig.from_dict(llm)
    except ConfigError as e:
        problems.extend(f"llm: {x}" for x in e.problems)
    if problems:
        raise ConfigError(problems, config="tune")
    return run_dir, data, scores, budgets, llm


def tune_run(args, inputs: tuple | None = None) -> dict:
    """Run the search; returns ``{"table": pandas.DataFrame, "best": dict}``.

    ``inputs``: what :func:`validate_inputs` returned for these args (validated again when None).

    Raises:
        ConfigError: invalid search space (every problem at once).
        DataError: missing or inconsistent scores / data.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from engine.evaluate import cached_title_embeddings, embed_texts, eval_requests
    from engine.grounding import index_titles
    from engine.llm.bigrec.model import LLMConfig, load_llm, resolve_base

    t0 = time.perf_counter()
    run_dir, data, scores, budgets, llm = inputs or validate_inputs(args)

    titles = read_items(data).column("title").to_pylist()
    index = index_titles(titles)
    base = resolve_base(LLMConfig.from_dict(llm), titles)
    llm["model"] = str(Path(base).resolve()) if Path(base).exists() else base
    valid = read_split(data, "valid")
    req = eval_requests(valid, titles, max_history=args.max_history, max_users=args.val_users, seed=args.seed)
    if not req["user_id"]:
        raise DataError("the valid split has no user with targets: nothing to tune on", field="targets")
    model, tok = load_llm(LLMConfig.from_dict(dict(llm, device="cpu")), trainable=False)
    title_emb, _ = cached_title_embeddings(llm["cache_dir"], llm["model"], index.titles,
                                           lambda ts: embed_texts(model, tok, list(ts), batch_size=32, base=True))
    del model, tok
    mode = "min" if args.metric == "val_loss" else "max"
    shared = {
        "data": data, "llm": llm, "titles": titles, "index": index, "title_emb": title_emb, "scores": scores,
        "val": {"history": req["history"], "targets": req["targets"]},
        "settings": {"hard_prune": args.hard_prune, "seed": args.seed, "prompt": args.prompt,
                     "cutoff_len": args.cutoff_len, "max_history": args.max_history, "lr": args.lr,
                     "warmup_steps": args.warmup_steps, "epochs": args.epochs, "batch_size": args.batch_size,
                     "micro_batch": args.micro_batch, "beams": args.beams, "max_new_tokens": args.max_new_tokens,
                     "metric": args.metric, "trial_cpus": args.trial_cpus, "trial_gpus": args.trial_gpus},
    }
    space = {"method": tune.choice(args.method), "lam": tune.choice(args.lam), "groups": tune.choice(args.groups),
             "budget": tune.choice(budgets)}
    resources = {"cpu": args.trial_cpus, "gpu": args.trial_gpus}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, shared=shared), resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=args.metric, mode=mode, num_samples=args.samples, max_concurrent_trials=args.max_concurrent,
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=args.epochs, grace_period=args.grace,
                                    reduction_factor=2),
        ),
        run_config=tune.RunConfig(name="tune", failure_config=tune.FailureConfig(max_failures=2), storage_path=str(run_dir), verbose=0),
    )
    grid = tuner.fit()
    rows = []
    for r in grid:
        m = r.metrics or {}
        c = r.config or {}
        rows.append({"trial_id": m.get("trial_id", ""), "method": c.get("method"), "lam": c.get("lam"),
                     "groups": c.get("groups"), "budget": c.get("budget"),
                     "epochs_run": int(m.get("training_iteration", 0) or 0),
                     "ndcg@20": m.get("ndcg@20", float("nan")), "recall@20": m.get("recall@20", float("nan")),
                     "val_loss": m.get("val_loss", float("nan")), "n_selected": m.get("n_selected"),
                     "error": str(r.error) if r.error else None})
    import pandas as pd

    table = pd.DataFrame(rows)
    ok = table[table["error"].isna()].copy()
    if ok.empty:
        raise DataError("every trial failed; see the errors in " + str(run_dir / "tune"), field="trials")
    key = ok[args.metric].astype(float)
    ok["_key"] = key.fillna(-np.inf if mode == "max" else np.inf)
    # ties (e.g. every NDCG 0 on a tiny model) go to the lower validation loss
    ok = ok.sort_values(["_key", "val_loss"], ascending=[mode == "min", True], kind="stable")
    b = ok.iloc[0]
    best = {
        "method": b["method"], "lam": float(b["lam"]), "groups": int(b["groups"]), "budget": int(b["budget"]),
        "hard_prune": args.hard_prune, "seed": args.seed,
        "selection": {"method": b["method"], "budget": int(b["budget"]), "lam": float(b["lam"]),
                      "groups": int(b["groups"]), "hard_prune": args.hard_prune, "seed": args.seed},
        "metric": args.metric, "value": float(b[args.metric]), "val_loss": float(b["val_loss"]),
        "epochs_run": int(b["epochs_run"]), "trials": len(table), "wall_s": time.perf_counter() - t0,
        "tune_dir": str(run_dir / "tune"), "versions": versions(),
    }
    results = pa.Table.from_pandas(table, preserve_index=False)
    atomic_write_with(run_dir / RESULTS_FILE, lambda tmp: pq.write_table(results, tmp), option="--run")
    atomic_write_bytes(run_dir / BEST_FILE, json.dumps(best, indent=2, default=str).encode(), option="--run")
    return {"table": table, "best": best}


def run(args) -> int:
    """Entry point of `dealrec tune` / `python jobs/tune.py`.

    Returns:
        0 on success.
    """
    from jobs.ray_init import init_ray

    inputs = validate_inputs(args)  # bad input fails here, before a Ray cluster is started or joined
    init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    out = tune_run(args, inputs)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(out["table"].drop(columns=["error"]).to_string(index=False))
    b = out["best"]
    print(f"best ({b['metric']}={b['value']:.4f}): method={b['method']} lam={b['lam']} K={b['groups']} "
          f"budget={b['budget']} -> {Path(args.run) / BEST_FILE}")
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
