"""Scaling of a scoring stage over a local multi-node Ray cluster: throughput and peak RSS per worker.

For every --sizes N it prepares a synthetic data set of N users (``dealrec prepare --format
synthetic``; a built-in generator where that importer is absent), and for every --nodes K
it starts a ``ray.cluster_utils.Cluster`` (head with 0 CPUs + K worker nodes of
--cpus-per-node CPUs), scores every sample with ``actors.shards.score_shards`` (one actor
per node), and reports samples/s and the peak RSS of each scoring worker. The last line
per size is the ratio of throughput with the largest K to the smallest, measured in the
same run (docs/results.md: this VM is noisy; compare ratios, not absolute numbers).

On one 2-core machine K "nodes" share the same two cores: the ratio measures scheduling
and data-movement overhead, not the speed-up of a real cluster, where each node brings
its own cores (and GPUs for the effort stage).

Commands:
    # the default (cheap deterministic scorer; run today on CPU):
    python benchmarks/scale.py --sizes 100000 --nodes 1 2
    # the full sweep the README quotes:
    python benchmarks/scale.py --sizes 100000 1000000 5000000 --nodes 1 2
    # the real influence stage (SurrogateScorer, sampled-softmax SASRec, random v):
    python benchmarks/scale.py --sizes 100000 --nodes 1 2 --scorer influence --output-columns sample_id influence
    # the effort stage (tiny LLM) on a subsample of 2 input shards, to extrapolate from:
    python benchmarks/scale.py --sizes 1000000 --nodes 1 2 --shards 2 --scorer actors.effort:EffortScorer \
        --scorer-args '["bigrec", {"llm": {"model": "tiny", "cache_dir": "'$PWD'/.cache/dealrec"}, "prompt": "generic"}, \
                        "runs/bench-scale/data-1000000-ipu8/items.parquet"]' --output-columns sample_id effort
    # any Ray Data callable class, built with --scorer-args (JSON list)
    python benchmarks/scale.py --sizes 100000 --nodes 1 2 --scorer actors.influence:InfluenceScorer \
        --scorer-args '[...]' --output-columns sample_id influence
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


class HashScorer:
    """Cheap, deterministic stand-in for a real scorer: a hash of the history and target.

    ``work`` repeats the arithmetic to make a batch cost something (0 = as cheap as possible).
    """

    def __init__(self, work: int = 8):
        self.work = int(work)

    def __call__(self, batch):
        sid = np.asarray(batch["sample_id"], dtype=np.int64)
        tgt = np.asarray(batch["target"], dtype=np.int64)
        lens = np.array([len(h) for h in batch["history"]], dtype=np.int64)
        sums = np.array([int(np.sum(h)) for h in batch["history"]], dtype=np.int64)
        x = (sid * 2654435761 + tgt * 40503 + sums * 97 + lens) % 1_000_003
        acc = x.astype(np.float64)
        for _ in range(self.work):
            acc = np.sin(acc) * 1e3 + x
        return {"sample_id": sid, "score": acc}


class InfluenceBench:
    """The real influence scorer (``actors.influence.SurrogateScorer``, the prune job's default
    sampled-softmax SASRec) on a freshly initialised surrogate and a random unit v: the
    throughput of the influence stage does not depend on the weights' values, so no
    training is needed to measure it. Constructor: (n_items, n_train, micro_batch)."""

    def __init__(self, n_items: int, n_train: int, micro_batch: int = 64):
        import torch

        from actors.influence import SurrogateScorer
        from engine.surrogate import SurrogateConfig, build_surrogate, surrogate_payload

        torch.set_num_threads(1)
        model = build_surrogate(int(n_items), SurrogateConfig(loss="sampled"))
        m = sum(p.numel() for p in model.parameters())
        v = torch.randn(m, generator=torch.Generator().manual_seed(0)) / m ** 0.5
        self.inner = SurrogateScorer(surrogate_payload(model), v.numpy(), n_train=int(n_train),
                                     what=("influence",), batch_size=int(micro_batch))

    def __call__(self, batch):
        return self.inner(batch)


class _Measured:
    """Wraps a scorer: adds the worker's pid and peak RSS (kB) to every output row."""

    def __init__(self, scorer_cls: type, args: list):
        self.inner = scorer_cls(*args)
        self.pid = os.getpid()

    def __call__(self, batch):
        out = dict(self.inner(batch))
        n = len(out["sample_id"])
        out["worker_pid"] = np.full(n, self.pid, dtype=np.int64)
        out["peak_rss_kb"] = np.full(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, dtype=np.int64)
        return out


