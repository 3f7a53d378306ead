"""Fault tolerance of the shard runner on a real multi-node Ray cluster (one machine).

A ``ray.cluster_utils.Cluster`` (head with 0 CPUs + 3 one-CPU worker nodes, built for
this module only) runs ``actors.shards.score_shards`` with a deterministic scorer that
sleeps per batch, so a run lasts long enough to break it:

* a worker node removed mid-run (SIGKILL of its raylet, workers and object store) ->
  the run completes and every sample is scored exactly once;
* the driver SIGKILLed mid-run -> a rerun writes only the missing shards (finished ones
  keep their mtime) and the outputs are complete and exactly-once;
* an actor process that dies inside ``__call__`` -> restarted and its batch retried
  under the configured ``max_restarts`` / ``max_task_retries``, which the progress line
  names; with both at 0 the same crash fails the run (so the settings do reach Ray).

This file is also the driver script of the driver-kill test:
    python tests/cluster/test_faults.py --address IP:PORT --data DIR --out DIR --sleep 0.15
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
N_SAMPLES = 480
ROWS_PER_FILE = 40  # -> 12 shards
BATCH = 10
# Worker processes import the project (actors.shards) from here; an existing PYTHONPATH
# comes first, so a patched copy of the project can be tested without an install.
PYTHONPATH = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)


class SlowScorer:
    """score = 2 * sample_id + len(history); sleeps per batch; returns rows reversed.

    ``mark_dir``: each actor touches ``<mark_dir>/<node_id>`` once it has scored a batch,
    so the test knows which nodes hold busy actors.
    """

    def __init__(self, sleep_s: float = 0.1, mark_dir: str | None = None):
        import ray

        self.sleep_s = sleep_s
        self.mark = Path(mark_dir) / ray.get_runtime_context().get_node_id() if mark_dir else None

    def __call__(self, batch):
        time.sleep(self.sleep_s)
        if self.mark is not None and not self.mark.exists():
            self.mark.touch()
        sid = np.asarray(batch["sample_id"], dtype=np.int64)
        lens = np.array([len(h) for h in batch["history"]], dtype=np.float64)
        return {"sample_id": sid[::-1], "score": (2.0 * sid + lens)[::-1]}


class CrashOnceScorer(SlowScorer):
    """Kills its own worker process (as an OOM kill or segfault would) in the first ``__call__`` of the run."""

    def __init__(self, marker: str):
        super().__init__(sleep_s=0.02)
        self.marker = marker

    def __call__(self, batch):
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().__call__(batch)
        os.close(fd)
        os._exit(1)


def expected_scores(data_dir: Path) -> np.ndarray:
    from engine.data.schema import read_samples

    t = read_samples(data_dir)
    return 2.0 * np.arange(t.num_rows) + np.array([len(h) for h in t.column("history").to_pylist()])


def assert_exactly_once(files, out_dir: Path, data_dir: Path) -> None:
    import pyarrow.parquet as pq

    from actors.shards import read_shards, shard_output_path

    t = read_shards(files, out_dir)
    ids = t.column("sample_id").to_numpy()
    np.testing.assert_array_equal(ids, np.arange(N_SAMPLES))  # sorted: unique and complete
    np.testing.assert_allclose(t.column("score").to_numpy(), expected_scores(data_dir))
    for f in files:  # and each output holds exactly its input's rows
        got = np.sort(pq.read_table(shard_output_path(out_dir, f), columns=["sample_id"]).column(0).to_numpy())
        want = np.sort(pq.read_table(f, columns=["sample_id"]).column(0).to_numpy())
        np.testing.assert_array_equal(got, want)


def _drive(argv: list[str]) -> int:
    """The driver-kill test's driver: connect to the cluster, score every shard, print progress."""
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sleep", type=float, default=0.15)
    a = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    import ray

    from actors.shards import score_shards
    from engine.data.schema import sample_files

    ray.init(address=a.address, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": PYTHONPATH}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    st = score_shards(sample_files(a.data), a.out, SlowScorer, constructor_args=(a.sleep,),
                      output_columns=("sample_id", "score"), batch_size=BATCH, num_actors=1, num_cpus=0.5,
                      progress=lambda m: print(m, flush=True))
    print(f"STATS skipped={st.shards_skipped} written={st.shards_written} rows={st.rows_written}", flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1:]))


# ----------------------------------------------------------------------------------------
import pytest  # noqa: E402  (the driver mode above needs neither pytest nor a test cluster)

