"""End-to-end: the prune job's main on real Games (a slice) and on small synthetic data.

Resume, determinism, config refusal and an interrupted run (SIGKILL mid-effort) are
checked against an uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.errors import ConfigError, ResumeError
from tests.e2e.conftest import start_and_kill_after_shards

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
FAST = ["--surrogate-epochs", "2", "--ihvp-max-iter", "10", "--influence-actors", "1", "--effort-actors", "1",
        "--effort-batch-size", "16", "--influence-batch-size", "32"]


def selected_ids(run: Path) -> np.ndarray:
    return pq.read_table(run / "selected.parquet").column("sample_id").to_numpy()


def prune_args(data, out, *extra):
    from jobs.prune import add_arguments
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--data", str(data), "--out", str(out), *FAST, *extra])


def run_job(data, out, *extra, cache):
    from jobs.prune import config_from_args, run_prune

    cfg = config_from_args(prune_args(data, out, "--llm-cache", str(cache), *extra))
    return run_prune(cfg, log=lambda m: None)


@pytest.fixture(scope="module")
def llm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("llm-cache")


@pytest.mark.realdata
def test_prune_games_slice_writes_every_output(ray_cluster, games_slice, tmp_path, llm_cache):
    out = tmp_path / "run"
    man = run_job(games_slice, out, "--budget", "32", "--lam", "0.3", "--groups", "10", "--prompt", "games",
                  "--baseline-scores", "el2n", cache=llm_cache)
    n = 300
    scores = pq.read_table(out / "scores.parquet").to_pandas()
    assert list(scores.sample_id) == list(range(n))
    for col in ("influence", "effort", "el2n", "score"):
        assert np.isfinite(scores[col]).all(), col
    assert (scores.effort > 0).all() and scores.influence.std() > 0
    sel = selected_ids(out)
    assert len(sel) == 32 and len(np.unique(sel)) == 32
    assert set(scores.group[scores.sample_id.isin(sel)]) <= set(range(10))
    recs = json.loads((out / "fewshot.json").read_text())
    assert [r["sample_id"] for r in recs] == sorted(sel.tolist())
    assert all(r["instruction"] and r["output"] for r in recs)
    assert "game products" in recs[0]["input"]
    stages = man["stages"]
    for s in ("surrogate", "ihvp", "surrogate_scores", "effort", "select", "report"):
        assert stages[s]["done"] and stages[s]["wall_s"] >= 0, s
    assert stages["ihvp"]["rel_residual"] >= 0
    assert (out / "report" / "index.html").exists()
    assert man["versions"]["torch"] and man["config"]["selection"]["budget"] == 32


def test_rerun_skips_stages_and_is_deterministic(ray_cluster, synthetic_small, tmp_path, llm_cache):
    out = tmp_path / "run"
    man1 = run_job(synthetic_small, out, "--budget", "40", "--groups", "8", cache=llm_cache)
    first = selected_ids(out)
    stamps = {s: man1["stages"][s]["finished_at"] for s in man1["stages"]}
    shard_mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.parquet")}
    man2 = run_job(synthetic_small, out, "--budget", "40", "--groups", "8", cache=llm_cache)
    assert {s: man2["stages"][s]["finished_at"] for s in man2["stages"]} == stamps
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").rglob("*.parquet")} == shard_mtimes
    np.testing.assert_array_equal(selected_ids(out), first)
    # a fresh run folder, same seed -> identical selection and scores
    out2 = tmp_path / "run2"
    run_job(synthetic_small, out2, "--budget", "40", "--groups", "8", cache=llm_cache)
    np.testing.assert_array_equal(selected_ids(out2), first)
    a, b = (pq.read_table(o / "scores.parquet").to_pandas() for o in (out, out2))
    np.testing.assert_allclose(a[["influence", "effort"]], b[["influence", "effort"]], rtol=1e-6, atol=1e-12)
    assert "el2n" not in a.columns and "grand" not in a.columns  # baselines only where asked for
    # a changed selection config is refused, then recomputed alone with --overwrite
    with pytest.raises(ResumeError, match="select"):
        run_job(synthetic_small, out, "--budget", "40", "--groups", "8", "--lam", "2.0", cache=llm_cache)
    man3 = run_job(synthetic_small, out, "--budget", "40", "--groups", "8", "--lam", "2.0", "--overwrite",
                   cache=llm_cache)
    for s in ("surrogate", "ihvp", "surrogate_scores", "effort"):
        assert man3["stages"][s]["finished_at"] == stamps[s], s
    assert man3["stages"]["select"]["finished_at"] >= stamps["select"]


def test_config_errors_are_reported_together_before_any_work(tmp_path):
    from jobs.prune import config_from_args

    args = prune_args(tmp_path / "missing", tmp_path / "out", "--budget", "0", "--groups", "0", "--lam", "-1",
                      "--method", "nope", "--solver", "bogus")
    with pytest.raises(ConfigError) as e:
        config_from_args(args)
    msg = str(e.value)
    for needle in ("budget", "groups", "lam", "nope", "bogus", "dealrec prepare"):
        assert needle in msg, needle
    assert not (tmp_path / "out").exists()


def test_baseline_score_columns_follow_the_method_and_the_flag(tmp_path):
    from jobs.prune import config_from_args

    data = tmp_path / "data"
    data.mkdir()

    def cols(*extra):
        return config_from_args(prune_args(data, tmp_path / "o", *extra)).surrogate_columns

    assert cols() == ("influence",)
    assert cols("--method", "ccs") == cols("--method", "el2n") == ("influence", "el2n")
    assert cols("--method", "grand") == ("influence", "grand")
    assert cols("--baseline-scores", "grand", "el2n", "el2n") == ("influence", "el2n", "grand")
    with pytest.raises(SystemExit):  # argparse names the allowed choices
        cols("--baseline-scores", "forgetting")


def test_influence_compile_flag_is_parsed_and_checked(tmp_path):
    from jobs.prune import config_from_args

    data = tmp_path / "data"
    data.mkdir()
    assert config_from_args(prune_args(data, tmp_path / "o", "--influence-compile")).scale.influence_compile is True
    assert config_from_args(prune_args(data, tmp_path / "o", "--no-influence-compile")).scale.influence_compile is False
    with pytest.raises(ConfigError) as e:
        config_from_args(prune_args(data, tmp_path / "o", "--influence-compile", "--surrogate-loss", "full",
                                    "--influence-method", "fd"))
    assert "--surrogate-loss sampled" in str(e.value) and "--influence-method is 'fd'" in str(e.value)


@pytest.mark.slow  # torch.compile in every actor: minutes on 2 cores (the default suite stays < 15 min)
def test_compiled_influence_actors_give_the_same_scores(ray_cluster, synthetic_small, tmp_path, llm_cache):
    """--influence-compile: every surrogate actor compiles the jvp pass once; scores unchanged."""
    runs = {}
    for name, extra in (("eager", ()), ("compiled", ("--influence-compile",))):
        run_job(synthetic_small, tmp_path / name, "--budget", "40", "--method", "influence-only", *extra,
                cache=llm_cache)
        runs[name] = pq.read_table(tmp_path / name / "scores.parquet").to_pandas().sort_values("sample_id")
    a, b = runs["eager"], runs["compiled"]
    assert a["sample_id"].tolist() == b["sample_id"].tolist()
    np.testing.assert_allclose(b["influence"], a["influence"], rtol=1e-4, atol=1e-6 * a["influence"].abs().max())


def test_budget_larger_than_data_refused_before_work(ray_cluster, synthetic_small, tmp_path, llm_cache):
    with pytest.raises(ConfigError, match="budget"):
        run_job(synthetic_small, tmp_path / "run", "--budget", "100000", cache=llm_cache)
    assert not (tmp_path / "run" / "surrogate").exists()


@pytest.mark.slow  # ~2 min: a whole prune killed and rerun (tests/cluster/test_faults.py keeps a driver kill in the default tier)
def test_killed_run_resumes_without_rescoring(ray_cluster, synthetic_small, tmp_path, llm_cache):
    ref = tmp_path / "ref"
    run_job(synthetic_small, ref, "--budget", "40", cache=llm_cache)
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    own = ("--score-cache", str(tmp_path / "cache-killed"))  # not the ref's cache (beside both): all would hit
    cmd = [sys.executable, str(ROOT / "jobs" / "prune.py"), "--data", str(synthetic_small), "--out", str(out),
           "--budget", "40", "--llm-cache", str(llm_cache), *own, *FAST]
    shards = out / "shards" / "effort"
    start_and_kill_after_shards(cmd, env, shards)
    done_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}
    assert 2 <= len(done_before) < 8
    assert not (out / "selected.parquet").exists()
    man = run_job(synthetic_small, out, "--budget", "40", *own, cache=llm_cache)
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("*.parquet")}
    assert {k: after[k] for k in done_before} == done_before  # finished shards were not rescored
    assert man["stages"]["effort"]["shards_skipped"] == len(done_before)
    assert man["stages"]["effort"]["rows_written"] == 240 - sum(
        pq.read_metadata(shards / k).num_rows for k in done_before)
    np.testing.assert_array_equal(selected_ids(out), selected_ids(ref))


def test_best_config_from_tune_sets_the_selection(tmp_path):
    from jobs.prune import config_from_args

    data = tmp_path / "data"
    data.mkdir()
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"selection": {"method": "ccs", "budget": 77, "lam": 0.7, "groups": 12,
                                              "hard_prune": 0.05, "seed": 4}}))
    cfg = config_from_args(prune_args(data, tmp_path / "out", "--ratio", "0.5", "--best-config", str(best)))
    s = cfg.selection
    assert (s.method, s.budget, s.ratio, s.lam, s.groups, s.hard_prune, s.seed) == ("ccs", 77, None, 0.7, 12, 0.05, 4)
    best.write_text(json.dumps({"selection": {"lamda": 1}}))
    with pytest.raises(ConfigError, match="lamda"):
        config_from_args(prune_args(data, tmp_path / "out", "--best-config", str(best)))
