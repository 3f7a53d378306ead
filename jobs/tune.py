"""Ray Tune over DEALRec's lambda and K (and optionally budget / method) on cached scores, any backend.

Reuses the scores of one prune run (``RUN/scores.parquet``: sample_id, influence, effort,
optionally grand / el2n; read by :func:`engine.scores.read_scores`): nothing is rescored. Each
trial selects a subset with :func:`engine.selection.select` and fine-tunes the backend on it IN
PROCESS through the one fine-tune loop (:func:`engine.finetune.train`, strategy ``local``: on
CPUs a nested TorchTrainer adds worker start-up per trial for no speed-up; the trials are the
parallelism). After every epoch the trial reports, on a seeded subset of validation users (the
same users for every trial):

- ``ndcg@20`` / ``recall@20`` (the trial metric by default): the generic evaluator over
  ``backend.rank_items`` (:func:`engine.evaluate.evaluate_backend`; BIGRec generates and
  grounds, its title embeddings computed once on the driver and cached on disk; textrec ranks
  by cosine over the whole catalogue; TIGER by beam search constrained to catalogue tuples);
- ``val_loss``: the backend's per-sample loss on (valid history -> first valid item), cheaper,
  and the better signal for a model too small to recommend anything (``--metric val_loss``).

Search: ``--search asha`` (default: ``--samples`` random draws from the grid, ASHA stops weak
trials early, time attribute = epochs) or ``--search grid`` (every combination once, no early
stopping). Outputs in ``--run`` (or ``--out``): ``tune_results.parquet`` (one row per trial),
``best_config.json`` (the best trial's selection config, readable by ``dealrec prune
--best-config``), and the Ray Tune experiment in ``tune/``; the folder's ``manifest.json`` gains
stage ``tune`` with the search's fingerprint (engine.rundir.RunDir): a finished search of the same
config is returned without running anything, one of another config is refused unless
``--overwrite``, an unfinished one starts again.

On a cluster::

    ray job submit --working-dir . -- python jobs/tune.py --run /shared/runs/games \\
        --data /shared/games --backend bigrec --samples 15 --budget 1024 --epochs 10 \\
        --model /models/llama-7b --trial-gpus 1 --prompt games

Tiny local variants (CPU)::

    python jobs/tune.py --run /tmp/run --data /tmp/games --samples 4 --budget 64 --epochs 2 \\
        --val-users 16 --beams 1 --max-new-tokens 8
    python jobs/tune.py --run /tmp/run --data /tmp/games --backend textrec --search grid \\
        --lam 0.3 2 --groups 25 50 --budget 256 --epochs 1 --val-users 500

(``dealrec tune ...`` takes the same arguments.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import stable_hash, versions
from engine.data.schema import check_samples, parquet_rows, read_items, read_split
from engine.errors import ConfigError, DataError, check
from engine.rundir import RunDir, atomic_write_bytes, atomic_write_with, read_json, writable_problem
from engine.scores import read_scores
from engine.selection import METHODS, REQUIRED_SCORES, SelectionConfig
from jobs.backend_args import TIGER_FLAGS, add_backend_arguments, backend_record

RESULTS_FILE = "tune_results.parquet"
BEST_FILE = "best_config.json"
#: the search's stage in the run folder's manifest (engine.rundir.RunDir)
SEARCH_STAGE = "tune"
METRICS = ("ndcg@20", "recall@20", "val_loss")
#: the lambda grid: the paper's {0.1 .. 2} and beyond it (Tune's best on Games sat at the edge, 2)
DEFAULT_LAMS = (0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0)
#: fine-tune options passed through to `dealrec finetune`'s parser when given (else its per-backend defaults)
FT_OPTIONS = ("lr", "warmup_steps", "batch_size", "micro_batch", "max_history", "cutoff_len", "prompt",
              "lora_r", "lora_alpha", "lora_dropout", "target_modules", "cache_dir", "llm_seed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `dealrec tune`."""
    parser.add_argument("--run", required=True, help="prune run folder holding scores.parquet")
    parser.add_argument("--data", required=True, help="prepared data folder of that run")
    parser.add_argument("--out", default=None, help="where results go (default: --run)")
    add_backend_arguments(parser)
    parser.add_argument("--model", "--llm", default="tiny", help="bigrec: 'tiny', 'smollm2' or a local HF folder")
    parser.add_argument("--search", default="asha", choices=("asha", "grid"),
                        help="asha: --samples random draws, weak trials stopped early; grid: every combination once")
    parser.add_argument("--samples", type=int, default=4, help="Ray Tune trials (--search asha)")
    parser.add_argument("--method", nargs="+", default=["dealrec"], choices=list(METHODS),
                        help="selection method(s) to search over")
    parser.add_argument("--lam", type=float, nargs="+", default=list(DEFAULT_LAMS),
                        help="lambda values (paper: 0.1 0.3 0.5 1.0 2.0; the default goes on to 5 and 10)")
    parser.add_argument("--groups", type=int, nargs="+", default=[25, 50, 75], help="K values (paper: 25 50 75)")
    parser.add_argument("--budget", type=int, nargs="+", default=None,
                        help="budget value(s); default: the run's selected.parquet size, else min(1024, n)")
    parser.add_argument("--hard-prune", type=float, default=0.1)
    parser.add_argument("--metric", default="ndcg@20", choices=list(METRICS))
    parser.add_argument("--epochs", type=int, default=2, help="max epochs per trial (ASHA max_t)")
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace period (epochs)")
    parser.add_argument("--val-users", type=int, default=64, help="validation users per evaluation (0: all)")
    parser.add_argument("--beams", type=int, default=2, help="bigrec: beams of the generation")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="bigrec: tokens generated per answer")
    g = parser.add_argument_group("fine-tune (default: `dealrec finetune`'s per-backend defaults)")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--warmup-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--micro-batch", type=int, default=None)
    g.add_argument("--max-history", type=int, default=None)
    g.add_argument("--cutoff-len", type=int, default=None)
    g.add_argument("--prompt", default=None, help="prompt wording preset (bigrec prompt; textrec user text)")
    g.add_argument("--lora-r", type=int, default=None)
    g.add_argument("--lora-alpha", type=int, default=None)
    g.add_argument("--lora-dropout", type=float, default=None)
    g.add_argument("--target-modules", nargs="+", default=None)
    g.add_argument("--cache-dir", default=None, help="cache of tiny bases and title embeddings")
    g.add_argument("--llm-seed", type=int, default=None)
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--trial-cpus", type=float, default=1.0)
    parser.add_argument("--trial-gpus", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0, help="selection, fine-tune and validation-user seed")
    parser.add_argument("--overwrite", action="store_true", help="search again although a finished search exists")
    parser.add_argument("--address", default=None, help="Ray address")


