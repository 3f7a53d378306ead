"""engine.compare: the method and component tables against seed_pooled on hand-picked slices."""

import math

import numpy as np
import pytest

from engine.bootstrap import seed_pooled
from engine.compare import (
    ALIGN,
    FULL_DATA,
    ZERO_SHOT,
    MethodRuns,
    component_rows,
    csv_rows,
    markdown_components,
    markdown_rows,
    method_rows,
    plot_rows,
)
from engine.errors import DealrecError

USERS = np.array(["u0", "u1", "u2", "u3", "u4", "u5"])


def _runs(seeds, base, shift, rng):
    m = np.clip(base[None, :] + shift + 0.05 * rng.standard_normal((len(seeds), len(base))), 0, 1)
    return MethodRuns(seeds=list(seeds), per_user={"ndcg@20": m, "recall@20": m / 2},
                      records=[{"n_train": 64, "train_seconds": 1.5, "optimizer_steps": 6} for _ in seeds],
                      user_ids=USERS)


@pytest.fixture
def runs():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, len(USERS))
    return {"random": _runs([0, 1, 2], base, 0.0, rng), "dealrec": _runs([0, 1, 2], base, 0.05, rng),
            "greedy": _runs([1, 2], base, 0.02, rng), ALIGN: _runs([0, 1, 2], base, 0.04, rng),
            ZERO_SHOT: _runs([0], base, -0.05, rng), "el2n": MethodRuns(seeds=[], per_user={})}


def test_method_rows_are_mean_std_and_seed_pooled_vs_reference(runs):
    rows = method_rows(runs, ["ndcg@20", "recall@20"], n_boot=300)
    assert [r["method"] for r in rows] == ["random", "dealrec", "greedy", ALIGN, ZERO_SHOT]  # el2n: no runs
    d = rows[1]["stats"]["ndcg@20"]
    per_seed = runs["dealrec"].per_user["ndcg@20"].mean(1)
    assert d["mean"] == pytest.approx(per_seed.mean()) and d["std"] == pytest.approx(per_seed.std(ddof=1))
    want = seed_pooled(runs["random"].per_user["ndcg@20"], runs["dealrec"].per_user["ndcg@20"], n_boot=300, seed=0)
    assert d["rel_diff"] == want["rel_diff"] and d["p_value"] == want["p_value"] and d["ci_low"] == want["ci_low"]
    g = rows[2]["stats"]["ndcg@20"]  # greedy: seeds 1, 2 only, paired with random's seeds 1, 2
    want = seed_pooled(runs["random"].per_user["ndcg@20"][[1, 2]], runs["greedy"].per_user["ndcg@20"], n_boot=300,
                       seed=0)
    assert g["rel_diff"] == want["rel_diff"] and g["seeds"] == 2
    z = rows[4]["stats"]["ndcg@20"]  # zero-shot: one run against every random seed
    want = seed_pooled(runs["random"].per_user["ndcg@20"], np.repeat(runs[ZERO_SHOT].per_user["ndcg@20"], 3, 0),
                       n_boot=300, seed=0)
    assert z["rel_diff"] == want["rel_diff"] and z["std"] == 0.0
    assert "rel_diff" not in rows[0]["stats"]["ndcg@20"]  # the reference itself
    assert rows[1]["n_train"] == 64 and rows[1]["train_s"] == 1.5


def test_component_rows_pair_dealrec_with_each_ablation(runs):
    rows = component_rows(runs, ["ndcg@20"], n_boot=200)
    assert [r["ablation"] for r in rows] == ["greedy", ALIGN]  # only the ablations that ran
    want = seed_pooled(runs["greedy"].per_user["ndcg@20"], runs["dealrec"].per_user["ndcg@20"][[1, 2]], n_boot=200,
                       seed=0)
    assert rows[0]["stats"]["ndcg@20"]["rel_diff"] == want["rel_diff"] and rows[0]["seeds"] == 2
    assert component_rows({k: v for k, v in runs.items() if k != "dealrec"}, ["ndcg@20"]) == []


def test_other_users_are_refused(runs):
    runs["dealrec"].user_ids = USERS[::-1]
    with pytest.raises(DealrecError, match="other users than random"):
        method_rows(runs, ["ndcg@20"], n_boot=50)
    with pytest.raises(DealrecError, match="other users than dealrec"):
        component_rows(runs, ["ndcg@20"], n_boot=50)


def test_markdown_csv_and_plot(runs, tmp_path):
    rows = method_rows(runs, ["ndcg@20"], n_boot=100)
    md = markdown_rows(rows, ["ndcg@20"])
    assert md[0].startswith("| method | seeds |") and len(md) == 2 + len(rows)
    assert "| random | 3 | 64 | 2 |" in md[2] and md[2].rstrip().endswith("ref |")
    st = rows[1]["stats"]["ndcg@20"]
    assert f"{100 * st['rel_diff']:+.1f}%" in md[3] and f"(p={st['p_value']:.3f})" in md[3]
    comp = markdown_components(component_rows(runs, ["ndcg@20"], n_boot=100), ["ndcg@20"])
    assert any(line.startswith("| greedy |") for line in comp) and markdown_components([], ["ndcg@20"]) == []
    flat = csv_rows({"test": rows}, ["ndcg@20"])
    assert len(flat) == len(rows) and flat[1]["method"] == "dealrec" and flat[1]["rel_diff_vs_random"] == st["rel_diff"]
    assert flat[0]["rel_diff_vs_random"] is None
    plot_rows(rows, "ndcg@20", tmp_path / "t.png", title="t")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert not math.isnan(st["rel_diff"]) and FULL_DATA not in [r["method"] for r in rows]


def test_load_runs_reads_finished_seeds_and_refuses_other_users(tmp_path):
    import json

    from engine.compare import load_runs

    def run(name, seed, users, vals, epochs_done=1):
        d = tmp_path / f"{name}__seed{seed}"
        d.mkdir()
        np.savez(d / "metrics-test.per_user.npz", user_ids=np.array(users), **{"ndcg@20": np.array(vals)})
        (d / "finetune.json").write_text(json.dumps({"n_train": 8, "epochs_done": epochs_done, "train_seconds": 2.0,
                                                     "optimizer_steps": 3}))

    run("random", 0, ["a", "b"], [0.1, 0.2])
    run("random", 1, ["a", "b"], [0.3, 0.4], epochs_done=0)
    run("dealrec", 1, ["a", "b"], [0.5, 0.6])  # seed 0 not finished: a partial row
    runs = load_runs(tmp_path, {"random": [0, 1], "dealrec": [0, 1]}, "test")
    assert runs["random"].seeds == [0, 1] and runs["dealrec"].seeds == [1]
    np.testing.assert_array_equal(runs["random"].per_user["ndcg@20"], [[0.1, 0.2], [0.3, 0.4]])
    assert [r["n_train"] for r in runs["random"].records] == [8, 0]  # no epoch trained: 0 samples seen
    assert load_runs(tmp_path, {"random": [0]}, "valid")["random"].seeds == []
    run("greedy", 0, ["a", "b"], [0.1, 0.2])
    run("greedy", 1, ["b", "a"], [0.1, 0.2])
    with pytest.raises(DealrecError, match="greedy seed 1 was evaluated on other users than seed 0"):
        load_runs(tmp_path, {"greedy": [0, 1]}, "test")
