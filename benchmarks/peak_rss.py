"""Run a command and record the peak resident memory of every Ray process it causes.

`ray job submit` starts the driver under the cluster's job supervisor, not as a child of the
submitting shell, so this samples every process of the current user whose command line looks
like Ray (``ray::<Actor or task>``, raylet, gcs_server, the job's driver script) and keeps, per
process, its peak RSS, the seconds it was first and last seen and when it peaked (Ray Data
names every pool worker ``ray::MapWorker(...)``, so the times tell which stage's pool a worker
belonged to), and the most specific name it showed. At the end it prints one line per role
with the number of processes and the largest peak, and writes the per-process table as JSON.

    .venv/bin/python benchmarks/peak_rss.py --out runs/book-rss.json -- \
        ray job submit --working-dir . -- python jobs/prune_book.py --data /data/book --out /runs/book
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict

import psutil

RAY_LIKE = re.compile(r"ray::|raylet|gcs_server|dashboard|jobs/prune|jobs/.*\.py|default_worker\.py")


def _name(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    m = re.search(r"ray::([A-Za-z_][\w.]*)", text)
    if m:
        return "ray::" + m.group(1).split(".")[0]
    exe = os.path.basename(cmdline[0]) if cmdline else ""
    script = next((os.path.basename(a) for a in cmdline[1:3] if a.endswith(".py")), "")
    for key in ("raylet", "gcs_server"):
        if exe == key:
            return key
    m = re.search(r"(jobs/[\w/]+\.py)", text)
    if m:
        return "driver " + m.group(1)
    if script == "default_worker.py":
        return "ray worker (idle)"
    return script or exe or text[:60]


def _rank(name: str) -> int:
    """Which of a process's names to report: an actor/task name beats idle, idle beats the rest."""
    if name.startswith("ray::") and name != "ray::IDLE" or name.startswith("driver "):
        return 3
    if name in ("ray::IDLE", "ray worker (idle)"):
        return 1
    return 2


def sample_forever(peaks: dict, stop: threading.Event, interval: float) -> None:
    me = os.getpid()
    uid = os.getuid()
    t0 = time.perf_counter()
    while not stop.is_set():
        now = round(time.perf_counter() - t0, 1)
        for p in psutil.process_iter(["pid", "uids", "cmdline", "memory_info"]):
            try:
                info = p.info
                if info["pid"] == me or info["uids"] is None or info["uids"].real != uid:
                    continue
                cmd = info["cmdline"] or []
                if not cmd or not RAY_LIKE.search(" ".join(cmd)):
                    continue
                rss = info["memory_info"].rss
                name = _name(cmd)
                rec = peaks.setdefault(info["pid"], {"name": name, "peak_rss": 0, "names": set(),
                                                     "first_seen_s": now, "peak_at_s": now})
                rec["names"].add(name)
                rec["last_seen_s"] = now
                if _rank(name) > _rank(rec["name"]):
                    rec["name"] = name
                if rss > rec["peak_rss"]:
                    rec["peak_rss"], rec["peak_at_s"] = rss, now
            except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
                continue
        stop.wait(interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file with the per-process peaks")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- command to run")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command after --")
    peaks: dict = {}
    stop = threading.Event()
    th = threading.Thread(target=sample_forever, args=(peaks, stop, args.interval), daemon=True)
    th.start()
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    by_role: dict[str, list[int]] = defaultdict(list)
    for rec in peaks.values():
        rec["names"] = sorted(rec["names"])
        # a pooled worker that hosted several roles is reported under its most specific one
        by_role[rec["name"]].append(rec["peak_rss"])
    print(f"command exit code {rc}, wall {wall:.1f}s; peak RSS per role (processes, max, sum of peaks):")
    for role, vals in sorted(by_role.items(), key=lambda kv: -max(kv[1])):
        print(f"  {role:40s} {len(vals):3d}  max {max(vals) / 2**20:8.1f} MiB  sum {sum(vals) / 2**20:8.1f} MiB")
    with open(args.out, "w") as f:
        json.dump({"command": cmd, "exit_code": rc, "wall_seconds": wall,
                   "processes": {str(k): v for k, v in peaks.items()}}, f, indent=1)
    return rc


if __name__ == "__main__":
    sys.exit(main())
