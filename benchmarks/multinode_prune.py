"""Wall time of the DEFAULT prune job on a local cluster of 1, 2, 3 ... one-CPU worker nodes.

Each size gets a fresh ``cluster/local.sh`` cluster (0-CPU head + N one-CPU workers) and one
``ray job submit`` of ``jobs/prune.py --data DATA --out OUT`` with default settings, on the
same data. Prints the total and per-stage wall times (from each run's manifest.json) and the
scoring stages' speed-up over one node, measured in this run. On one machine the nodes share
its cores, so the speed-up is bounded by the machine's cores, not by the cluster.

    python benchmarks/multinode_prune.py --nodes 1 2 3 --users 4000 --out /tmp/mn-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cluster"))

from localcluster import LocalCluster  # noqa: E402

STAGES = ("surrogate", "ihvp", "surrogate_scores", "effort", "select", "report")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--users", type=int, default=4000)
    p.add_argument("--rows-per-file", type=int, default=256)
    p.add_argument("--out", required=True)
    p.add_argument("--job-args", nargs=argparse.REMAINDER, default=[], help="extra prune flags (after everything)")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    data = out / "data"
    if not (data / "meta.json").exists():
        subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--format", "synthetic", "--users",
                        str(a.users), "--rows-per-file", str(a.rows_per_file), "--out", str(data)], check=True,
                       cwd=ROOT)
    rows = {}
    for n in a.nodes:
        run = out / f"run-{n}nodes"
        if (run / "manifest.json").exists() and (run / "selected.parquet").exists():
            print(f"[bench] {n} node(s): reusing finished {run}")
        else:
            c = LocalCluster(out / f"cluster-{n}")
            c.start(n)
            try:
                t0 = time.perf_counter()
                r = c.submit(["jobs/prune.py", "--data", str(data), "--out", str(run), *a.job_args],
                             submission_id=f"bench-{n}-{time.time_ns()}", wait=True)
                wall = time.perf_counter() - t0
                (out / f"run-{n}nodes.log").write_text(r.stdout + r.stderr)
                if r.returncode != 0:
                    print(r.stdout[-3000:], r.stderr[-2000:])
                    return 1
                m = json.loads((run / "manifest.json").read_text())
                m["submit_wall_s"] = round(wall, 1)
                (run / "manifest.json").write_text(json.dumps(m, indent=1))
            finally:
                c.stop()
        m = json.loads((run / "manifest.json").read_text())
        rows[n] = {"submit": m.get("submit_wall_s"), **{s: m["stages"].get(s, {}).get("wall_s") for s in STAGES}}
    print(f"\n| worker nodes (1 CPU each) | ray job submit total (s) | " + " | ".join(STAGES) + " |")
    print("|---" * (len(STAGES) + 2) + "|")
    for n, r in rows.items():
        print(f"| {n} | {r['submit']} | " + " | ".join(f"{r[s]:.1f}" if r[s] is not None else "-" for s in STAGES)
              + " |")
    base = rows[min(rows)]
    for n, r in rows.items():
        ratios = [f"{s} {base[s] / r[s]:.2f}x" for s in ("surrogate_scores", "effort") if base[s] and r[s]]
        print(f"speed-up of the scoring stages, {n} vs {min(rows)} node(s): " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