def _import(path: str):
    if path == "influence":
        return InfluenceBench
    module, _, name = path.partition(":")
    if not name:
        raise SystemExit(f"--scorer must be 'module:Class', got {path!r}")
    if module in ("__main__", Path(__file__).stem):
        return globals()[name]
    return getattr(importlib.import_module(module), name)


def prepare(n_users: int, out: Path, rows_per_file: int, seed: int, ipu: float = 8.0) -> str:
    """A prepared folder with ``n_users`` samples; returns how it was made."""
    if (out / "meta.json").exists():
        return "cached"
    if (ROOT / "engine" / "data" / "synthetic.py").exists() and (ROOT / "jobs" / "prepare.py").exists():
        cmd = [sys.executable, "-m", "jobs.cli", "prepare", "--format", "synthetic", "--users", str(n_users),
               "--items", str(max(400, n_users // 20)), "--interactions-per-user", str(ipu),
               "--out", str(out), "--rows-per-file", str(rows_per_file), "--seed", str(seed)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode == 0:
            return "dealrec prepare --format synthetic"
        print(f"  dealrec prepare failed ({r.returncode}); using the built-in generator:\n{r.stderr[-1500:]}",
              file=sys.stderr)
        shutil.rmtree(out, ignore_errors=True)
    from engine.data.schema import PreparedWriter

    rng = np.random.default_rng(seed)
    n_items = max(100, n_users // 20)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    w = PreparedWriter(tmp, rows_per_file=rows_per_file)
    for start in range(0, n_users, 100_000):
        n = min(100_000, n_users - start)
        lens = rng.integers(3, 30, n)
        flat = rng.integers(0, n_items, int(lens.sum())).astype(np.int32)
        hist = np.split(flat, np.cumsum(lens)[:-1])
        w.add_samples([f"u{start + i}" for i in range(n)], hist, rng.integers(0, n_items, n))
    w.write_items(np.arange(n_items), [f"item {i}" for i in range(n_items)])
    w.close({"source": "benchmarks/scale.py built-in generator", "users": n_users})
    os.replace(tmp, out)
    return "built-in generator"


def run_once(data: Path, out: Path, nodes: int, args) -> dict:
    """Start a K-node cluster, score every sample, return throughput and per-worker peak RSS."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from actors.shards import score_shards
    from engine.data.schema import sample_files

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=args.cpus_per_node, object_store_memory=args.object_store_mb * 1024**2)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled",
                                           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        files = sample_files(data)
        if args.shards:
            files = files[: args.shards]  # a subsample: the first K input shards
        shutil.rmtree(out, ignore_errors=True)
        cols = (*args.output_columns, "worker_pid", "peak_rss_kb")
        t0 = time.perf_counter()
        st = score_shards(files, out, _Measured, constructor_args=(_import(args.scorer), json.loads(args.scorer_args)),
                          output_columns=cols, batch_size=args.batch_size, num_actors=nodes * args.actors_per_node,
                          num_cpus=args.actor_cpus, progress=lambda m: print("   ", m, flush=True))
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
        cluster.shutdown()
    t = pa.concat_tables([pq.read_table(p, columns=["worker_pid", "peak_rss_kb"]) for p in sorted(out.glob("*.parquet"))])
    pids = t.column("worker_pid").to_numpy()
    rss = t.column("peak_rss_kb").to_numpy()
    per_worker = {int(p): int(rss[pids == p].max()) for p in np.unique(pids)}
    rows_per_worker = {int(p): int((pids == p).sum()) for p in np.unique(pids)}
    return {"nodes": nodes, "samples": st.rows_written, "wall_s": wall, "samples_per_s": st.rows_written / wall,
            "workers": len(per_worker), "peak_rss_mb": {p: v / 1024 for p, v in per_worker.items()},
            "rows_per_worker": rows_per_worker}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="numbers of users (= samples) to score")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2], help="worker node counts to compare")
    p.add_argument("--cpus-per-node", type=float, default=2.0, help="CPUs of each local worker node")
    p.add_argument("--actors-per-node", type=int, default=1, help="scoring actors per worker node")
    p.add_argument("--actor-cpus", type=float, default=1.0,
                   help="CPUs per actor (leave some for the read tasks: a pool that takes every CPU starves them)")
    p.add_argument("--batch-size", type=int, default=1024, help="samples per batch sent to an actor")
    p.add_argument("--rows-per-file", type=int, default=8192, help="samples per input shard")
    p.add_argument("--object-store-mb", type=int, default=300, help="object store per worker node")
    p.add_argument("--scorer", default=f"{Path(__file__).stem}:HashScorer",
                   help="'module:Class' of the scorer, or 'influence' (the real influence scorer, see InfluenceBench)")
    p.add_argument("--scorer-args", default="[8]", help="JSON list of the scorer's constructor arguments")
    p.add_argument("--output-columns", nargs="+", default=["sample_id", "score"], help="columns the scorer returns")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-scale"), help="where data and outputs go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=0,
                   help="score only the first K input shards (a subsample, e.g. for the effort stage; 0 = all)")
    p.add_argument("--interactions-per-user", type=float, default=8.0,
                   help="synthetic data: mean interactions per user (items = max(400, users / 20))")
    args = p.parse_args(argv)
    if args.actor_cpus * args.actors_per_node > args.cpus_per_node - 1:
        # score_shards' read tasks ask for 1 CPU each: nodes whose actors leave less than
        # one CPU free never run a read, and the run hangs without a message (docs/cluster.md)
        p.error(f"--actors-per-node x --actor-cpus ({args.actors_per_node} x {args.actor_cpus}) must leave "
                f"1 CPU of --cpus-per-node ({args.cpus_per_node}) for the read tasks")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        data = work / f"data-{n}-ipu{args.interactions_per_user:g}"
        t0 = time.perf_counter()
        how = prepare(n, data, args.rows_per_file, args.seed, args.interactions_per_user)
        n_files = len(list((data / "samples").glob("*.parquet")))
        print(f"size {n}: data from {how} ({n_files} shards) in {time.perf_counter() - t0:.1f}s", flush=True)
        if args.scorer == "influence":
            import pyarrow.parquet as pq

            n_items = pq.read_metadata(data / "items.parquet").num_rows
            args.scorer_args = json.dumps([n_items, n, 64])
        by_nodes = {}
        for k in args.nodes:
            r = run_once(data, work / f"out-{n}-{k}", k, args)
            by_nodes[k] = r
            rss = ", ".join(f"{v:.0f}" for v in sorted(r["peak_rss_mb"].values()))
            rows = sorted(r["rows_per_worker"].values())
            print(f"  {k} node(s): {r['samples']} samples in {r['wall_s']:.1f}s = {r['samples_per_s']:.0f} samples/s; "
                  f"{r['workers']} scoring worker(s), peak RSS MB [{rss}], samples per worker {rows}", flush=True)
            results.append({"size": n, **r})
        lo, hi = min(by_nodes), max(by_nodes)
        if hi != lo:
            ratio = by_nodes[hi]["samples_per_s"] / by_nodes[lo]["samples_per_s"]
            print(f"  throughput ratio {hi} vs {lo} node(s): {ratio:.2f}x", flush=True)
    driver_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"driver peak RSS {driver_mb:.0f} MB (holds only the per-shard progress; scores stay in the shards)")
    (work / "results.json").write_text(json.dumps({"results": results, "driver_peak_rss_mb": driver_mb},
                                                  indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