pytestmark = [pytest.mark.ray]
N_WORKERS = 3
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 120 * 1024**2}


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs) + 3 one-CPU worker nodes; this process is connected as a driver."""
    import ray
    from ray.cloudpickle import register_pickle_by_value
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # e.g. the session `ray_cluster` of tests/ray: not this cluster
        ray.shutdown()
    # the scorers travel by value: worker processes need not import this test module
    register_pickle_by_value(sys.modules[__name__])
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "object_store_memory": 120 * 1024**2})
    try:
        for _ in range(N_WORKERS):
            c.add_node(**NODE_ARGS)
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": PYTHONPATH}})
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from engine.data.schema import PreparedWriter

    root = tmp_path_factory.mktemp("faults-data")
    rng = np.random.default_rng(7)
    w = PreparedWriter(root, rows_per_file=ROWS_PER_FILE)
    hist = [rng.integers(0, 30, rng.integers(0, 8)).astype(np.int32) for _ in range(N_SAMPLES)]
    w.add_samples([f"u{i}" for i in range(N_SAMPLES)], hist, rng.integers(0, 30, N_SAMPLES))
    w.write_items(np.arange(30), [f"t{i}" for i in range(30)])
    w.close({"source": "test_faults"})
    return root


def _restore_workers(c) -> None:
    while len(c.worker_nodes) < N_WORKERS:
        c.add_node(**NODE_ARGS)
    c.wait_for_nodes()


@pytest.mark.slow  # ~45 s plus the cluster's start on 2 cores
@pytest.mark.timeout(300)
def test_worker_node_removed_mid_run_scores_every_sample_once(cluster, data, tmp_path):
    from actors.shards import score_shards
    from engine.data.schema import sample_files

    files = sample_files(data)
    marks, out = tmp_path / "nodes", tmp_path / "out"
    marks.mkdir()
    removed: dict = {}
    stop = threading.Event()

    def remove_a_busy_node():
        # wait until an actor has scored on some worker node and a shard or two is out,
        # then kill that node without a graceful shutdown (as a lost VM would go)
        workers = {n.node_id: n for n in cluster.worker_nodes}
        first = None
        while not stop.is_set():
            busy = [workers[m.name] for m in marks.iterdir() if m.name in workers]
            done = len(list(out.glob("part-*.parquet"))) if out.exists() else 0
            first = first or (time.monotonic() if busy else None)
            if busy and (done >= 1 or time.monotonic() - first > 2.0):
                removed.update(node=busy[0].node_id, shards_done=done)
                cluster.remove_node(busy[0], allow_graceful=False)
                return
            time.sleep(0.05)

    lines: list[str] = []
    thread = threading.Thread(target=remove_a_busy_node, daemon=True)
    thread.start()
    try:
        # max_task_retries=-1 (Ray Data's own default): a node that dies without a graceful
        # shutdown stays "temporarily unavailable" until the GCS health check declares it
        # dead, and each resubmission in that window spends a retry; 3 were used up
        # before that here (ActorUnavailableError), 10 were enough.
        st = score_shards(files, out, SlowScorer, constructor_args=(0.1, str(marks)),
                          output_columns=("sample_id", "score"), batch_size=BATCH, num_actors=2, num_cpus=0.5,
                          max_restarts=3, max_task_retries=-1, progress=lines.append)
    finally:
        stop.set()
        thread.join(10)
    try:
        assert removed, "no worker node was removed: the run ended before the remover saw a busy node"
        assert removed["shards_done"] < len(files), f"the node was removed only after every shard was done: {removed}"
        assert st.shards_written == len(files) and st.rows_written == N_SAMPLES, st
        assert_exactly_once(files, out, data)
    finally:
        _restore_workers(cluster)


@pytest.mark.timeout(300)
def test_driver_killed_mid_run_resumes_from_finished_shards(cluster, data, tmp_path):
    from engine.data.schema import sample_files

    files = sample_files(data)
    out = tmp_path / "out"
    cmd = [sys.executable, __file__, "--address", cluster.address, "--data", str(data), "--out", str(out),
           "--sleep", "0.15"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": PYTHONPATH}
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 180
        while len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, f"driver exited early ({proc.returncode}):\n{log1.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no shard written in time:\n{log1.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    spread_s = (max(finished.values()) - min(finished.values())) / 1e9
    assert 2 <= len(finished) < len(files), (
        f"kill came too late to test a resume: {len(finished)} of {len(files)} shards done, written within "
        f"{spread_s:.2f}s of each other. If they all appeared at once, the input files reached the actor pool "
        "as one block (Ray 2.60's read_parquet bin-packs small files into ~128 MiB read tasks), so no shard "
        "is finished before the whole run is: read one block per file in actors/shards.py")

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    todo = len(files) - len(finished)
    assert f"scoring {todo} shards" in r.stdout and f"{len(finished)} already done" in r.stdout, r.stdout
    assert f"STATS skipped={len(finished)} written={todo}" in r.stdout, r.stdout
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime, f"{name} was rewritten by the rerun"
    assert_exactly_once(files, out, data)


@pytest.mark.timeout(300)
def test_actor_restart_and_task_retry_are_configured_and_logged(cluster, data, tmp_path):
    from actors.shards import score_shards
    from engine.data.schema import sample_files

    files = sample_files(data)
    lines: list[str] = []
    marker = tmp_path / "crashed"
    st = score_shards(files, tmp_path / "out", CrashOnceScorer, constructor_args=(str(marker),),
                      output_columns=("sample_id", "score"), batch_size=BATCH * 4, num_actors=1, num_cpus=0.5,
                      max_restarts=2, max_task_retries=2, progress=lines.append)
    assert marker.exists(), "the scorer never crashed: the test did not exercise a restart"
    assert any("max_restarts=2" in m and "max_task_retries=2" in m for m in lines), lines
    assert st.rows_written == N_SAMPLES
    assert_exactly_once(files, tmp_path / "out", data)

    # the same crash with fault tolerance off fails the run: the settings reach the actors
    # (Ray Data's own default for an actor pool is infinite restarts and retries)
    marker.unlink()
    with pytest.raises(Exception) as err:
        score_shards(files, tmp_path / "out-no-ft", CrashOnceScorer, constructor_args=(str(marker),),
                     output_columns=("sample_id", "score"), batch_size=BATCH * 4, num_actors=1, num_cpus=0.5,
                     max_restarts=0, max_task_retries=0, progress=lambda m: None)
    assert marker.exists()
    assert "died" in str(err.value).lower() or "actor" in str(err.value).lower(), err.value
