"""Ray Tune over lambda x K for the text-encoder backend: grid, validation metrics, best, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.selection import select
from jobs import finetune_textrec as ftr
from jobs import tune_textrec as tt

from tests.ray.test_finetune_textrec import _tiny


def _cfg(tmp: Path, data: Path, enc: Path, **kw) -> tt.TextTuneConfig:
    tc = {"model": str(enc), "max_len_user": 48, "max_len_item": 8, "epochs": 1, "batch_size": 8, "lr": 2e-2}
    return tt.TextTuneConfig(**{"data": str(data), "out": str(tmp / "tune"), "budget": 16, "lams": (0.0, 3.0),
                                "groups": (2,), "textrec": tc, "val_users": 20, **kw})


def test_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        tt.TextTuneConfig(data="d", out="o", budget=4, ratio=0.1, lams=(-1.0,), groups=(0,), metric="mrr")
    msg = str(e.value)
    for part in ("lams=", "groups=", "exactly one of budget", "metric="):
        assert part in msg


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_grid_reports_validation_metrics_picks_best_and_resumes(ray_cluster, tmp_path):
    data, enc = _tiny(tmp_path / "tiny")
    n = 64
    ids = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(0)
    scores = {"influence": rng.normal(size=n), "effort": rng.random(n)}
    cfg = _cfg(tmp_path, data, enc)
    with pytest.raises(ConfigError, match="budget=100 exceeds"):  # refused before any trial runs
        tt.tune_lambda_k(_cfg(tmp_path, data, enc, budget=100), ids, scores, log=lambda s: None)
    assert not (tmp_path / "tune" / tt.TUNE_FILE).exists()

    res = tt.tune_lambda_k(cfg, ids, scores, log=lambda s: None)
    rows = res["trials"]
    assert [(r["lam"], r["groups"]) for r in rows] == [(0.0, 2), (3.0, 2)] and all(r["error"] is None for r in rows)
    for r in rows:
        d = Path(cfg.out) / tt.TRIALS_DIR / f"lam{r['lam']:g}_K{r['groups']}"
        # the trial trained on exactly the dealrec subset of its lambda and was evaluated on validation users
        want = select("dealrec", scores, cfg.selection(r["lam"], r["groups"]), n=n).indices
        got = json.loads((d / ftr.CONFIG_FILE).read_text())
        assert sorted(got["config"]["sample_ids"]) == sorted(ids[want].tolist())
        assert got["config"]["split"] == "valid"
        m = json.loads((d / ftr.METRICS_FILE).read_text())
        assert r["ndcg@20"] == pytest.approx(m["ndcg@20"]) and r["users"] == m["users"] == 20
    best = max(rows, key=lambda r: (r["ndcg@20"], -r["lam"]))
    assert res["best"] == {"lam": best["lam"], "groups": best["groups"], "metric": "ndcg@20", "value": best["ndcg@20"]}
    # the two lambdas select different subsets here (otherwise the search would be vacuous)
    a, b = (set(select("dealrec", scores, cfg.selection(lam, 2), n=n).indices.tolist()) for lam in (0.0, 3.0))
    assert a != b

    lines: list[str] = []
    again = tt.tune_lambda_k(cfg, ids, scores, log=lines.append)
    assert again["best"] == res["best"] and "done before" in lines[0]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_selection_quality_uses_the_tuned_lambda_and_k(ray_cluster, tmp_path, capsys):
    import importlib.util
    import sys

    sq = sys.modules.get("selection_quality")
    if sq is None:
        path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_quality.py"
        spec = importlib.util.spec_from_file_location("selection_quality", path)
        sq = importlib.util.module_from_spec(spec)
        sys.modules["selection_quality"] = sq
        spec.loader.exec_module(sq)
    out = tmp_path / "bench"
    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "--methods", "random", "dealrec",
                    "--no-zero-shot", "--full-data", "skip", "--tune-lam", "0", "3", "--tune-groups", "2", "5"]) == 0
    t = json.loads((out / "tune" / tt.TUNE_FILE).read_text())
    assert len(t["trials"]) == 4
    best = t["best"]
    # the dealrec row trained on the subset of the best (lambda, K)
    bench = json.loads((out / "bench.json").read_text())["config"]
    eff = __import__("pyarrow.parquet", fromlist=["x"]).read_table(out / "effort.parquet").to_pandas()
    scores = sq.load_prune_scores(bench["scores"], np.arange(160), 160)
    scores["effort"] = eff.sort_values("sample_id")["effort"].to_numpy()
    from engine.selection import SelectionConfig

    want = select("dealrec", scores, SelectionConfig(method="dealrec", budget=24, lam=best["lam"],
                                                     groups=best["groups"], hard_prune=0.1, seed=0), n=160).indices
    got = json.loads((out / "runs" / "dealrec__seed0" / ftr.CONFIG_FILE).read_text())["config"]["sample_ids"]
    assert sorted(got) == sorted(want.tolist())
    md = (out / "table.md").read_text()
    assert f"selection lambda {best['lam']:g}, K {best['groups']}" in md and "Ray Tune grid" in md
