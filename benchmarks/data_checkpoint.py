"""Ray Data checkpointing (Ray 2.60, ``CheckpointConfig(id_column=...)``) against the shard runner.

One scoring workload, three ways, on a local 2-node cluster (``cluster/local.sh``: a 0-CPU head
and two 1-CPU workers, its own ports and temp dir; stopped by pid at the end):

* ``shards``: ``actors.shards.score_shards`` (one atomic output per input shard, rerun skips them);
* ``ckpt``:  ``read_parquet -> map_batches(actor pool) -> write_parquet`` with
  ``DataContext.checkpoint_config = CheckpointConfig(id_column="sample_id", ...)``;
* ``plain``: the same pipeline without checkpointing.

The scorer is cheap and deterministic (sleeps per batch; score = 2 * sample_id + len(history));
each batch it scores leaves a side file (its sample_ids) in a per-run folder, so every run knows
exactly which rows it scored. Every driver is its own process (``drive`` below).

1. Overhead: one warm-up run of each mode, then one measured run of each mode (``--repeats``);
   wall time inside the driver, ratios against ``shards`` and ``plain`` of the same repeat.
   Also the cost of a rerun once everything is done (``shards`` skips; ``ckpt`` with
   ``delete_checkpoint_on_success=False`` filters every row).
2. Fault cases, each for ``shards`` and ``ckpt``:
   * driver SIGKILLed once some output exists, then rerun to completion;
   * a worker node SIGKILLed (its whole process group) mid-run; rerun if the run failed;
   * a rerun after a completed run (``ckpt`` with the default ``delete_checkpoint_on_success=True``);
   * (ckpt) a resume whose scoring pool takes every CPU, as ``plan_pool`` sizes prune's pools.
   After each: duplicates and missing sample_ids in the final output, wrong scores, rows scored
   more than once over all runs, and rows a rerun scored although they were already in the
   committed output when it started.

    RAY_AUTH_MODE=disabled .venv/bin/python benchmarks/data_checkpoint.py --work /tmp/dck

(about 50 min on the heavily loaded 2-core VM of 2026-12-02; ``--json`` writes the raw results;
``--cases`` / ``--modes`` run a part. Results and the decision: docs/checkpointing.md.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


class Scorer:
    """score = 2 * sample_id + len(history); sleeps per batch; returns rows reversed.

    Each call saves the sample_ids it scored to ``<calls_dir>/<uuid>.npy`` (written to a
    temporary name and renamed, so a file that exists is whole).
    """

    def __init__(self, sleep_s: float, calls_dir: str):
        self.sleep_s = sleep_s
        self.calls = Path(calls_dir)
        self.calls.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch):
        time.sleep(self.sleep_s)
        sid = np.asarray(batch["sample_id"], dtype=np.int64)
        lens = np.array([len(h) for h in batch["history"]], dtype=np.float64)
        name = uuid.uuid4().hex
        tmp = self.calls / f".{name}.tmp.npy"
        np.save(tmp, sid)
        os.replace(tmp, self.calls / f"{name}.npy")
        return {"sample_id": sid[::-1], "score": (2.0 * sid + lens)[::-1]}


# ---------------------------------------------------------------------------------------
# the driver (one process per run)

def drive(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("shards", "ckpt", "plain"), required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="")
    p.add_argument("--keep-ckpt", action="store_true", help="delete_checkpoint_on_success=False")
    p.add_argument("--calls", required=True)
    p.add_argument("--sleep", type=float, default=0.04)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus", type=float, default=0.5)
    p.add_argument("--v2", action="store_true", help="read through Ray Data's datasource V2")
    a = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import ray

    from benchmarks.data_checkpoint import Scorer as S  # by reference: workers import it too

    ray.init(address=a.address, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": PYTHONPATH}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    files = sorted(str(f) for f in Path(a.data).glob("*.parquet"))
    t0 = time.perf_counter()
    if a.mode == "shards":
        from actors.shards import score_shards

        st = score_shards(files, a.out, S, constructor_args=(a.sleep, a.calls), output_columns=("sample_id", "score"),
                          batch_size=a.batch, num_actors=a.actors, max_actors=a.actors, num_cpus=a.cpus,
                          stall_timeout_s=0, stall_warn_s=0, progress=lambda m: print(m, flush=True))
        print(f"STATS skipped={st.shards_skipped} written={st.shards_written}", flush=True)
    else:
        if a.mode == "ckpt":
            from ray.data.checkpoint import CheckpointConfig

            ctx.checkpoint_config = CheckpointConfig(id_column="sample_id", checkpoint_path=a.ckpt,
                                                     delete_checkpoint_on_success=not a.keep_ckpt)
        # Reads and writes on no CPU (as actors/shards.py reads), so that a pool taking every
        # CPU cannot starve them. Datasource V2 (Ray 2.60's default) adds a ListFiles task that
        # always asks for 1 CPU (plan_list_files_op passes no num_cpus): with 0.5-CPU actors on
        # both 1-CPU nodes it never starts and the read hangs before any work, checkpointing or
        # not (case "v2"). V1 reads one task per file with override_num_blocks (V2 bin-packs
        # small files into one ~128 MiB read task: one block, one write at the very end).
        ctx.use_datasource_v2 = a.v2
        ds = ray.data.read_parquet(a.data, override_num_blocks=len(files), num_cpus=0)
        ds = ds.select_columns(["sample_id", "history", "target"])
        ds = ds.map_batches(S, fn_constructor_args=(a.sleep, a.calls), batch_size=a.batch, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=a.actors, initial_size=a.actors),
                            num_cpus=a.cpus, max_restarts=3, max_task_retries=-1)
        ds.write_parquet(a.out, ray_remote_args={"num_cpus": 0})
    print(f"WALL {time.perf_counter() - t0:.3f}", flush=True)
    ray.shutdown()
    return 0


# ---------------------------------------------------------------------------------------
# the orchestrator

def make_data(d: Path, rows: int, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if d.exists() and len(list(d.glob("*.parquet"))) == files:
        return
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ids = np.arange(rows, dtype=np.int64)
    hist = [rng.integers(0, 1000, rng.integers(0, 20)).astype(np.int32) for _ in range(rows)]
    target = rng.integers(0, 1000, rows).astype(np.int32)
    for i, part in enumerate(np.array_split(ids, files)):
        t = pa.table({"sample_id": part, "history": pa.array([hist[j] for j in part], pa.list_(pa.int32())),
                      "target": target[part]})
        pq.write_table(t, d / f"part-{i:05d}.parquet")


def expected_scores(data: Path) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    t = pq.read_table(data, columns=["sample_id", "history"])
    sid = t.column("sample_id").to_numpy()
    lens = np.array([len(h) for h in t.column("history").to_pylist()], dtype=np.float64)
    o = np.argsort(sid)
    return sid[o], (2.0 * sid + lens)[o]


def read_ids(folder: Path, with_scores: bool = False):
    """sample_ids (and scores) of every readable Parquet file in ``folder`` (none: empty)."""
    import pyarrow.parquet as pq

    ids, scores = [], []
    for f in sorted(Path(folder).glob("*.parquet")) if Path(folder).exists() else []:
        try:
            t = pq.read_table(f)
        except Exception:  # a file being written: not part of the output
            continue
        ids.append(t.column("sample_id").to_numpy())
        if with_scores:
            scores.append(t.column("score").to_numpy())
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)  # noqa: E731
    return (cat(ids, np.int64), cat(scores, np.float64)) if with_scores else cat(ids, np.int64)


def scored_ids(calls: Path) -> np.ndarray:
    return np.concatenate([np.load(f) for f in sorted(calls.glob("*.npy"))] or [np.zeros(0, np.int64)])


def committed_ckpt_ids(ckpt: Path) -> np.ndarray:
    """ids of the committed checkpoint files (``*.pending.parquet`` are not committed)."""
    import pyarrow.parquet as pq

    if not ckpt.exists():
        return np.zeros(0, np.int64)
    fs = [f for f in ckpt.glob("*.parquet") if not f.name.endswith(".pending.parquet")]
    return np.concatenate([pq.read_table(f).column("sample_id").to_numpy() for f in fs] or [np.zeros(0, np.int64)])


class Bench:
    def __init__(self, a, cluster):
        self.a, self.c = a, cluster
        self.work = Path(a.work)
        self.data = self.work / "data"
        self.n = a.rows
        self.exp_ids, self.exp_scores = expected_scores(self.data)
        self.results: dict = {"overhead": [], "faults": []}

    def cmd(self, mode, out, calls, *, ckpt=None, keep=False, cpus=None, actors=None, v2=False):
        c = [sys.executable, str(Path(__file__).resolve()), "drive", "--mode", mode, "--address", self.c.gcs,
             "--data", str(self.data), "--out", str(out), "--calls", str(calls), "--sleep", str(self.a.sleep),
             "--batch", str(self.a.batch), "--actors", str(actors or self.a.actors), "--cpus", str(cpus or self.a.cpus)]
        if ckpt is not None:
            c += ["--ckpt", str(ckpt)]
        if keep:
            c.append("--keep-ckpt")
        if v2:
            c.append("--v2")
        return c

    def run(self, c, log: Path, *, timeout=None, kill_when=None, on_running=None):
        """Run a driver; SIGKILL it when ``kill_when()`` is true; return (rc, wall_s or None, log text)."""
        timeout = timeout or self.a.timeout
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": PYTHONPATH}
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            pr = subprocess.Popen(c, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            t0, fired = time.monotonic(), False
            try:
                while pr.poll() is None:
                    if time.monotonic() - t0 > timeout:
                        pr.kill()
                        pr.wait()
                        return "timeout", None, log.read_text()
                    if kill_when is not None and kill_when():
                        pr.send_signal(signal.SIGKILL)
                        pr.wait()
                        return "killed", None, log.read_text()
                    if on_running is not None and not fired and on_running():
                        fired = True
                    time.sleep(0.2)
            finally:
                if pr.poll() is None:
                    pr.kill()
                    pr.wait()
        text = log.read_text()
        wall = next((float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("WALL ")), None)
        return pr.returncode, wall, text

    def check(self, mode, out: Path, calls_dirs: list[Path], committed_before: np.ndarray | None) -> dict:
        ids, scores = read_ids(out, with_scores=True)
        uniq = np.unique(ids)
        missing = int(np.setdiff1d(self.exp_ids, uniq).size)
        dup = int(ids.size - uniq.size)
        o = np.argsort(ids, kind="stable")
        first = o[np.r_[True, np.diff(ids[o]) != 0]] if ids.size else o
        wrong = int(np.sum(~np.isclose(scores[first], self.exp_scores[np.searchsorted(self.exp_ids, ids[first])])))
        per_run = [scored_ids(d) for d in calls_dirs]
        allscored = np.concatenate(per_run) if per_run else np.zeros(0, np.int64)
        res = {"rows_out": int(ids.size), "duplicates": dup, "missing": missing, "wrong_scores": wrong,
               "rows_scored": int(allscored.size), "rows_scored_extra": int(allscored.size - self.n),
               "rows_scored_per_run": [int(x.size) for x in per_run]}
        if committed_before is not None and len(per_run) > 1:
            later = np.concatenate(per_run[1:])
            res["rerun_rescored_committed"] = int(np.isin(later, committed_before).sum())
            res["committed_at_rerun"] = int(np.unique(committed_before).size)
        return res

    def fresh(self, name):
        d = self.work / "runs" / name
        if d.exists():
            import shutil

            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def committed(self, mode, d: Path) -> np.ndarray:
        """What a rerun would regard as done: finished shard files, or committed checkpoint ids."""
        if mode == "shards":
            return np.unique(read_ids(d / "out"))
        return np.unique(committed_ckpt_ids(d / "ckpt"))

    # -- 1. overhead ---------------------------------------------------------------------
    def overhead(self):
        for rep in range(-1, self.a.repeats):  # -1: warm-up
            row = {}
            for mode in ("shards", "ckpt", "plain"):
                d = self.fresh(f"oh-{mode}-{rep}")
                rc, wall, text = self.run(self.cmd(mode, d / "out", d / "calls1", ckpt=d / "ckpt", keep=True),
                                          d / "log1")
                assert rc == 0, text[-3000:]
                row[mode] = wall
                row[f"{mode}_check"] = self.check(mode, d / "out", [d / "calls1"], None)
                if mode != "plain":  # rerun once everything is done
                    rc, wall2, text = self.run(self.cmd(mode, d / "out", d / "calls2", ckpt=d / "ckpt", keep=True),
                                               d / "log2")
                    assert rc == 0, text[-3000:]
                    row[f"{mode}_rerun_done"] = wall2
                    row[f"{mode}_rerun_check"] = self.check(mode, d / "out", [d / "calls1", d / "calls2"],
                                                            self.committed(mode, d))
            print(f"[overhead rep {rep}] " + json.dumps({k: v for k, v in row.items() if not k.endswith('check')}),
                  flush=True)
            if rep >= 0:
                self.results["overhead"].append(row)

    # -- 2. faults -----------------------------------------------------------------------
    def driver_kill(self, mode):
        d = self.fresh(f"dk-{mode}")
        out, ckpt = d / "out", d / "ckpt"
        want = self.a.kill_after

        def some_output():
            if mode == "shards":
                return len(list(out.glob("*.parquet"))) >= want
            return ckpt.exists() and len([f for f in ckpt.glob("*.parquet")
                                          if not f.name.endswith(".pending.parquet")]) >= want

        rc1, _, t1 = self.run(self.cmd(mode, out, d / "calls1", ckpt=ckpt), d / "log1", kill_when=some_output)
        time.sleep(self.a.settle)  # the dead driver's workers go
        before = self.committed(mode, d)
        out_files_before = len(list(out.glob("*.parquet")))
        rc2, wall, t2 = self.run(self.cmd(mode, out, d / "calls2", ckpt=ckpt), d / "log2")
        res = {"case": "driver SIGKILL, rerun", "mode": mode, "first": rc1, "rerun": rc2,
               "out_files_at_kill": out_files_before,
               **self.check(mode, out, [d / "calls1", d / "calls2"], before)}
        if rc2 != 0:
            res["rerun_log_tail"] = t2[-1500:]
        self.results["faults"].append(res)
        print("[fault] " + json.dumps(res), flush=True)

    def node_kill(self, mode):
        d = self.fresh(f"nk-{mode}")
        out, ckpt = d / "out", d / "ckpt"
        state = {"killed": False}
        want = self.a.kill_after

        def kill_node():
            if state["killed"]:
                return True
            n = len(list(out.glob("*.parquet"))) if out.exists() else 0
            if n >= want:
                self.c.kill(2)
                state["killed"] = True
            return False

        rc1, _, t1 = self.run(self.cmd(mode, out, d / "calls1", ckpt=ckpt, cpus=1.0), d / "log1",
                              on_running=kill_node)
        runs = [d / "calls1"]
        res = {"case": "worker node SIGKILL", "mode": mode, "first": rc1, "node_killed": state["killed"]}
        if rc1 != 0:
            res["first_log_tail"] = t1[-1500:]
            self.c.add()
            before = self.committed(mode, d)
            rc2, _, t2 = self.run(self.cmd(mode, out, d / "calls2", ckpt=ckpt, cpus=1.0), d / "log2")
            runs.append(d / "calls2")
            res["rerun"] = rc2
            res.update(self.check(mode, out, runs, before))
        else:
            res.update(self.check(mode, out, runs, None))
        self.results["faults"].append(res)
        print("[fault] " + json.dumps({k: v for k, v in res.items() if not k.endswith("tail")}), flush=True)
        if rc1 == 0:  # the node back for the next case (a node can time out starting on a loaded machine)
            self.c.add()

    def rerun_after_done(self):
        """ckpt with the default delete_checkpoint_on_success=True, run twice into the same folder."""
        d = self.fresh("done-ckpt-default")
        out, ckpt = d / "out", d / "ckpt"
        rc1, _, _ = self.run(self.cmd("ckpt", out, d / "calls1", ckpt=ckpt), d / "log1")
        before = self.committed("ckpt", d)
        rc2, wall, _ = self.run(self.cmd("ckpt", out, d / "calls2", ckpt=ckpt), d / "log2")
        res = {"case": "rerun after a completed run (delete_checkpoint_on_success=True, the default)",
               "mode": "ckpt", "first": rc1, "rerun": rc2, "ckpt_left_after_first": bool(before.size),
               **self.check("ckpt", out, [d / "calls1", d / "calls2"], np.unique(read_ids(out)))}
        self.results["faults"].append(res)
        print("[fault] " + json.dumps(res), flush=True)

    def packed_resume(self):
        """Resume (ckpt, checkpoint present) with a pool that takes every CPU: the CheckpointFilter
        actor pool Ray Data adds on resume asks for 1 CPU (Ray Data's default) and 1 GiB."""
        d = self.fresh("packed-ckpt")
        out, ckpt = d / "out", d / "ckpt"
        want = self.a.kill_after

        def some():
            return ckpt.exists() and len([f for f in ckpt.glob("*.parquet")
                                          if not f.name.endswith(".pending.parquet")]) >= want

        rc1, _, _ = self.run(self.cmd("ckpt", out, d / "calls1", ckpt=ckpt, cpus=1.0), d / "log1", kill_when=some)
        time.sleep(self.a.settle)
        before = self.committed("ckpt", d)
        rc2, wall, t2 = self.run(self.cmd("ckpt", out, d / "calls2", ckpt=ckpt, cpus=1.0), d / "log2",
                                 timeout=self.a.packed_timeout)
        res = {"case": f"driver SIGKILL, rerun with the pool on every CPU (2 x 1-CPU actors; {self.a.packed_timeout:.0f}s limit)",
               "mode": "ckpt", "first": rc1, "rerun": rc2,
               **self.check("ckpt", out, [d / "calls1", d / "calls2"], before)}
        self.results["faults"].append(res)
        print("[fault] " + json.dumps(res), flush=True)


    def v2_read(self):
        """The plain pipeline read through datasource V2, 2 x 0.5-CPU actors on the two 1-CPU nodes."""
        d = self.fresh("v2-plain")
        rc, wall, text = self.run(self.cmd("plain", d / "out", d / "calls1", v2=True), d / "log1",
                                  timeout=self.a.packed_timeout)
        res = {"case": f"datasource V2 read, 2 x 0.5-CPU actors ({self.a.packed_timeout:.0f}s limit)", "mode": "plain",
               "first": rc, **self.check("plain", d / "out", [d / "calls1"], None)}
        self.results["faults"].append(res)
        print("[fault] " + json.dumps(res), flush=True)


def table(results: dict) -> str:
    lines = []
    oh = results["overhead"]
    if oh:
        def med(k):
            v = [r[k] for r in oh if r.get(k) is not None]
            return float(np.median(v)) if v else float("nan")
        s, c, p = med("shards"), med("ckpt"), med("plain")
        lines += ["| measured run (median of repeats) | wall s | / shards | / plain |", "|---|---|---|---|",
                  f"| (a) score_shards | {s:.2f} | 1.00 | {s / p:.2f} |",
                  f"| (b) Ray Data + checkpointing | {c:.2f} | {c / s:.2f} | {c / p:.2f} |",
                  f"| (c) Ray Data, no checkpointing | {p:.2f} | {p / s:.2f} | 1.00 |",
                  f"| (a) rerun, all done | {med('shards_rerun_done'):.2f} | | |",
                  f"| (b) rerun, all done (checkpoint kept) | {med('ckpt_rerun_done'):.2f} | | |", ""]
    lines += ["| case | mode | first run | rerun | duplicates | missing | wrong scores | rows scored (extra) | rerun re-scored committed rows |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["faults"]:
        lines.append(f"| {r['case']} | {r['mode']} | {r.get('first')} | {r.get('rerun', '-')} | {r.get('duplicates')} | "
                     f"{r.get('missing')} | {r.get('wrong_scores')} | {r.get('rows_scored')} ({r.get('rows_scored_extra')}) | "
                     f"{r.get('rerun_rescored_committed', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["drive"]:
        return drive(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--sleep", type=float, default=0.04)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--cpus", type=float, default=0.5, help="per scoring actor (overhead and driver-kill runs)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--kill-after", type=int, default=5, help="outputs (shard files / committed checkpoints) before a kill")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between a driver kill and its rerun")
    p.add_argument("--timeout", type=float, default=400.0)
    p.add_argument("--packed-timeout", type=float, default=150.0)
    p.add_argument("--cases", nargs="+", default=["overhead", "driver", "node", "done", "packed", "v2"])
    p.add_argument("--modes", nargs="+", default=["shards", "ckpt"], help="for the driver and node cases")
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from localcluster import LocalCluster

    work = Path(a.work).resolve()
    a.work = str(work)
    make_data(work / "data", a.rows, a.files)
    c = LocalCluster(work / "cluster")
    b = Bench(a, c)
    steps = [("overhead", b.overhead)]
    for mode in a.modes:
        steps += [("driver", lambda m=mode: b.driver_kill(m)), ("node", lambda m=mode: b.node_kill(m))]
    steps += [("done", b.rerun_after_done), ("packed", b.packed_resume), ("v2", b.v2_read)]
    try:
        for attempt in range(2):  # a node can time out starting on a loaded machine
            try:
                c.start(2)
                break
            except Exception as e:  # noqa: BLE001
                print(f"cluster start failed ({e!s:.300}); stopping what started", flush=True)
                c.stop()
                if attempt:
                    raise
        for name, fn in steps:
            if name in a.cases:
                try:
                    fn()
                except Exception as e:  # noqa: BLE001  (one broken case must not lose the others)
                    print(f"[{name}] FAILED: {e!s:.2000}", flush=True)
                    b.results.setdefault("errors", []).append(f"{name}: {e!s:.500}")
    finally:
        c.stop()
        if a.json:
            Path(a.json).write_text(json.dumps(b.results, indent=1))
        print(table(b.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
