"""The resumable shard runner: exactly once, skip-if-done, same result for any pool/batch size."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.data.schema import PreparedWriter, sample_files

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


class ReversingScorer:
    """Deterministic score per row; returns rows reversed (scorers may reorder)."""

    def __init__(self, offset):
        import ray

        self.offset = ray.get(offset) if isinstance(offset, ray.ObjectRef) else offset

    def __call__(self, batch):
        sid = batch["sample_id"][::-1].astype(np.int64)
        lens = np.array([len(h) for h in batch["history"]])[::-1]
        return {"sample_id": sid, "score": sid * 2.0 + lens + self.offset}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    rng = np.random.default_rng(0)
    w = PreparedWriter(root, rows_per_file=37)
    hist = [rng.integers(0, 50, rng.integers(0, 6)).astype(np.int32) for _ in range(200)]
    w.add_samples([f"u{i}" for i in range(200)], hist, rng.integers(0, 50, 200))
    w.write_items(np.arange(50), [f"t{i}" for i in range(50)])
    w.close({"source": "test"})
    return root, hist


def expected(hist, offset):
    return np.arange(200) * 2.0 + np.array([len(h) for h in hist]) + offset


@pytest.mark.parametrize("actors,batch", [(1, 16), (2, 50)])
def test_every_sample_scored_once(ray_cluster, sharded, tmp_path, actors, batch):
    from actors.shards import read_shards, score_shards

    root, hist = sharded
    files = sample_files(root)
    assert len(files) == 6
    ref = ray_cluster.put(3.0)
    st = score_shards(files, tmp_path, ReversingScorer, constructor_args=(ref,), output_columns=("sample_id", "score"),
                      batch_size=batch, num_actors=actors, num_cpus=0.5, progress=lambda m: None)
    assert st.shards_written == 6 and st.rows_written == 200
    t = read_shards(files, tmp_path)
    np.testing.assert_array_equal(t.column("sample_id").to_numpy(), np.arange(200))
    np.testing.assert_allclose(t.column("score").to_numpy(), expected(hist, 3.0))


def test_resume_skips_finished_shards(ray_cluster, sharded, tmp_path):
    from actors.shards import read_shards, score_shards, shard_output_path

    root, hist = sharded
    files = sample_files(root)
    kw = dict(constructor_args=(1.0,), output_columns=("sample_id", "score"), num_cpus=0.5, progress=lambda m: None)
    score_shards(files, tmp_path, ReversingScorer, **kw)
    keep = shard_output_path(tmp_path, files[0])
    mtime = keep.stat().st_mtime_ns
    shard_output_path(tmp_path, files[3]).unlink()
    st = score_shards(files, tmp_path, ReversingScorer, **kw)
    assert (st.shards_skipped, st.shards_written, st.rows_written) == (5, 1, pq.read_metadata(files[3]).num_rows)
    assert keep.stat().st_mtime_ns == mtime
    np.testing.assert_allclose(read_shards(files, tmp_path).column("score").to_numpy(), expected(hist, 1.0))
    st = score_shards(files, tmp_path, ReversingScorer, **kw)
    assert st.shards_written == 0 and st.shards_skipped == 6


class DroppingScorer(ReversingScorer):
    """Loses the last row of every batch: the shard check must refuse the output."""

    def __call__(self, batch):
        out = super().__call__(batch)
        return {k: v[:-1] for k, v in out.items()}


def test_inline_runner_writes_the_pools_shards(ray_cluster, sharded, tmp_path):
    """score_shards_inline (an update's small delta, in the job's process): the same scorer class and
    ObjectRef arguments as the pool, the same shard files value for value, finished shards skipped,
    torch's thread count restored, a lost row refused with nothing written for that shard."""
    import torch

    from actors.shards import score_shards, score_shards_inline, shard_output_path

    root, hist = sharded
    files = sample_files(root)
    ref = ray_cluster.put(2.0)
    kw = dict(constructor_args=(ref,), output_columns=("sample_id", "score"), batch_size=16, progress=lambda m: None)
    score_shards(files, tmp_path / "pool", ReversingScorer, num_cpus=0.5, **kw)
    threads = torch.get_num_threads()
    st = score_shards_inline(files, tmp_path / "inline", ReversingScorer, threads=1, **kw)
    assert (st.shards_written, st.rows_written, st.shards_skipped) == (6, 200, 0)
    assert torch.get_num_threads() == threads
    for f in files:
        assert pq.read_table(shard_output_path(tmp_path / "inline", f)).equals(
            pq.read_table(shard_output_path(tmp_path / "pool", f)))
    shard_output_path(tmp_path / "inline", files[2]).unlink()
    st = score_shards_inline(files, tmp_path / "inline", ReversingScorer, **kw)
    assert (st.shards_written, st.shards_skipped) == (1, 5)
    from engine.errors import DealrecError

    with pytest.raises(DealrecError, match="do not match the input"):
        score_shards_inline(files[:1], tmp_path / "drop", DroppingScorer, **kw)
    assert not list((tmp_path / "drop").glob("*.parquet")) and torch.get_num_threads() == threads


