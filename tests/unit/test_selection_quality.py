"""Selection-quality benchmark and the text-encoder fine-tune job, on a tiny BERT (no Ray, seconds).

The benchmark's --dry-run-tiny runs every selector, the effort scores, fine-tunes, evaluation and
the table on a synthetic data set; the job's local strategy is checked against the engine's loss
and against a reload of its exported adapter. The 2-worker DDP/DeepSpeed path is in
tests/ray/test_finetune_textrec.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.llm import textrec as te
from engine.errors import ConfigError, ResumeError
from jobs import finetune_textrec as ftr


def _load_benchmark():
    """benchmarks/ is a folder of scripts, not a package: load the module from its file."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_quality.py"
    spec = importlib.util.spec_from_file_location("selection_quality", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("selection_quality", mod)
    spec.loader.exec_module(mod)
    return mod


sq = _load_benchmark()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sq.make_tiny_dataset(tmp_path_factory.mktemp("sq-tiny"), n_users=96)


def _tc(enc, **kw) -> dict:
    return {"model": str(enc), "max_len_user": 48, "max_len_item": 8, "n_negatives": 4, "epochs": 2,
            "batch_size": 8, "lr": 2e-2, **kw}


@pytest.mark.timeout(180)
def test_dry_run_tiny_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "bench"
    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "1"]) == 0
    results = sorted(p for p in (out / "results").glob("*.json") if not p.name.endswith(".valid.json"))
    assert len(results) == len(sq.METHODS) * 2 + 2 + 1  # every (method, seed), full-data per seed, zero-shot
    assert all(p.with_suffix(".valid.json").exists() for p in results)
    md = (out / "table.md").read_text()
    test_md, valid_md = md.split("## Validation period")
    for m in (*sq.METHODS, "full-data", "zero-shot"):
        assert f"| {m} |" in test_md and f"| {m} |" in valid_md
    rows = list(__import__("csv").DictReader(open(out / "table.csv")))
    assert {r["split"] for r in rows} == {"test", "valid"}
    by = {(r["method"], r["metric"]): r for r in rows if r["split"] == "test"}
    assert by[("random", "ndcg@20")]["rel_diff_vs_random"] == ""
    d = by[("dealrec", "ndcg@20")]
    assert float(d["ci_low"]) <= float(d["rel_diff_vs_random"]) <= float(d["ci_high"])
    assert 0 < float(d["p_value"]) <= 1
    assert (out / "table.png").stat().st_size > 1000
    # the component table: dealrec vs greedy is the ratio of the two rows' means (same seeds, users)
    for name, what in (("greedy", "strata"), ("full-data", "the selection itself")):
        line = next(x for x in md.splitlines() if x.startswith(f"| {name} | {what}"))
        want = float(d["mean"]) / float(by[(name, "ndcg@20")]["mean"]) - 1
        assert line.split("|")[-2].strip().startswith(f"{100 * want:+.1f}%")
    for name in ("influence-only", "effort-only"):
        assert f"| {name} | the " in md
    eff = pq.read_table(out / "effort.parquet")
    assert eff.num_rows == 160 and np.all(eff.column("effort").to_numpy() > 0)
    # subsets have the budget; the walltime full-data run used a time budget
    rec = json.loads((out / "results" / "dealrec__seed0.json").read_text())
    assert rec["n_train"] == 24 and rec["users"] == 160
    full = json.loads((out / "results" / "full-data__seed0.json").read_text())
    assert full["n_train"] == 160 and full["time_budget_s"] is not None
    # the same users for every run (paired comparisons)
    u0 = np.load(out / "results" / "random__seed0.npz")["user_ids"]
    assert np.array_equal(u0, np.load(out / "results" / "greedy__seed1.npz")["user_ids"])

    # both periods' numbers are what the fine-tune job's own evaluation gives for the saved adapter
    cfg = sq.config_from_args(sq.build_parser().parse_args(["--dry-run-tiny", "--out", str(out)]))
    run = out / "runs" / "dealrec__seed1"
    for split, suffix in (("test", ".json"), ("valid", ".valid.json")):
        ft = ftr.TextFinetuneConfig(data=cfg.data, out=str(run), sample_ids=[0], textrec=cfg.textrec(1),
                                    split=split, eval_seed=0, ks=cfg.ks)
        want = ftr.evaluate_adapter(ft, run / ftr.ADAPTER_DIR)
        got = json.loads((out / "results" / f"dealrec__seed1{suffix}").read_text())
        assert got["users"] == want["users"] == 160
        for k, v in got["metrics"].items():
            assert v == pytest.approx(want[k], abs=1e-12), (split, k)
        z = np.load(out / "results" / f"dealrec__seed1{suffix.replace('.json', '.npz')}")
        assert np.array_equal(z["user_ids"], np.asarray(want["user_ids"], dtype=str))
        assert np.allclose(z["ndcg@20"], want["per_user"]["ndcg@20"])

    capsys.readouterr()
    before = (out / "table.csv").read_text()
    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "1"]) == 0
    log = capsys.readouterr().out
    assert log.count("done before, skipped") == len(results)
    assert (out / "table.csv").read_text() == before

    # a run finished without its validation result (e.g. before --valid existed) gets it from the
    # saved adapter, without retraining; the table is unchanged
    v = out / "results" / "greedy__seed0.valid.json"
    want = v.read_text()
    v.unlink()
    train_json = (out / "runs" / "greedy__seed0" / ftr.TRAIN_FILE).stat().st_mtime_ns
    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "1"]) == 0
    log = capsys.readouterr().out
    assert "greedy seed 0: trained before; validation period evaluated" in log
    assert log.count("done before, skipped") == len(results) - 1
    assert json.loads(v.read_text())["metrics"] == json.loads(want)["metrics"]
    assert (out / "runs" / "greedy__seed0" / ftr.TRAIN_FILE).stat().st_mtime_ns == train_json
    assert (out / "table.csv").read_text() == before
    # ... and says what to do when the adapter to evaluate is gone
    v.unlink()
    import shutil

    shutil.rmtree(out / "runs" / "greedy__seed0" / "adapter")
    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "greedy seed 0 has a test result but no adapter" in err and "--no-valid" in err

    assert sq.main(["--dry-run-tiny", "--out", str(out), "--seeds", "0", "1", "--budget", "30"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bench_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        sq.BenchConfig(data=str(tmp_path), out=str(tmp_path), budget=10, ratio=0.1, methods=("dealrec", "magic"),
                       full_data="never", seeds=(1, 1), prompt="poems")
    msg = str(e.value)
    for word in ("exactly one of budget", "magic", "include 'random'", "full_data", "seeds", "--scores",
                 "textrec: prompt='poems'"):
        assert word in msg
    with pytest.raises(ConfigError) as e:
        sq.BenchConfig(data=str(tmp_path), out=str(tmp_path), budget=10, methods=("random",), tune_lams=(0.1,))
    assert "give both grids or neither" in str(e.value) and "needs 'dealrec'" in str(e.value)
    with pytest.raises(ConfigError, match="tune: lams="):
        sq.BenchConfig(data=str(tmp_path), out=str(tmp_path), budget=10, methods=("random", "dealrec"),
                       scores="s.parquet", tune_lams=(-1.0,), tune_groups=(5,))


def test_pool_is_seeded_and_scores_are_restricted(tiny, tmp_path):
    data, enc, scores = tiny
    cfg = sq.BenchConfig(data=str(data), out=str(tmp_path), budget=8, pool=40, scores=str(scores), model=str(enc))
    ids = sq.candidate_ids(cfg, 96)
    assert len(ids) == 40 and np.array_equal(ids, np.unique(ids)) and np.array_equal(ids, sq.candidate_ids(cfg, 96))
    s = sq.load_prune_scores(str(scores), ids, 96)
    full = pq.read_table(scores).column("influence").to_numpy()
    np.testing.assert_array_equal(s["influence"], full[ids])


def test_sharded_loss_with_one_rank_is_train_loss(tiny):
    data, enc, _ = tiny
    model = te.build_model(_tc(enc, init_lora_weights=False))
    from engine.data.schema import read_items, read_samples

    cat = te.Catalogue.from_titles(read_items(data).column("title").to_pylist())
    s = read_samples(data).slice(0, 8)
    h, t = s.column("history").to_pylist(), np.asarray(s.column("target").to_pylist())
    t[3] = t[5]  # a duplicate target is masked in both
    b = te.collate_train(model.tokenizer, cat, h, t, model.cfg)
    with torch.no_grad():
        torch.testing.assert_close(ftr.sharded_train_loss(model, b, b["target_groups"], rank=0, world=1),
                                   te.train_loss(model, b))


def test_finetune_local_exports_reloadable_adapter_and_resumes(tiny, tmp_path):
    data, enc, _ = tiny
    cfg = ftr.TextFinetuneConfig(data=str(data), out=str(tmp_path / "ft"), sample_ids=list(range(0, 96, 2)),
                                 textrec=_tc(enc), strategy="local", ks=(5, 10), max_eval_users=40)
    res = ftr.fit(cfg, log=None)
    assert res["trained"] and res["evaluated"]
    tr = res["train"]
    assert tr["n_train"] == 48 and tr["optimizer_steps"] == 2 * (48 // 8) and len(tr["train_losses"]) == 2
    assert all(np.isfinite(tr["train_losses"]))
    out = Path(cfg.out)
    assert (out / "adapter" / "adapter_config.json").exists()
    m = json.loads((out / "metrics.json").read_text())
    pu = ftr.read_per_user(out)
    assert m["users"] == 40 and len(pu["user_ids"]) == 40
    np.testing.assert_allclose(pu["ndcg@10"].mean(), m["ndcg@10"])
    # the exported adapter reproduces the metrics; the pretrained model alone does not carry them
    again = ftr.evaluate_adapter(cfg, out / "adapter")
    assert again["ndcg@10"] == pytest.approx(m["ndcg@10"])
    with pytest.raises(Exception):
        ftr.load_adapter(te.build_model(_tc(enc)), tmp_path)
    # rerun: nothing to do; another eval config: evaluate only; another training config: refused
    res2 = ftr.fit(cfg, log=None)
    assert not res2["trained"] and not res2["evaluated"]
    cfg_eval = ftr.TextFinetuneConfig(**{**cfg.to_dict(), "ks": [5]})
    res3 = ftr.fit(cfg_eval, log=None)
    assert not res3["trained"] and res3["evaluated"] and "ndcg@10" not in res3["metrics"]
    cfg_lr = ftr.TextFinetuneConfig(**{**cfg.to_dict(), "textrec": _tc(enc, lr=1e-3)})
    with pytest.raises(ResumeError, match="--overwrite"):
        ftr.fit(cfg_lr, log=None)


def test_time_budget_stops_training(tiny, tmp_path):
    data, enc, _ = tiny
    cfg = ftr.TextFinetuneConfig(data=str(data), out=str(tmp_path / "tb"), all_samples=True,
                                 textrec=_tc(enc, epochs=50), strategy="local", time_budget_s=1e-6, split="none")
    res = ftr.fit(cfg, log=None)
    assert res["train"]["stopped_by_time_budget"] and res["train"]["optimizer_steps"] == 1
    assert res["metrics"] is None


def test_finetune_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        ftr.TextFinetuneConfig(data=str(tmp_path), out=str(tmp_path), strategy="horovod", zero_stage=3,
                               selected="x.parquet", all_samples=True, split="train", max_eval_users=0,
                               textrec={"lora_r": 0, "model": str(tmp_path)})
    msg = str(e.value)
    for word in ("strategy", "zero_stage", "exactly one of", "split", "max_eval_users", "lora_r"):
        assert word in msg
    with pytest.raises(ConfigError, match="multiple of workers"):
        ftr.TextFinetuneConfig(data="d", out="o", all_samples=True, strategy="deepspeed", workers=3,
                               textrec={"model": str(sq.make_tiny_dataset(tmp_path / "t", n_users=8)[1]),
                                        "batch_size": 8})


def test_text_effort_scorer_matches_engine_any_micro_batch(tiny):
    from actors.effort import EffortScorer
    from engine.data.schema import read_items, read_samples

    data, enc, _ = tiny
    cfg = te.TextRecConfig(**_tc(enc))
    titles = read_items(data).column("title").to_pylist()
    s = read_samples(data).slice(10, 12)
    batch = {"sample_id": np.asarray(s.column("sample_id").to_pylist()),
             "history": np.asarray(s.column("history").to_pylist(), dtype=object),
             "target": np.asarray(s.column("target").to_pylist())}
    a = EffortScorer("textrec", {"config": cfg.to_dict()}, titles, micro_batch_size=5)(dict(batch))
    b = EffortScorer("textrec", {"config": cfg.to_dict()}, str(data), micro_batch_size=12)(dict(batch))
    ref = te.effort_scores(te.build_model(cfg), te.Catalogue.from_titles(titles), s)
    np.testing.assert_array_equal(a["sample_id"], batch["sample_id"])
    np.testing.assert_allclose(a["effort"], ref, rtol=1e-4)
    np.testing.assert_allclose(b["effort"], ref, rtol=1e-4)


def test_alignment_scores_equal_the_per_sample_definition_and_drive_the_align_row(tiny, tmp_path):
    """dealrec-align's score g_bar . grad L_s / n, from a prune run's saved surrogate, equals
    the same quantity built from per-sample autograd gradients; the benchmark's dealrec-align
    row trains on dealrec's selection over it; a run without surrogate is refused."""
    import shutil

    import torch

    from engine.data.schema import read_samples
    from engine.influence import flatten_params, trainable_params
    from engine.selection import SelectionConfig, select
    from engine.surrogate import SurrogateConfig, load_surrogate, make_batches, save_surrogate, surrogate_loss, train_surrogate

    data, enc, scores = tiny
    samples = read_samples(data)
    n = samples.num_rows
    torch.manual_seed(0)
    model, _ = train_surrogate(samples, 60, SurrogateConfig(hidden=8, n_heads=2, n_blocks=1, max_len=6, dropout=0.0,
                                                            negatives=4, epochs=2, batch_size=16, log_every=0),
                               log=lambda s: None)
    run = tmp_path / "run"
    save_surrogate(model, model.cfg, run / "surrogate")
    shutil.copy(scores, run / "scores.parquet")
    cfg = sq.BenchConfig(data=str(data), out=str(tmp_path / "bench"), budget=12, seeds=(0,), methods=("random", sq.ALIGN),
                         scores=str(run / "scores.parquet"), model=str(enc), batch_size=8, epochs=1, groups=4,
                         zero_shot=False, full_data="skip", n_boot=100, ks=(5, 10, 20),
                         textrec_overrides={"max_len_user": 48, "max_len_item": 8, "n_negatives": 4})
    (tmp_path / "bench").mkdir()
    ids = np.array([2, 3, 7, 11, 29, 90])
    got = sq.alignment_scores(cfg, ids, log=lambda s: None)

    m = load_surrogate(run / "surrogate").double()
    params = trainable_params(m)
    grads = []
    for b in make_batches(samples, batch_size=1, max_len=6):
        gs = torch.autograd.grad(surrogate_loss(m, b).sum(), list(params.values()), allow_unused=True)
        grads.append(flatten_params([x if x is not None else torch.zeros_like(p) for x, p in zip(gs, params.values())]))
    G = torch.stack(grads)  # [n, m] per-sample gradients, rows in sample_id order
    want = (G[ids] @ G.mean(0)).numpy() / n
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-9)  # float32 surrogate vs float64 oracle

    (tmp_path / "bench" / sq.ALIGN_FILE).unlink()
    sq.run_benchmark(cfg, log=lambda s: None)
    all_ids = np.arange(n)
    align = pq.read_table(tmp_path / "bench" / sq.ALIGN_FILE).column("alignment").to_numpy()
    eff = pq.read_table(tmp_path / "bench" / sq.EFFORT_FILE).column("effort").to_numpy()
    pick = select("dealrec", {"influence": align, "effort": eff},
                  SelectionConfig(method="dealrec", budget=12, lam=cfg.lam, groups=4, seed=0), n=n).indices
    trained = json.loads((tmp_path / "bench" / "runs" / f"{sq.ALIGN}__seed0" / ftr.CONFIG_FILE).read_text())
    assert sorted(trained["config"]["sample_ids"]) == sorted(all_ids[pick].tolist())
    assert f"| {sq.ALIGN} |" in (tmp_path / "bench" / "table.md").read_text()

    bad = sq.BenchConfig(data=str(data), out=str(tmp_path / "bench2"), budget=5, methods=("random", sq.ALIGN),
                         scores=str(tmp_path / "scores.parquet"))
    (tmp_path / "bench2").mkdir()
    with pytest.raises(sq.DataError, match="surrogate"):
        sq.alignment_scores(bad, ids, log=lambda s: None)
