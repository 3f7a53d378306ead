"""Daily re-pruning (#21): an update run against a from-scratch prune of the same new day.

Three `dealrec prune` runs, each a subprocess timed whole (Ray start-up included, as a daily job
pays it), then a comparison read from their folders:

    run0/      yesterday's prune (OLD), its effort written to OUT/score-cache
    scratch/   today's data (NEW) from zero, ``--score-cache off``: every score freshly computed
    update/    ``--update run0`` on NEW: warm surrogate, CG from run0's v, effort only for the
               samples missing from run0's cache
    update-changed/   with ``--update-influence all changed``: also ``--update-influence changed``
               (surrogate and v frozen at run0's; only new and changed samples rescored)
    score-cache-run0/  run0's effort cache, as run0 left it; each update run starts from its own
               copy (score-cache-update/, ...), so one mode never reuses what another computed

Printed (and written to OUT/daily.json / daily.md): wall time per stage and in total, scratch
vs update and their ratio; CG iterations (update warm, run0 cold on OLD, scratch cold on NEW);
the sample counts (unchanged / changed / new) and effort cache hits; whether the update run's
effort of the unchanged samples (cached from run0) is bit-identical to scratch's fresh
computation; the overlap of the two selections; the Spearman correlation of their influence
and of their final score. Resumable: a run whose scores.parquet exists is not rerun (its
recorded wall time is kept in OUT/timings.json).

``--quality-seeds 0 1 2`` adds whether the difference matters: per seed, the selection of scratch
and of update re-drawn from their own scores with that seed (the prune's recorded selection
config), and a random subset of the same size, each fine-tuned and evaluated on the test period
with the product's jobs (``dealrec finetune`` / ``evaluate``, through the selection-quality
benchmark's runner); the table gives each against random and update against scratch, with paired
per-user bootstrap CIs (OUT/quality/table.md). Use it with an LLM that carries knowledge
(``--backend textrec``): the tiny default LLM's effort carries none.

Commands::

    # Games, simulated day (the release has no timestamps): OLD = NEW without a held-back 5% of
    # users, and without the last training item of a seeded 10% of the others (those who
    # interacted today; the remaining 85% of samples are unchanged)
    python benchmarks/daily.py --new /tmp/games --simulate --changed-user-share 0.1 --out /tmp/daily-games \
        --update-influence all changed
    # MovieLens-100K, two real cut-offs a week apart
    dealrec prepare --format recbole --input ../shared/data/movielens-100k --until 1998-04-15 --out /tmp/ml-0415
    dealrec prepare --format recbole --input ../shared/data/movielens-100k --until 1998-04-22 --out /tmp/ml-0422
    python benchmarks/daily.py --old /tmp/ml-0415 --new /tmp/ml-0422 --out /tmp/daily-ml --prune-args "--ratio 0.1"
    # ... and whether the update run's selection differs in quality, text-encoder backend
    python benchmarks/daily.py --old /tmp/ml-0415 --new /tmp/ml-0422 --out /tmp/daily-ml-textrec \
        --backend textrec --prompt movies --prune-args "--ratio 0.1" --quality-seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from engine.daily import STATUS, diff_days, read_sample_keys  # noqa: E402
from engine.influence.lds import spearman  # noqa: E402
from jobs.backend_args import backend_argv  # noqa: E402

STAGES = ("surrogate", "ihvp", "surrogate_scores", "effort", "select", "report")
#: the update run's folder per ``--update-influence`` mode
UPDATE_RUNS = {"all": "update", "changed": "update-changed"}


def finished(run: Path, timings: dict) -> bool:
    """Whether the prune run ``run`` finished in an earlier invocation (its wall time recorded)."""
    return (run / "scores.parquet").exists() and run.name in timings


def prune(out: Path, argv: list, timings: dict, log=print) -> None:
    """One `dealrec prune` subprocess, unless its run is finished; its wall time into ``timings``."""
    name = out.name
    if finished(out, timings):
        log(f"[daily] {name}: done before ({timings[name]:.1f}s)")
        return
    cmd = [sys.executable, "-m", "jobs.cli", "prune", "--out", str(out), *map(str, argv)]
    log(f"[daily] {name}: {' '.join(cmd[3:])}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"[daily] {name} failed (exit {rc}); rerun to resume")
    timings[name] = time.perf_counter() - t0


def own_cache(out: Path, name: str, timings: dict) -> None:
    """Give the update run ``name`` its own copy of the score cache as run0 left it
    (OUT/score-cache-<name>, from the snapshot OUT/score-cache-run0 taken before any update ran),
    so that an update run never reuses efforts that another update mode computed. Redone with
    the run: a run not finished gets a fresh copy."""
    snap, mine = out / "score-cache-run0", out / f"score-cache-{name}"
    if not snap.exists():
        tmp = out / ".score-cache-run0.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(out / "score-cache", tmp)
        tmp.rename(snap)
    if finished(out / name, timings):
        return
    shutil.rmtree(mine, ignore_errors=True)
    shutil.copytree(snap, mine)


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def compare(out: Path, timings: dict, update: str = "update") -> dict:
    """The comparison of run0, scratch and the finished update run ``update`` (module docstring)."""
    m0, ms, mu = (manifest(out / r) for r in ("run0", "scratch", update))
    walls = {r: {s: m["stages"].get(s, {}).get("wall_s") for s in STAGES} for r, m in (("scratch", ms), ("update", mu))}
    sc, up = (pq.read_table(out / r / "scores.parquet").sort_by("sample_id") for r in ("scratch", update))
    keys0, keys1 = read_sample_keys(out / "run0" / "sample_keys.parquet"), read_sample_keys(out / update / "sample_keys.parquet")
    status = diff_days(keys0["key"], keys0["user_hash"], keys1["key"], keys1["user_hash"]).status
    unchanged = status == STATUS["unchanged"]
    e_s, e_u = sc.column("effort").to_numpy(), up.column("effort").to_numpy()
    rel = np.abs(e_s - e_u) / np.maximum(np.abs(e_s), 1e-30)
    sel_s, sel_u = (set(pq.read_table(out / r / "selected.parquet").column("sample_id").to_pylist())
                    for r in ("scratch", update))
    cg = lambda m: m["stages"].get("ihvp", {}).get("iterations")  # noqa: E731
    upd = mu.get("update", {})
    res = {
        "samples": {k: int((status == v).sum()) for k, v in STATUS.items()},
        "wall_s": {"scratch": {**walls["scratch"], "job": timings.get("scratch")},
                   "update": {**walls["update"], "job": timings.get(update)}, "run0_job": timings.get("run0")},
        "speedup_job": (timings.get("scratch") or np.nan) / (timings.get(update) or np.nan),
        "update_influence": (upd.get("config") or {}).get("influence", "all"),
        "cg_iterations": {"update_warm": (upd.get("cg_iterations") or {}).get("warm"), "run0_cold": cg(m0),
                          "scratch_cold": cg(ms)},
        "effort_cache": upd.get("effort_cache"),
        "effort_unchanged": {"n": int(unchanged.sum()), "bit_identical": int((e_s[unchanged] == e_u[unchanged]).sum()),
                             "max_rel_diff": float(rel[unchanged].max()) if unchanged.any() else None},
        "effort_changed_or_new_max_rel_diff": float(rel[~unchanged].max()) if (~unchanged).any() else None,
        "selection": {"size": len(sel_s), "overlap": len(sel_s & sel_u),
                      "jaccard": len(sel_s & sel_u) / max(1, len(sel_s | sel_u))},
        "spearman": {c: spearman(sc.column(c).to_numpy(), up.column(c).to_numpy())
                     for c in ("influence", "score") if c in sc.column_names and c in up.column_names},
    }
    return res


QUALITY_ROWS = ("random", "scratch", "update")


def quality(out: Path, a, *, log=print) -> str:
    """Fine-tune + test-period evaluation of scratch's, update's and a random selection per seed
    (module docstring); the table's markdown."""
    from benchmarks.selection_quality import TABLE_METRICS, build_parser, finetune_and_evaluate, gather
    from engine import compare
    from engine.scores import read_scores
    from engine.selection import SelectionConfig, select

    data = Path(a.new).resolve()
    q = out / "quality"
    cfg = manifest(out / "scratch")["config"]["selection"]
    if cfg != manifest(out / "update")["config"]["selection"]:
        raise SystemExit("[daily] scratch and update were selected with different configs; rerun both")
    # the selection-quality benchmark's own options and defaults (fine-tune batch, lr, strategy)
    opts = build_parser().parse_args([
        "--data", str(data), "--out", str(q), "--backend", a.backend, "--epochs", str(a.epochs),
        *(["--prompt", a.prompt] if a.prompt else []), *(["--textrec-model", a.textrec_model] if a.textrec_model else []),
        "--seeds", *map(str, a.quality_seeds), "--methods", *QUALITY_ROWS, "--ks", "10", "20",
        "--no-valid", "--no-zero-shot", "--full-data", "skip"])
    for seed in a.quality_seeds:
        for name in QUALITY_ROWS:
            run = q / "runs" / f"{name}__seed{seed}"
            if (run / "metrics-test.json").exists():
                continue
            src = out / ("scratch" if name == "random" else name)
            n = pq.read_metadata(src / "scores.parquet").num_rows
            method = "random" if name == "random" else cfg.get("method", "dealrec")
            sel = select(method, read_scores(src, n), SelectionConfig(**{**cfg, "method": method, "seed": seed}))
            log(f"[daily] quality {name} seed {seed}: {len(sel.indices)} samples")
            finetune_and_evaluate(opts, data, run, seed, selected=sel.indices, epochs=a.epochs)
    runs = gather(opts, q, "test")
    rows = compare.method_rows(runs, TABLE_METRICS, n_boot=2000)
    comp = compare.component_rows(runs, TABLE_METRICS, target="update",
                                  ablations=(("scratch", "update run's selection vs from-scratch selection"),))
    md = [f"Backend {a.backend}, {a.epochs} fine-tune epochs, seeds {list(a.quality_seeds)}, every test user; "
          f"selection {cfg}.", "", *compare.markdown_rows(rows, TABLE_METRICS),
          *compare.markdown_components(comp, TABLE_METRICS, target="update")]
    (q / "table.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


def markdown(res: dict) -> str:
    w = res["wall_s"]
    rows = [f"| {s} | {w['scratch'][s] or 0:.1f} | {w['update'][s] or 0:.1f} |" for s in STAGES]
    e = res["effort_unchanged"]
    return "\n".join([
        "| stage | from scratch (s) | update (s) |", "|---|---|---|", *rows,
        f"| **job (subprocess, Ray start included)** | **{w['scratch']['job']:.1f}** | **{w['update']['job']:.1f}** |", "",
        f"Speed-up (job): {res['speedup_job']:.2f}x. Samples: {res['samples']}. Effort cache: {res['effort_cache']}.",
        f"CG iterations: update warm {res['cg_iterations']['update_warm']}, run0 cold {res['cg_iterations']['run0_cold']}, "
        f"scratch cold {res['cg_iterations']['scratch_cold']}.",
        f"Effort of the {e['n']} unchanged samples (from run0's cache) vs scratch's fresh computation: "
        f"{e['bit_identical']} bit-identical, max rel. diff {e['max_rel_diff']}.",
        f"Selection overlap: {res['selection']['overlap']} of {res['selection']['size']} (Jaccard "
        f"{res['selection']['jaccard']:.3f}); Spearman update vs scratch: "
        + ", ".join(f"{k} {v:.3f}" for k, v in res["spearman"].items()) + "."])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new", required=True, help="today's prepared folder")
    d = ap.add_mutually_exclusive_group(required=True)
    d.add_argument("--old", help="yesterday's prepared folder")
    d.add_argument("--simulate", action="store_true", help="simulate yesterday from --new (dealrec prepare --format "
                                                           "simulate-yesterday)")
    ap.add_argument("--new-user-share", type=float, default=0.05, help="--simulate: users who appear only today")
    ap.add_argument("--changed-user-share", type=float, default=1.0,
                    help="--simulate: share of the other users who gained an item today (default 1: every user, "
                         "so no sample is unchanged; a real day is a small share, e.g. 0.1)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="bigrec", help="LLM backend of the three prunes (and of --quality-seeds)")
    ap.add_argument("--prompt", default=None, help="prompt preset of the prunes and the fine-tunes")
    ap.add_argument("--textrec-model", default=None, help="--backend textrec: encoder folder (default MiniLM)")
    ap.add_argument("--prune-args", default="", help="extra `dealrec prune` options for all three runs, one string")
    ap.add_argument("--quality-seeds", type=int, nargs="*", default=[],
                    help="fine-tune + evaluate scratch's, update's and a random selection with these seeds")
    ap.add_argument("--epochs", type=int, default=3, help="--quality-seeds: fine-tune epochs")
    ap.add_argument("--update-influence", nargs="+", choices=list(UPDATE_RUNS), default=["all"],
                    help="one update run per mode (dealrec prune --update-influence): 'all' in update/, "
                         "'changed' (surrogate and v frozen, only new and changed samples rescored) in "
                         "update-changed/; --quality-seeds uses update/")
    a = ap.parse_args(argv)
    if a.quality_seeds and "all" not in a.update_influence:
        ap.error("--quality-seeds compares update/ (--update-influence all) with scratch; add 'all'")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    tf = out / "timings.json"
    timings = json.loads(tf.read_text()) if tf.exists() else {}
    old = Path(a.old).resolve() if a.old else out / "yesterday"
    if a.simulate and not (old / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--format", "simulate-yesterday", "--input",
                        str(Path(a.new).resolve()), "--out", str(old), "--new-user-share", str(a.new_user_share),
                        "--changed-user-share", str(a.changed_user_share)],
                       cwd=ROOT, check=True)
    extra = [*backend_argv(a), *a.prune_args.split()]
    new = Path(a.new).resolve()
    runs = [("run0", ["--data", old, *extra]), ("scratch", ["--data", new, "--score-cache", "off", *extra])]
    runs += [(UPDATE_RUNS[mode], ["--data", new, "--update", out / "run0", "--update-influence", mode,
                                  "--score-cache", out / f"score-cache-{UPDATE_RUNS[mode]}", *extra])
             for mode in a.update_influence]
    for name, argv_ in runs:
        if name in UPDATE_RUNS.values():
            own_cache(out, name, timings)
        prune(out / name, argv_, timings)
        tf.write_text(json.dumps(timings, indent=2))
    res = {mode: compare(out, timings, UPDATE_RUNS[mode]) for mode in a.update_influence}
    (out / "daily.json").write_text(json.dumps(res if len(res) > 1 else next(iter(res.values())), indent=2, default=float))
    md = "\n\n".join(f"**--update-influence {mode}** (`{UPDATE_RUNS[mode]}/`)\n\n{markdown(r)}" for mode, r in res.items())
    (out / "daily.md").write_text(md + "\n")
    print(md)
    if a.quality_seeds:
        print(quality(out, a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