class SlowScorer(ReversingScorer):
    """Each batch takes longer than the stall timeout, but the actor is alive and working."""

    def __call__(self, batch):
        import time

        time.sleep(8.0)
        return super().__call__(batch)


def test_slow_live_batches_are_not_stalls(ray_cluster, sharded, tmp_path):
    """A batch slower than the stall timeout is not a stall while its actor beats (it was: #18 pool-8000 run).

    The timeout (6 s) is above a worker process's start (before __init__ runs, nothing can beat)."""
    from actors.shards import read_shards, score_shards

    root, hist = sharded
    files = sample_files(root)[:2]
    msgs = []
    st = score_shards(files, tmp_path, SlowScorer, constructor_args=(0.0,), output_columns=("sample_id", "score"),
                      batch_size=100, num_actors=1, num_cpus=0.5, stall_warn_s=0, stall_timeout_s=6.0,
                      progress=msgs.append)
    assert st.shards_written == 2
    np.testing.assert_allclose(read_shards(files, tmp_path).column("score").to_numpy(), expected(hist, 0.0)[:74])


class SecondPerBatchScorer(ReversingScorer):
    def __call__(self, batch):
        import time

        time.sleep(1.0)
        return super().__call__(batch)


def test_progress_inside_one_shard(ray_cluster, sharded, tmp_path):
    """One shard is one block: nothing comes back until all its rows are scored. The rows the
    actors have scored so far are logged meanwhile (from the heartbeat actor's per-batch count)."""
    import re

    from actors.shards import score_shards

    root, _ = sharded
    files = sample_files(root)[:1]  # 37 rows, 8 batches of 5, ~1 s each
    msgs = []
    st = score_shards(files, tmp_path, SecondPerBatchScorer, constructor_args=(0.0,),
                      output_columns=("sample_id", "score"), batch_size=5, num_actors=1, num_cpus=0.5,
                      stall_warn_s=0, stall_timeout_s=60.0, progress=msgs.append, progress_s=2.0)
    assert st.rows_written == 37
    counts = [int(m.group(1)) for m in (re.search(r"\] (\d+)/37 samples scored by the actors", x) for x in msgs) if m]
    assert counts and counts == sorted(counts) and 0 < counts[0] < 37, msgs


def test_a_shard_slower_than_ray_datas_no_progress_guard_still_finishes(ray_cluster, sharded, tmp_path):
    """One shard is one Ray Data block: a shard that takes longer than Ray Data's no-progress guard
    (DataContext.execution_no_progress_timeout_s, 30 min by default; 3 s here) moved no block in
    that window and failed with ExecutionTimeoutError (the #20 pool-8000 textrec effort, 8,000
    samples in one shard). The heartbeat watchdog is the stall guard; Ray's is off for the pool."""
    import ray

    from actors.shards import read_shards, score_shards

    root, hist = sharded
    files = sample_files(root)[:1]
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 3.0
    try:
        st = score_shards(files, tmp_path, SlowScorer, constructor_args=(0.0,), output_columns=("sample_id", "score"),
                          batch_size=20, num_actors=1, num_cpus=0.5, stall_warn_s=0, stall_timeout_s=30.0,
                          progress=lambda m: None)
    finally:
        ctx.execution_no_progress_timeout_s = before
    assert st.shards_written == 1
    np.testing.assert_allclose(read_shards(files, tmp_path).column("score").to_numpy(), expected(hist, 0.0)[:37])


def test_pool_that_cannot_start_still_fails_as_a_stall(ray_cluster, sharded, tmp_path):
    """No actor can be placed (more CPUs than the cluster has): no beats, so the watchdog fires."""
    from actors.shards import StallError, score_shards

    root, _ = sharded
    with pytest.raises(StallError, match="no batch scored for .* and no actor working"):
        score_shards(sample_files(root)[:1], tmp_path, ReversingScorer, constructor_args=(0.0,),
                     output_columns=("sample_id", "score"), num_actors=1, num_cpus=64, stall_warn_s=0,
                     stall_timeout_s=3.0, stall_knobs="--effort-cpus", progress=lambda m: None)
    assert not list(tmp_path.glob("*.parquet"))
