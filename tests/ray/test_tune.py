"""Ray Tune over lambda / K on cached scores, any backend: ASHA (bigrec) and a grid (textrec),
results table, best config, a finished search reused; a prune run of another backend refused."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.data.schema import PreparedWriter, atomic_dir


def make_tiny_data(out, *, n_users=48, n_items=30, seed=2):
    rng = np.random.default_rng(seed)
    titles = [f"item {i} " + rng.choice(["red", "blue", "star", "quest"]) for i in range(n_items)]
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=16)
        seqs = [rng.integers(0, n_items, size=rng.integers(3, 7)).tolist() for _ in range(n_users)]
        w.add_samples([f"u{u}" for u in range(n_users)], [s[:-1] for s in seqs], [s[-1] for s in seqs])
        w.write_items(np.arange(n_items), titles)
        for split in ("valid", "test"):
            su = [f"u{u}" for u in range(0, n_users, 3)]
            w.write_split(split, su, [rng.integers(0, n_items, size=4).tolist() for _ in su],
                          [rng.integers(0, n_items, size=2).tolist() for _ in su])
        w.close({"source": "test"})
    return out


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_tune_four_trials_writes_table_and_best(ray_cluster, tmp_path):
    from jobs import tune

    data = make_tiny_data(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({"sample_id": np.arange(48)[::-1].copy(), "influence": rng.normal(size=48),
                             "effort": rng.random(48)}), run / "scores.parquet")
    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    args = p.parse_args(["--run", str(run), "--data", str(data), "--samples", "4", "--budget", "16",
                         "--lam", "0.1", "0.5", "1.0", "--groups", "2", "4", "--epochs", "2", "--val-users", "6",
                         "--beams", "1", "--max-new-tokens", "6", "--batch-size", "8", "--micro-batch", "4",
                         "--cache-dir", str(tmp_path / "cache")])
    assert tune.run(args) == 0
    table = pq.read_table(run / tune.RESULTS_FILE).to_pandas()
    assert len(table) == 4 and table["error"].isna().all()
    assert set(table["lam"]) <= {0.1, 0.5, 1.0} and set(table["groups"]) <= {2, 4}
    assert (table["epochs_run"] >= 1).all() and (table["n_selected"] == 16).all()
    assert table["ndcg@20"].between(0, 1).all()
    best = json.loads((run / tune.BEST_FILE).read_text())
    assert best["selection"]["budget"] == 16 and best["lam"] in (0.1, 0.5, 1.0) and best["metric"] == "ndcg@20"
    from engine.selection import SelectionConfig

    SelectionConfig(**best["selection"]).validate(48)


def test_bad_search_space_reported_together(tmp_path):
    from engine.errors import ConfigError
    from jobs import tune

    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    args = p.parse_args(["--run", str(tmp_path), "--data", str(tmp_path), "--samples", "0", "--budget", "999",
                         "--method", "grand", "--lam", "-1"])
    _, problems = tune.check_args(args, 48, {"influence": np.zeros(48), "effort": np.zeros(48)}, tmp_path)
    assert len(problems) >= 3


def test_bad_input_fails_before_ray_starts(tmp_path, monkeypatch):
    """`dealrec tune` validates the run, data and search space before ray.init."""
    import ray

    from engine.errors import DataError
    from jobs import tune

    def no_init(*a, **k):
        raise AssertionError("ray.init was called before the input was validated")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_init)
    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    args = p.parse_args(["--run", str(tmp_path / "no-run"), "--data", str(tmp_path / "no-data")])
    with pytest.raises(DataError):
        tune.run(args)


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_textrec_grid_every_combination_once_then_reused(ray_cluster, tmp_path):
    from engine.errors import ConfigError, ResumeError
    from engine.llm.textrec import build_tiny_encoder
    from jobs import tune

    data = make_tiny_data(tmp_path / "data")
    titles = pq.read_table(data / "items.parquet").column("title").to_pylist()
    enc = build_tiny_encoder(tmp_path / "enc", titles + ["The user has purchased the following"])
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(1)
    pq.write_table(pa.table({"sample_id": np.arange(48), "influence": rng.normal(size=48), "effort": rng.random(48)}),
                   run / "scores.parquet")
    p = argparse.ArgumentParser()
    tune.add_arguments(p)
    argv = ["--run", str(run), "--data", str(data), "--backend", "textrec", "--textrec-model", str(enc),
            "--search", "grid", "--lam", "0.3", "2", "--groups", "2", "4", "--budget", "16", "--epochs", "1",
            "--val-users", "0", "--batch-size", "8", "--max-concurrent", "2"]
    args = p.parse_args(argv)
    assert tune.run(args) == 0
    table = pq.read_table(run / tune.RESULTS_FILE).to_pandas()
    assert len(table) == 4 and table["error"].isna().all()  # every (lambda, K) once
    assert sorted(zip(table["lam"], table["groups"])) == [(0.3, 2), (0.3, 4), (2.0, 2), (2.0, 4)]
    assert table["ndcg@20"].between(0, 1).all() and (table["epochs_run"] == 1).all()
    best = json.loads((run / tune.BEST_FILE).read_text())
    assert best["backend"]["name"] == "textrec" and best["search"] == "grid"
    again = tune.tune_run(args, tune.validate_inputs(args))
    assert again["reused"] and again["best"] == best  # a finished search of the same config: nothing runs
    other = p.parse_args([*argv, "--epochs", "2"])
    with pytest.raises(ResumeError, match="different config for stage"):  # another search: refused, not redone
        tune.tune_run(other, tune.validate_inputs(other))
    assert json.loads((run / tune.BEST_FILE).read_text()) == best
    (run / "manifest.json").write_text(json.dumps({"backend": {"name": "bigrec", "options": {}}}))
    with pytest.raises(ConfigError, match="computed by backend 'bigrec'"):
        tune.validate_inputs(args)