def finetune_config(args, data: str, out: str):
    """The fine-tune config every trial starts from, built and validated by `dealrec finetune`'s
    own parser (its per-backend defaults where an option is not given)."""
    from jobs import finetune as ftjob

    argv = ["--data", data, "--out", out, "--all", "--backend", args.backend, "--strategy", "local",
            "--epochs", str(args.epochs), "--seed", str(args.seed), "--model", args.model, "--gpu",
            "yes" if args.trial_gpus > 0 else "no"]
    if args.textrec_model is not None:
        argv += ["--textrec-model", args.textrec_model]
    for dest, flag in TIGER_FLAGS.items():  # --semantic-ids, --tiger-checkpoint, --tiger-config
        if getattr(args, dest, None) is not None:
            argv += [flag, str(getattr(args, dest))]
    for name in FT_OPTIONS:
        v = getattr(args, name, None)
        if v is not None:
            argv += ["--" + name.replace("_", "-"), *([str(x) for x in v] if isinstance(v, list) else [str(v)])]
    p = argparse.ArgumentParser(prog="dealrec tune (fine-tune options)")
    ftjob.add_arguments(p)
    return ftjob.config_from_args(p.parse_args(argv))


def check_args(args, n: int, scores: dict, run_dir: Path) -> tuple[list[int], list[str]]:
    """Validate the search space against the run (every problem at once). Returns ``(budgets, problems)``."""
    p: list[str] = []
    budgets = args.budget
    if budgets is None:
        sel = run_dir / "selected.parquet"
        budgets = [parquet_rows(sel)] if sel.exists() else [min(1024, n)]
    check(p, args.samples >= 1, f"samples={args.samples} must be >= 1")
    check(p, args.epochs >= 1 and 1 <= args.grace <= args.epochs, f"need 1 <= grace ({args.grace}) <= epochs ({args.epochs})")
    check(p, args.val_users >= 0, f"val-users={args.val_users} must be >= 0 (0: all)")
    check(p, args.max_concurrent >= 1, f"max-concurrent={args.max_concurrent} must be >= 1")
    check(p, args.beams >= 1 and args.max_new_tokens >= 1,
          f"beams={args.beams} and max-new-tokens={args.max_new_tokens} must be >= 1")
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


