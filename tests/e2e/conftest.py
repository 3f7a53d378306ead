"""Fixtures for end-to-end runs of the jobs' main functions (in process, shared Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from engine.data.prepare import PrepareConfig, prepare
from engine.data.schema import PreparedWriter, atomic_dir, read_items, read_samples, read_split


def write_slice(src: Path, out: Path, n_users: int, *, rows_per_file: int = 64) -> Path:
    """The first ``n_users`` samples of a prepared folder (renumbered), all items, their valid/test rows."""
    samples = read_samples(src).slice(0, n_users)
    users = samples.column("user_id")
    items = read_items(src)
    with atomic_dir(out) as tmp:
        w = PreparedWriter(tmp, rows_per_file=rows_per_file)
        w.add_samples(users.to_pylist(), samples.column("history").to_pylist(), samples.column("target").to_numpy())
        w.write_items(items.column("item_id").to_numpy(), items.column("title").to_pylist(),
                      items.column("category").to_pylist())
        for split in ("valid", "test"):
            t = read_split(src, split)
            t = t.filter(pc.is_in(t.column("user_id"), value_set=users))
            w.write_split(split, t.column("user_id").to_pylist(), t.column("history").to_pylist(),
                          t.column("targets").to_pylist())
        w.close({"source": f"slice of {src}", "counts": {"items": items.num_rows}})
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
