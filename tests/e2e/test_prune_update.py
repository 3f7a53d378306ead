"""`dealrec prune --update RUN0` (#21 item 2) on small synthetic days: yesterday is a simulated
previous day of today (``engine.data.simulate``: some users held back, some shortened by their
last item, the rest unchanged). RUN0 prunes yesterday and fills the effort score cache; the
update prunes today from RUN0 and scores effort only for new and changed samples."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.daily import STATUS, diff_days, read_sample_keys
from engine.errors import ConfigError
from tests.e2e.conftest import start_and_kill_after_shards
from tests.e2e.test_prune_job import FAST, run_job

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
BUDGET = ("--budget", "40")


@pytest.fixture(scope="module")
def days(tmp_path_factory, synthetic_small):
    """(yesterday, today): today = synthetic_small (240 users in 8 files of 30)."""
    from engine.data.prepare import PrepareConfig, prepare

    y = tmp_path_factory.mktemp("days") / "yesterday"
    prepare(PrepareConfig(format="simulate-yesterday", input=str(synthetic_small), out=str(y), new_user_share=0.1,
                          changed_user_share=0.3, seed=0))
    return y, synthetic_small


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llm-cache")


@pytest.fixture(scope="module")
def run0(ray_cluster, days, llm_cache, tmp_path_factory):
    """RUN0 on yesterday with its own score cache, and a copy of that cache as RUN0 left it."""
    root = tmp_path_factory.mktemp("run0")
    out, cache = root / "run0", root / "cache"
    man = run_job(days[0], out, *BUDGET, "--score-cache", str(cache), cache=llm_cache)
    snapshot = root / "cache-after-run0"
    shutil.copytree(cache, snapshot)
    return out, cache, snapshot, man


def _effort_by_key(run: Path) -> dict[bytes, float]:
    keys = read_sample_keys(run / "sample_keys.parquet")
    s = pq.read_table(run / "scores.parquet").sort_by("sample_id")
    assert np.array_equal(s.column("sample_id").to_numpy(), keys["sample_id"])
    return {k.tobytes(): e for k, e in zip(keys["key"], s.column("effort").to_numpy())}


def _status(run0: Path, run1: Path) -> np.ndarray:
    a, b = read_sample_keys(run0 / "sample_keys.parquet"), read_sample_keys(run1 / "sample_keys.parquet")
    return diff_days(a["key"], a["user_hash"], b["key"], b["user_hash"]).status


def test_update_rescores_changed_samples_and_reuses_unchanged(run0, days, llm_cache, tmp_path):
    r0, cache, snapshot, man0 = run0
    assert man0["stages"]["effort"]["score_cache"]["hits"] == 0  # a fresh prune fills the cache
    assert man0["stages"]["effort"]["score_cache"]["rows_in_cache"] == 210
    c = tmp_path / "cache"
    shutil.copytree(snapshot, c)
    out = tmp_path / "run1"
    man = run_job(days[1], out, *BUDGET, "--update", str(r0), "--score-cache", str(c), cache=llm_cache)
    up = man["update"]
    status = _status(r0, out)
    n_fresh = int((status != STATUS["unchanged"]).sum())
    assert up["samples"]["unchanged"] == int((status == STATUS["unchanged"]).sum()) > 100
    assert up["samples"]["changed"] > 0 and up["samples"]["new"] >= 24 and up["samples"]["total"] == 240
    # effort: the LLM scored exactly the new and changed samples (cache misses), nothing else
    eff = man["stages"]["effort"]
    assert eff["score_cache"]["misses"] == eff["rows_written"] == n_fresh
    assert eff["where"] == "driver" and n_fresh <= 256  # a small delta: in the job's process, no pool
    assert eff["score_cache"]["hits"] == 240 - n_fresh and eff["score_cache"]["conflicts"] == 0
    assert eff["score_cache"]["rows_in_cache"] == 210 + n_fresh
    assert up["effort_cache"] == {"hits": 240 - n_fresh, "misses": n_fresh}
    # unchanged samples: RUN0's effort bit for bit; changed ones: scored again (a new target)
    e0, e1 = _effort_by_key(r0), _effort_by_key(out)
    same = [k for k in e1 if k in e0]
    assert len(same) == 240 - n_fresh and all(e1[k] == e0[k] for k in same)
    # surrogate warm-started for a bounded number of steps, CG from RUN0's v, influence for all
    s = man["stages"]["surrogate"]["update"]
    assert s["mode"].startswith("warm start") and s["update_set"]["new_and_changed"] == n_fresh
    assert s["steps"] == up["surrogate_warm_start_steps"] >= 1
    ih = man["stages"]["ihvp"]["update"]
    assert ih["x0"] == "RUN0's v" and ih["warm"]["iterations"] is not None
    assert up["cg_iterations"]["cold"] == man0["stages"]["ihvp"]["iterations"]
    assert man["stages"]["surrogate_scores"]["rows_written"] == 240
    assert man["stages"]["surrogate_scores"]["where"] == "actor pool"  # every sample: not a delta
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert np.isfinite(scores[["influence", "effort", "score"]]).all().all()
    assert len(pq.read_table(out / "selected.parquet")) == 40
    # a fresh computation of today agrees (another batching: same values up to float rounding)
    fresh = tmp_path / "fresh"
    run_job(days[1], fresh, *BUDGET, "--score-cache", str(tmp_path / "empty-cache"), cache=llm_cache)
    ef = _effort_by_key(fresh)
    np.testing.assert_allclose([e1[k] for k in e1], [ef[k] for k in e1], rtol=1e-6, atol=0)


def test_changed_llm_config_invalidates_the_cache(run0, days, llm_cache, tmp_path):
    r0, _, snapshot, _ = run0
    c = tmp_path / "cache"
    shutil.copytree(snapshot, c)
    man = run_job(days[1], tmp_path / "run1", *BUDGET, "--update", str(r0), "--score-cache", str(c),
                  "--cutoff-len", "256", "--update-influence", "changed", cache=llm_cache)
    eff = man["stages"]["effort"]["score_cache"]
    assert eff["hits"] == 0 and eff["misses"] == 240 == man["stages"]["effort"]["rows_written"]
    assert sorted(p.name for p in c.iterdir()) == sorted([*(p.name for p in snapshot.iterdir()), eff["key"]])
    assert not (snapshot / eff["key"]).exists()
    # --update-influence changed: surrogate and v frozen, only new and changed samples scored
    su = man["stages"]["surrogate_scores"]
    status = _status(r0, tmp_path / "run1")
    assert su["scored"] == su["rows_written"] == int((status != STATUS["unchanged"]).sum())
    assert man["stages"]["surrogate"]["update"]["mode"] == "frozen" and man["stages"]["ihvp"]["iterations"] == 0
    i0 = dict(zip([k.tobytes() for k in read_sample_keys(r0 / "sample_keys.parquet")["key"]],
                  pq.read_table(r0 / "scores.parquet").sort_by("sample_id").column("influence").to_numpy()))
    k1 = [k.tobytes() for k in read_sample_keys(tmp_path / "run1" / "sample_keys.parquet")["key"]]
    i1 = pq.read_table(tmp_path / "run1" / "scores.parquet").sort_by("sample_id").column("influence").to_numpy()
    reused = [(i0[k] * 210 / 240, v) for k, v in zip(k1, i1) if k in i0]
    assert len(reused) == 240 - su["scored"]
    np.testing.assert_allclose([a for a, _ in reused], [b for _, b in reused], rtol=1e-12)


def test_small_delta_scored_in_process_equals_the_actor_pool(run0, days, llm_cache, tmp_path):
    """--update-influence changed: effort and influence of the new and changed samples only. Scored
    in the job's process (the default for a delta of <= --inline-max-rows) or on the actor pools
    (--inline-max-rows 0): effort bit for bit (the effort engine batches canonically), influence to
    float32 rounding (the pool's Ray Data batches bundle rows of several small shards; the surrogate's
    padded forward sums in another order), the same selection."""
    r0, _, snapshot, _ = run0
    runs = {}
    for name, extra in (("inline", ()), ("pool", ("--inline-max-rows", "0"))):
        c = tmp_path / f"cache-{name}"
        shutil.copytree(snapshot, c)
        out = tmp_path / name
        man = run_job(days[1], out, *BUDGET, "--update", str(r0), "--score-cache", str(c),
                      "--update-influence", "changed", *extra, cache=llm_cache)
        runs[name] = (out, man)
    n_fresh = int((_status(r0, runs["inline"][0]) != STATUS["unchanged"]).sum())
    for name, where in (("inline", "driver"), ("pool", "actor pool")):
        st = runs[name][1]["stages"]
        assert st["effort"]["where"] == st["surrogate_scores"]["where"] == where, name
        assert st["effort"]["rows_written"] == st["surrogate_scores"]["rows_written"] == n_fresh > 0
    assert "--inline-max-rows 256" in runs["inline"][1]["stages"]["effort"]["where_why"]
    a, b = (pq.read_table(runs[n][0] / "scores.parquet").sort_by("sample_id") for n in ("inline", "pool"))
    np.testing.assert_array_equal(a.column("effort").to_numpy(), b.column("effort").to_numpy())
    for col in ("influence", "score"):
        np.testing.assert_allclose(a.column(col).to_numpy(), b.column(col).to_numpy(), rtol=1e-6, atol=1e-12,
                                   err_msg=col)
    np.testing.assert_array_equal(*(pq.read_table(runs[n][0] / "selected.parquet").column("sample_id").to_numpy()
                                    for n in ("inline", "pool")))


def test_update_of_another_catalogue_or_surrogate_is_refused(run0, days, tmp_path, capsys):
    from engine.data.prepare import PrepareConfig, prepare
    from jobs.cli import main

    r0 = run0[0]
    other = tmp_path / "other"
    prepare(PrepareConfig(format="synthetic", out=str(other), users=60, items=50, interactions_per_user=5, seed=9))
    for data, extra, needles in ((other, (), ("catalogue", "fingerprint")),
                                 (days[1], ("--surrogate", "bert4rec"), ("surrogate.model", "'sasrec'")),
                                 (days[1], ("--update", str(tmp_path / "nope")), ("not a prune run folder",))):
        out = tmp_path / "run1"
        args = ["prune", "--data", str(data), "--out", str(out), *FAST, "--budget", "20", "--update", str(r0), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and all(n in err for n in needles), (extra, err)
        assert not out.exists() and not (tmp_path / "score-cache").exists()
    with pytest.raises(ConfigError, match="same folder"):
        run_job(days[1], r0, "--update", str(r0), cache=tmp_path)


@pytest.mark.slow  # two update runs, one killed mid-effort (~2-3 min on 2 cores)
def test_killed_update_reruns_and_scores_every_sample_once(run0, days, llm_cache, tmp_path):
    r0, _, snapshot, _ = run0
    c = tmp_path / "cache"
    shutil.copytree(snapshot, c)
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "jobs" / "prune.py"), "--data", str(days[1]), "--out", str(out), *BUDGET,
           "--update", str(r0), "--score-cache", str(c), "--llm-cache", str(llm_cache), *FAST,
           "--inline-max-rows", "0"]  # the actor pool (a small delta in-process may end before the kill)
    shards = out / "shards" / "effort"
    start_and_kill_after_shards(cmd, env, shards)
    done_before = sum(pq.read_metadata(p).num_rows for p in shards.glob("*.parquet"))
    assert not (out / "selected.parquet").exists()
    man = run_job(days[1], out, *BUDGET, "--update", str(r0), "--score-cache", str(c), cache=llm_cache)
    eff = man["stages"]["effort"]
    misses = eff["score_cache"]["lookup"]["misses"]  # recorded by the killed invocation
    assert 0 < done_before < misses
    assert eff["rows_written"] == misses - done_before  # nothing scored twice
    assert eff["score_cache"]["rows_in_cache"] == 210 + misses and eff["score_cache"]["conflicts"] == 0
    ref = tmp_path / "ref"
    c2 = tmp_path / "cache2"
    shutil.copytree(snapshot, c2)
    run_job(days[1], ref, *BUDGET, "--update", str(r0), "--score-cache", str(c2), cache=llm_cache)
    a, b = _effort_by_key(out), _effort_by_key(ref)
    assert set(a) == set(b)
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(pq.read_table(out / "selected.parquet").column("sample_id").to_numpy(),
                                  pq.read_table(ref / "selected.parquet").column("sample_id").to_numpy())
