"""benchmarks/daily.py's comparison, from hand-made run folders (what three `dealrec prune` runs
write): sample status from the content keys, the effort check of the unchanged samples, the
selection overlap, the stage walls and the CG iterations. The prunes themselves are tested in
tests/e2e/test_prune_update.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks import daily  # benchmarks/ is a namespace package from the repository root


def _samples(rows):
    return pa.table({"sample_id": pa.array(np.arange(len(rows)), pa.int64()),
                     "user_id": pa.array([r[0] for r in rows], pa.string()),
                     "history": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
                     "target": pa.array([r[2] for r in rows], pa.int32())})


def _run(folder: Path, table, effort, selected, stages, update=None):
    from engine.daily import file_keys, write_sample_keys

    folder.mkdir(parents=True)
    write_sample_keys(folder / "sample_keys.parquet", [file_keys(table)])
    n = table.num_rows
    pq.write_table(pa.table({"sample_id": np.arange(n)[::-1].copy(), "effort": np.asarray(effort)[::-1].copy(),
                             "influence": np.arange(n, dtype=float)[::-1].copy(),
                             "score": np.asarray(effort)[::-1] + 1.0}), folder / "scores.parquet")
    pq.write_table(pa.table({"sample_id": pa.array(selected, pa.int64())}), folder / "selected.parquet")
    (folder / "manifest.json").write_text(json.dumps({"stages": stages, **({"update": update} if update else {})}))


def test_compare_counts_days_from_keys_and_checks_unchanged_effort(tmp_path):
    old = [("u0", [1, 2], 3), ("u1", [4], 5), ("u2", [6, 7], 8), ("u3", [9], 10)]
    new = [("u0", [1, 2], 3),          # unchanged
           ("u1", [4, 5], 11),         # longer history, new target: changed
           ("u2", [6, 7], 8),          # unchanged
           ("u3", [9], 12),            # new target: changed
           ("u4", [1], 2)]             # a user absent yesterday: new
    e_new = np.array([0.5, 0.7, 0.25, 0.125, 2.0])
    e_upd = e_new.copy()
    e_upd[1] = 0.7000001                # a changed sample may differ (rescored at another model state)
    stages = {"surrogate": {"wall_s": 10.0}, "ihvp": {"wall_s": 4.0, "iterations": 40}, "effort": {"wall_s": 20.0}}
    _run(tmp_path / "run0", _samples(old), [0.5, 0.6, 0.25, 0.1], [0, 1], stages)
    _run(tmp_path / "scratch", _samples(new), e_new, [0, 1, 4], stages)
    _run(tmp_path / "update", _samples(new), e_upd, [0, 2, 4],
         {"surrogate": {"wall_s": 2.0}, "ihvp": {"wall_s": 1.0}, "effort": {"wall_s": 3.0}},
         update={"cg_iterations": {"warm": 7, "cold": None}, "effort_cache": {"hits": 2, "misses": 3}})
    res = daily.compare(tmp_path, {"run0": 30.0, "scratch": 40.0, "update": 8.0})

    assert res["samples"] == {"unchanged": 2, "changed": 2, "new": 1}
    assert res["effort_unchanged"] == {"n": 2, "bit_identical": 2, "max_rel_diff": 0.0}
    assert 0 < res["effort_changed_or_new_max_rel_diff"] < 1e-6
    assert res["selection"] == {"size": 3, "overlap": 2, "jaccard": 0.5}
    assert res["speedup_job"] == 5.0
    assert res["cg_iterations"] == {"update_warm": 7, "run0_cold": 40, "scratch_cold": 40}
    assert res["wall_s"]["update"]["surrogate"] == 2.0 and res["wall_s"]["scratch"]["select"] is None
    assert res["spearman"]["influence"] == 1.0
    md = daily.markdown(res)
    assert "| surrogate | 10.0 | 2.0 |" in md and "5.00x" in md and "2 bit-identical" in md


def test_compare_sees_unchanged_effort_that_is_not_bit_identical(tmp_path):
    rows = [("u0", [1], 2), ("u1", [3], 4)]
    stages = {"ihvp": {"iterations": 5}}
    _run(tmp_path / "run0", _samples(rows), [1.0, 2.0], [0], stages)
    _run(tmp_path / "scratch", _samples(rows), [1.0, 2.0], [0], stages)
    _run(tmp_path / "update", _samples(rows), [1.0, 2.0 + 2e-16 * 8], [0], stages)
    res = daily.compare(tmp_path, {"scratch": 1.0, "update": 1.0})
    assert res["samples"]["unchanged"] == 2
    assert res["effort_unchanged"]["bit_identical"] == 1 and res["effort_unchanged"]["max_rel_diff"] > 0


def test_compare_reads_the_named_update_run(tmp_path):
    rows = [("u0", [1], 2), ("u1", [3], 4)]
    stages = {"ihvp": {"iterations": 5}}
    _run(tmp_path / "run0", _samples(rows), [1.0, 2.0], [0], stages)
    _run(tmp_path / "scratch", _samples(rows), [1.0, 2.0], [0], stages)
    _run(tmp_path / "update", _samples(rows), [1.0, 2.0], [0], stages,
         update={"config": {"influence": "all"}, "cg_iterations": {"warm": 3}})
    _run(tmp_path / "update-changed", _samples(rows), [1.0, 2.5], [1], {"effort": {"wall_s": 1.0}},
         update={"config": {"influence": "changed"}})
    t = {"scratch": 12.0, "update": 4.0, "update-changed": 2.0}
    full, frozen = daily.compare(tmp_path, t), daily.compare(tmp_path, t, daily.UPDATE_RUNS["changed"])
    assert (full["speedup_job"], frozen["speedup_job"]) == (3.0, 6.0)
    assert (full["update_influence"], frozen["update_influence"]) == ("all", "changed")
    assert full["effort_unchanged"]["bit_identical"] == 2 and frozen["effort_unchanged"]["bit_identical"] == 1
    assert frozen["selection"]["overlap"] == 0 and frozen["cg_iterations"]["update_warm"] is None