def _run_backend(run_dir: Path) -> str | None:
    """The backend the prune run recorded (None: an older run, or no manifest)."""
    m = run_dir / "manifest.json"
    if not m.exists():
        return None
    b = read_json(m).get("backend")
    return b.get("name") if isinstance(b, dict) else None


# ---------------------------------------------------------------- one trial
def trial(config: dict, shared: dict) -> None:
    """One Tune trial: select, fine-tune in process, report validation metrics every epoch."""
    import tempfile

    import torch
    from ray import tune

    from engine.evaluate import evaluate_backend
    from engine.finetune import train
    from engine.llm import get_backend
    from engine.selection import select
    from jobs.finetune import load_examples

    s = shared["settings"]
    if s["trial_gpus"] <= 0:
        torch.set_num_threads(max(1, int(s["trial_cpus"])))
    sel_cfg = SelectionConfig(method=config["method"], budget=int(config["budget"]), lam=float(config["lam"]),
                              groups=int(config["groups"]), hard_prune=s["hard_prune"], seed=s["seed"])
    idx = np.sort(select(config["method"], shared["scores"], sel_cfg).indices)
    with tempfile.TemporaryDirectory(prefix="dealrec-tune-") as tmp:
        cfg = replace(shared["finetune"], out=tmp, all_samples=False, sample_ids=[int(i) for i in idx])
        payload = load_examples(cfg, checked=(shared["titles"], shared["n"]))
        device = "cuda" if s["trial_gpus"] > 0 else "cpu"
        opts = cfg.backend_options(base=shared["base"], device=device, on_gpu=device == "cuda")
        if cfg.backend == "bigrec":
            opts["generation"] = shared["generation"]
        backend = get_backend(cfg.backend, payload["titles"], **opts)
        valid = shared["valid"]

        def on_epoch(model, rec: dict) -> dict:
            if s["metric"] == "val_loss" and rec["epoch"] < cfg.epochs:
                return {"ndcg@20": float("nan"), "recall@20": float("nan")}
            r = evaluate_backend(backend, model, valid, ks=(20,), max_users=s["val_users"], seed=s["seed"])
            return {"ndcg@20": r["metrics"]["ndcg@20"], "recall@20": r["metrics"]["recall@20"]}

        def report(metrics: dict, ckpt_dir: Path, name: str) -> None:
            tune.report({**metrics, "n_selected": int(len(idx))})

        train(backend, payload, cfg, report=report, device=device, on_gpu=device == "cuda", on_epoch=on_epoch)


