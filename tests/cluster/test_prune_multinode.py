"""The REAL prune job on a multi-node cluster of small nodes, through ``ray job submit``.

``cluster/local.sh`` runs a 0-CPU head and two 1-CPU worker nodes on this machine; the
job is submitted with the DEFAULT pool settings (auto-sized actor pools, default stall
timeouts) on a synthetic set of 16 shards:

* it completes (before: each 1-CPU node held a 0.875-CPU actor and no read task fitted
  anywhere, so the influence stage hung without a word);
* a worker node SIGKILLed during the influence stage, and in another run during the
  effort stage: the job completes, every sample_id is scored once, and the scores equal
  the undisturbed run's;
* a stage starved on purpose (another driver holds every worker CPU) fails with the stall
  error naming the knobs instead of hanging.

Slow tier (about 10 minutes on 2 cores): ``make test-slow`` or
``pytest -m slow tests/cluster/test_prune_multinode.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from localcluster import ROOT, LocalCluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

USERS = 4000
ROWS_PER_FILE = 256  # -> 16 shards
# Surrogate and solver kept short (this is about scheduling, not accuracy); pool settings default.
FAST = ["--budget", "64", "--surrogate-epochs", "2", "--ihvp-max-iter", "10"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mn") / "data"
    subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--format", "synthetic", "--users", str(USERS),
                    "--rows-per-file", str(ROWS_PER_FILE), "--out", str(out)], check=True, cwd=ROOT,
                   capture_output=True)
    assert len(list((out / "samples").glob("*.parquet"))) == 16
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("lc"))
    c.start(2)
    yield c
    c.stop()


def _scores(run: Path):
    t = pq.read_table(run / "scores.parquet")
    return {c: t.column(c).to_numpy() for c in t.column_names}


@pytest.fixture(scope="module")
def baseline(cluster, data, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("base") / "run"
    r = cluster.submit(["jobs/prune.py", "--data", str(data), "--out", str(out), *FAST],
                       submission_id=f"base-{time.time_ns()}", wait=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "succeeded" in r.stdout
    assert "per node 1+1" in r.stdout  # one 1-CPU actor on each 1-CPU node
    return _scores(out)


def _check_equal(run: Path, base: dict):
    got = _scores(run)
    np.testing.assert_array_equal(got["sample_id"], np.arange(USERS))  # every sample once
    for col in ("influence", "effort", "score", "group"):
        np.testing.assert_allclose(got[col], base[col], rtol=1e-6, atol=0, err_msg=col)
    sel = pq.read_table(run / "selected.parquet").column("sample_id").to_numpy()
    assert len(sel) == 64 and len(np.unique(sel)) == 64


def test_default_job_completes(baseline):
    assert np.array_equal(baseline["sample_id"], np.arange(USERS))
    assert np.isfinite(baseline["influence"]).all() and np.isfinite(baseline["effort"]).all()


@pytest.mark.parametrize("stage,shard_dir", [("influence", "shards/surrogate"), ("effort", "shards/effort")])
def test_node_killed_mid_stage(cluster, data, baseline, tmp_path, stage, shard_dir):
    out = tmp_path / "run"
    sid = f"kill-{stage}-{time.time_ns()}"
    r = cluster.submit(["jobs/prune.py", "--data", str(data), "--out", str(out), *FAST], submission_id=sid,
                       wait=False)
    assert r.returncode == 0, r.stderr
    shards = out / shard_dir
    st = cluster.wait_job(sid, poll=0.5, until=lambda: shards.is_dir() and any(shards.glob("*.parquet")))
    assert st == "RUNNING", f"the job ended ({st}) before the {stage} stage wrote a shard:\n{cluster.logs(sid)[-3000:]}"
    n_done = len(list(shards.glob("*.parquet")))
    assert n_done < 16, f"{stage} finished before the kill; nothing was tested"
    cluster.kill(2)
    try:
        st = cluster.wait_job(sid, timeout=900)
        logs = cluster.logs(sid)
        assert st == "SUCCEEDED", logs[-5000:]
        _check_equal(out, baseline)
    finally:
        cluster.add()  # back to two worker nodes for the next test


STARVE = """
import sys, time, ray
ray.init(address=sys.argv[1])
@ray.remote(num_cpus=1)
class Hog:
    def ping(self):
        return 1
hogs = [Hog.remote() for _ in range(int(sys.argv[2]))]
ray.get([h.ping.remote() for h in hogs])
print("ready", flush=True)
time.sleep(3600)
"""


def test_starved_stage_fails_with_clear_error(cluster, data, tmp_path):
    """Another driver holds every worker CPU: the influence pool can never start. The job
    must say what it waits for and then fail naming the knobs, not hang."""
    hog = subprocess.Popen([sys.executable, "-c", STARVE, cluster.gcs, "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=cluster.env)
    try:
        assert hog.stdout.readline().strip() == "ready", hog.stderr.read()
        out = tmp_path / "run"
        sid = f"starve-{time.time_ns()}"
        t0 = time.monotonic()
        r = cluster.submit(["jobs/prune.py", "--data", str(data), "--out", str(out), *FAST,
                            "--method", "influence-only", "--stall-warn-s", "10", "--stall-timeout-s", "30"],
                           submission_id=sid, wait=False)
        assert r.returncode == 0, r.stderr
        st = cluster.wait_job(sid, timeout=600)
        logs = cluster.logs(sid)
        assert st == "FAILED", logs[-4000:]
        assert time.monotonic() - t0 < 400
        assert "no batch scored for" in logs and "WARNING" in logs  # the warning came first
        assert "pending demands" in logs and "'CPU': 1.0" in logs  # what it waits for
        assert "--influence-cpus" in logs and "--stall-timeout-s" in logs  # what to change
        assert "Traceback" not in logs.split("no batch scored for")[-1][:200]
        assert not (out / "shards/surrogate").exists() or not any((out / "shards/surrogate").glob("*.parquet"))
    finally:
        hog.kill()
        hog.wait()
