"""Fixtures for end-to-end runs of the jobs' main functions (in process, shared Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from engine.data.prepare import PrepareConfig, prepare
from engine.data.schema import PreparedWriter, atomic_dir, read_items, read_samples, read_split


def write_slice(src: Path, out: Path, n_users: int, *, rows_per_file: int = 64) -> Path:
    """The first ``n_users`` samples of a prepared folder (renumbered) with their valid/test rows.

    The catalogue is cut to the items these users touch (re-indexed densely, titles kept),
    so that the surrogate's full softmax stays small enough for the default test suite.
    """
    samples = read_samples(src).slice(0, n_users)
    users = samples.column("user_id")
    items = read_items(src)
    splits = {}
    for split in ("valid", "test"):
        t = read_split(src, split)
        splits[split] = t.filter(pc.is_in(t.column("user_id"), value_set=users))
    used = [samples.column("target").to_numpy(), samples.column("history").combine_chunks().flatten().to_numpy()]
    for t in splits.values():
        used += [t.column("targets").combine_chunks().flatten().to_numpy(),
                 t.column("history").combine_chunks().flatten().to_numpy()]
    keep = np.unique(np.concatenate(used))
    remap = np.full(items.num_rows, -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))

    def ids(lists):
        return [remap[np.asarray(x, dtype=np.int64)].astype(np.int32) for x in lists]

    with atomic_dir(out) as tmp:
        w = PreparedWriter(tmp, rows_per_file=rows_per_file)
        w.add_samples(users.to_pylist(), ids(samples.column("history").to_pylist()),
                      remap[samples.column("target").to_numpy()])
        w.write_items(np.arange(len(keep)), [items.column("title")[int(i)].as_py() for i in keep],
                      [items.column("category")[int(i)].as_py() for i in keep])
        for split, t in splits.items():
            w.write_split(split, t.column("user_id").to_pylist(), ids(t.column("history").to_pylist()),
                          ids(t.column("targets").to_pylist()))
        w.close({"source": f"slice of {src}", "counts": {"items": int(len(keep))}})
    return out


@pytest.fixture(scope="session")
def games_slice(games_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("games")
    full = root / "full"
    prepare(PrepareConfig(format="dealrec-release", input=str(games_dir), out=str(full)))
    return write_slice(full, root / "slice", 300)


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    prepare(PrepareConfig(format="synthetic", out=str(out), users=240, items=80, interactions_per_user=6,
                          rows_per_file=30, seed=3))
    return out


def start_and_kill_after_shards(cmd: list[str], env: dict, shards: Path, n: int = 2) -> None:
    """Start a job (own process group), SIGKILL it once ``n`` effort shards are on disk."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if shards.exists() and len(list(shards.glob("*.parquet"))) >= n:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