# ---------------------------------------------------------------- driver
def validate_inputs(args) -> dict:
    """Everything checkable before Ray starts: the prune run's scores against the data, the
    search space, the fine-tune config (every problem at once).

    Raises:
        ConfigError: invalid search space or fine-tune options. DataError: missing or inconsistent scores / data.
    """
    run_dir = Path(args.run).resolve()
    out = Path(args.out).resolve() if args.out else run_dir
    data = str(Path(args.data).resolve())
    problems: list[str] = []
    why = writable_problem(out, option="--out" if args.out else "--run")
    if why:
        raise ConfigError([why], config="tune")
    titles = read_items(data).column("title").to_pylist()
    n = check_samples(data, n_items=len(titles))
    scores = read_scores(run_dir, n)
    budgets, problems = check_args(args, n, scores, run_dir)
    rb = _run_backend(run_dir)
    if rb is not None and rb != args.backend and any("effort" in REQUIRED_SCORES[m] for m in args.method):
        problems.append(f"backend={args.backend!r}: the effort scores of {run_dir} were computed by backend {rb!r}; "
                        f"tune with --backend {rb} or prune again with --backend {args.backend}")
    if not len(read_split(data, "valid").column("targets").combine_chunks().flatten()):
        problems.append(f"{Path(data) / 'valid.parquet'} has no user with a validation item: nothing to tune on "
                        "(prepare the data with a valid share > 0)")
    try:
        ft = finetune_config(args, data, str(out / "tune"))
    except ConfigError as e:
        problems.extend(f"finetune: {x}" for x in e.problems)
        ft = None
    if problems:
        raise ConfigError(problems, config="tune")
    return {"run_dir": run_dir, "out": out, "data": data, "titles": titles, "n": n, "scores": scores,
            "budgets": budgets, "finetune": ft}


def search_fingerprint(args, inputs: dict) -> str:
    """Hash of everything a search's result depends on (scores by content, not path)."""
    space = {k: getattr(args, k) for k in ("search", "samples", "method", "lam", "groups", "hard_prune", "metric",
                                           "epochs", "grace", "val_users", "beams", "max_new_tokens", "seed")}
    scores = {k: hashlib.sha256(np.ascontiguousarray(v, dtype=np.float64).tobytes()).hexdigest()
              for k, v in sorted(inputs["scores"].items())}
    ft = inputs["finetune"].to_dict()
    ft.pop("out", None)
    return stable_hash({"space": space, "budgets": inputs["budgets"], "scores": scores, "finetune": ft})


def tune_run(args, inputs: dict | None = None) -> dict:
    """Run the search; returns ``{"table": pandas.DataFrame, "best": dict, "reused": bool}``.

    Raises:
        ConfigError: invalid search space (every problem at once).
        DataError: missing or inconsistent scores / data, or every trial failed.
    """
    import pandas as pd
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from engine.llm import get_backend

    t0 = time.perf_counter()
    inputs = inputs or validate_inputs(args)
    out, data, ft = inputs["out"], inputs["data"], inputs["finetune"]
    fp = search_fingerprint(args, inputs)
    best_file, results_file = out / BEST_FILE, out / RESULTS_FILE
    rd = search_dir(out)
    done = rd.check({SEARCH_STAGE: fp}, overwrite=args.overwrite)  # another search's results: refused
    if SEARCH_STAGE in done and best_file.exists() and results_file.exists():
        return {"table": pq.read_table(results_file).to_pandas(), "best": read_json(best_file), "reused": True}
    shutil.rmtree(out / "tune", ignore_errors=True)  # an unfinished search starts again (trials are short)
    titles = inputs["titles"]
    base = None
    generation = {"beams": args.beams, "max_new_tokens": args.max_new_tokens,
                  "max_history": ft.max_history if ft.max_history is not None else 10}
    if ft.backend == "bigrec":  # resolve (build) the base once, and fill the title-embedding cache for every trial
        warm = get_backend("bigrec", titles, **{**ft.backend_options(device="cpu"), "generation": generation})
        base = warm.base_model()
        warm.title_embeddings(warm.load_model(None, device="cpu"))
        del warm
    valid = read_split(data, "valid")
    mode = "min" if args.metric == "val_loss" else "max"
    shared = {
        "finetune": ft, "base": base, "generation": generation, "scores": inputs["scores"], "valid": valid,
        "titles": titles, "n": inputs["n"],
        "settings": {"hard_prune": args.hard_prune, "seed": args.seed, "metric": args.metric,
                     "val_users": args.val_users or None, "trial_cpus": args.trial_cpus,
                     "trial_gpus": args.trial_gpus},
    }
    grid = args.search == "grid"
    pick = tune.grid_search if grid else tune.choice
    space = {"method": pick(args.method), "lam": pick(args.lam), "groups": pick(args.groups),
             "budget": pick(inputs["budgets"])}
    resources = {"cpu": args.trial_cpus, "gpu": args.trial_gpus}
    scheduler = None if grid else ASHAScheduler(time_attr="training_iteration", max_t=args.epochs,
                                                grace_period=args.grace, reduction_factor=2)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, shared=shared), resources),
        param_space=space,
        tune_config=tune.TuneConfig(metric=args.metric, mode=mode, num_samples=1 if grid else args.samples,
                                    max_concurrent_trials=args.max_concurrent, scheduler=scheduler),
        run_config=tune.RunConfig(name="tune", failure_config=tune.FailureConfig(max_failures=2),
                                  storage_path=str(out), verbose=0),
    )
    results = tuner.fit()
    rows = []
    for r in results:
        m = r.metrics or {}
        c = r.config or {}
        rows.append({"trial_id": m.get("trial_id", ""), "method": c.get("method"), "lam": c.get("lam"),
                     "groups": c.get("groups"), "budget": c.get("budget"),
                     "epochs_run": int(m.get("training_iteration", 0) or 0),
                     "ndcg@20": m.get("ndcg@20", float("nan")), "recall@20": m.get("recall@20", float("nan")),
                     "val_loss": m.get("val_loss", float("nan")), "n_selected": m.get("n_selected"),
                     "error": str(r.error) if r.error else None})
    table = pd.DataFrame(rows)
    ok = table[table["error"].isna()].copy()
    if ok.empty:
        raise DataError("every trial failed; see the errors in " + str(out / "tune"), field="trials")
    ok["_key"] = ok[args.metric].astype(float).fillna(-np.inf if mode == "max" else np.inf)
    # ties (e.g. every NDCG 0 on a tiny model) go to the lower validation loss
    ok = ok.sort_values(["_key", "val_loss"], ascending=[mode == "min", True], kind="stable")
    b = ok.iloc[0]
    best = {
        "method": b["method"], "lam": float(b["lam"]), "groups": int(b["groups"]), "budget": int(b["budget"]),
        "hard_prune": args.hard_prune, "seed": args.seed,
        "selection": {"method": b["method"], "budget": int(b["budget"]), "lam": float(b["lam"]),
                      "groups": int(b["groups"]), "hard_prune": args.hard_prune, "seed": args.seed},
        "metric": args.metric, "value": float(b[args.metric]), "val_loss": float(b["val_loss"]),
        "epochs_run": int(b["epochs_run"]), "trials": len(table), "search": args.search,
        "backend": backend_record(ft.backend, ft.backend_options(base=base)), "fingerprint": fp,
        "wall_s": time.perf_counter() - t0, "tune_dir": str(out / "tune"), "versions": versions(),
    }
    res = pa.Table.from_pandas(table, preserve_index=False)
    atomic_write_with(results_file, lambda tmp: pq.write_table(res, tmp), option="--out")
    atomic_write_bytes(best_file, json.dumps(best, indent=2, default=str).encode(), option="--out")
    rd.finish(SEARCH_STAGE, best["wall_s"], trials=len(table), search=args.search)
    return {"table": table, "best": best, "reused": False}


def search_dir(out: Path) -> RunDir:
    """The run folder of a search (by default the prune run's own: its manifest gains stage ``tune``)."""
    return RunDir(out, {SEARCH_STAGE: [BEST_FILE, RESULTS_FILE, "tune"]}, create=False)


def run(args) -> int:
    """Entry point of `dealrec tune` / `python jobs/tune.py`. Returns 0 on success."""
    from jobs.ray_init import init_ray

    inputs = validate_inputs(args)  # bad input fails here, before a Ray cluster is started or joined
    search_dir(inputs["out"]).plan({SEARCH_STAGE: search_fingerprint(args, inputs)}, overwrite=args.overwrite)
    init_ray(address=args.address, runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    res = tune_run(args, inputs)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(res["table"].drop(columns=["error"]).to_string(index=False))
    b = res["best"]
    print(f"best ({b['metric']}={b['value']:.4f}): method={b['method']} lam={b['lam']} K={b['groups']} "
          f"budget={b['budget']} -> {inputs['out'] / BEST_FILE}" + (" (a finished search, reused)" if res["reused"] else ""))
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
