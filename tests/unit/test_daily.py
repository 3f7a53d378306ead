"""Every day again (#21 item 2), the pure parts: day diffs, the warm start's update set, the
architecture check, the effort cache's config key, CG from x0 and the surrogate's warm start."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from engine.daily import (
    STATUS, KeyIndex, UpdateConfig, architecture_problems, diff_days, effort_cache_config, file_keys,
    read_sample_keys, update_rows, update_steps, write_sample_keys,
)
from engine.errors import ConfigError
from engine.influence.solvers import _solve_cg, solve_ihvp
from engine.score_cache import config_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _samples(rows):
    return pa.table({"sample_id": pa.array(range(len(rows)), pa.int64()),
                     "user_id": pa.array([r[0] for r in rows], pa.string()),
                     "history": pa.array([r[1] for r in rows], pa.list_(pa.int32())),
                     "target": pa.array([r[2] for r in rows], pa.int32())})


def test_diff_days_new_changed_unchanged_removed(tmp_path):
    old = file_keys(_samples([("a", [1, 2], 3), ("b", [4], 5), ("c", [], 6), ("gone", [1], 2)]))
    new = file_keys(_samples([("b", [4, 5], 7),  # changed: new target, longer history
                              ("a", [1, 2], 3),  # unchanged (another row)
                              ("c", [], 7),      # changed: new target
                              ("d", [1], 2)]))   # new user
    d = diff_days(old["key"], old["user_hash"], new["key"], new["user_hash"])
    assert d.status.tolist() == [STATUS["changed"], STATUS["unchanged"], STATUS["changed"], STATUS["new"]]
    assert d.counts() == {"unchanged": 1, "changed": 2, "new": 1, "total": 4, "removed": 1}
    write_sample_keys(tmp_path / "k.parquet", [new])
    back = read_sample_keys(tmp_path / "k.parquet")
    assert np.array_equal(back["key"], new["key"]) and np.array_equal(back["user_hash"], new["user_hash"])


def test_update_rows_replay_is_seeded_and_capped():
    status = np.array([0] * 10 + [1, 2, 1])
    rows, c = update_rows(status, 1.0, seed=3)
    assert c == {"new_and_changed": 3, "replayed_unchanged": 3, "total": 6}
    assert set(rows.tolist()) >= {10, 11, 12} and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, update_rows(status, 1.0, seed=3)[0])
    assert update_rows(status, 100.0, seed=3)[1]["replayed_unchanged"] == 10
    assert update_rows(np.zeros(5), 1.0, seed=0)[1]["total"] == 0
    assert update_steps(0, 1.0, 256) == 0 and update_steps(600, 1.0, 256) == 3 and update_steps(600, 0.5, 256) == 2
    with pytest.raises(ConfigError, match="influence"):
        UpdateConfig(influence="some")


def test_architecture_problems_name_the_field():
    base = {"model": "sasrec", "hidden": 64, "n_blocks": 2, "n_heads": 2, "max_len": 50, "lr": 1e-3}
    assert architecture_problems(base, {**base, "lr": 0.1}, old_items=9, new_items=9, where="RUN0") == []
    p = architecture_problems(base, {**base, "hidden": 32}, old_items=9, new_items=10, where="RUN0")
    assert len(p) == 2 and p[0].startswith("surrogate.hidden") and "hidden=64" in p[0] and p[1].startswith("n_items")


def test_key_index_lookup_and_add():
    k = file_keys(_samples([("a", [1], 2), ("b", [], 3)]))["key"]
    q = file_keys(_samples([("b", [], 3), ("z", [], 3)]))["key"]
    ix = KeyIndex(k, {"x": np.array([1.0, 2.0])})
    vals, found = ix.lookup(q)
    assert found.tolist() == [True, False] and vals["x"][0] == 2.0 and np.isnan(vals["x"][1])
    assert ix.add(q, {"x": np.array([9.0, 5.0])}) == 1  # first wins
    vals, found = ix.lookup(q)
    assert found.all() and vals["x"].tolist() == [2.0, 5.0]


def test_effort_cache_key_follows_llm_prompt_and_catalogue(tmp_path):
    llm = {"model": "tiny", "lora_r": 8, "seed": 0, "cache_dir": "/a", "device": "auto", "adapter": None}
    prompt = {"name": "games", "cutoff_len": 512}

    def key(**kw):
        a = {"llm": llm, "prompt": prompt, **kw}
        conf = effort_cache_config("bigrec", {"llm": a["llm"], "prompt": a["prompt"]}, catalogue=a.get("cat", "c1"),
                                   base="/x/tiny-abc")
        return config_key(conf)

    k0 = key()
    assert key(llm={**llm, "cache_dir": "/b", "device": "cpu"}) == k0  # where it is cached does not matter
    assert key(llm={**llm, "lora_r": 16}) != k0
    assert key(llm={**llm, "seed": 1}) != k0
    assert key(prompt={**prompt, "cutoff_len": 256}) != k0
    assert key(cat="c2") != k0
    # a local adapter by content: rewritten in place = another key
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_model.safetensors").write_bytes(b"1")
    k1 = key(llm={**llm, "adapter": str(ad)})
    (ad / "adapter_model.safetensors").write_bytes(b"2")
    assert key(llm={**llm, "adapter": str(ad)}) not in (k0, k1)


def _spd(m=30, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(m, m))
    a = torch.tensor(a @ a.T / m + 0.1 * np.eye(m))
    return a, torch.tensor(rng.normal(size=m))


def test_cg_warm_start_from_a_near_solution_saves_iterations():
    a, g = _spd()
    op = lambda x: a @ x  # noqa: E731
    x_cold, cold = _solve_cg(op, g, 0.0, tol=1e-8, max_iter=500)
    exact = torch.linalg.solve(a, g)
    near = 3.0 * (exact + 1e-4 * torch.randn_like(exact, generator=torch.Generator().manual_seed(1)))
    x_warm, warm = _solve_cg(op, g, 0.0, tol=1e-8, max_iter=500, x0=near)
    assert warm["converged"] and warm["iterations"] < cold["iterations"]
    assert abs(warm["x0_scale"] - 1 / 3) < 1e-3  # the start is rescaled to g's scale
    assert torch.allclose(x_warm, x_cold, rtol=1e-5, atol=1e-8)
    # the exact solution: no iteration at all; a useless start is never worse than 0 in the A-norm
    assert _solve_cg(op, g, 0.0, tol=1e-8, x0=exact)[1]["iterations"] == 0
    _, bad = _solve_cg(op, g, 0.0, tol=1e-8, max_iter=500, x0=torch.randn(30, dtype=torch.float64))
    assert bad["converged"]
    with pytest.raises(ConfigError, match="x0 has shape"):
        _solve_cg(op, g, 0.0, x0=torch.zeros(3, dtype=torch.float64))


class _Lin(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(d, dtype=torch.float64))


def _lin_loss(model, batch):
    return F.binary_cross_entropy_with_logits(batch["x"] @ model.w, batch["y"], reduction="none")


def test_solve_ihvp_reports_the_cold_reference_on_the_same_operator():
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(64, 5)))
    batches = [{"x": x, "y": torch.tensor((rng.random(64) < 0.5).astype(float))}]
    model = _Lin(5)
    g = torch.tensor(rng.normal(size=5))
    v_cold, rep_cold = solve_ihvp(model, _lin_loss, batches, g, solver="cg", damping=0.1, tol=1e-10, max_iter=50)
    v, rep = solve_ihvp(model, _lin_loss, batches, g, solver="cg", damping=0.1, tol=1e-10, max_iter=50,
                        x0=(v_cold * 2).numpy(), cold_reference=True)
    assert rep.extra["cold"]["iterations"] == rep_cold.iterations
    assert rep.iterations <= 1 and rep.extra["cold"]["rel_residual"] < 1e-8
    assert torch.allclose(v, v_cold, atol=1e-8)
    with pytest.raises(ConfigError, match="x0"):
        solve_ihvp(model, _lin_loss, batches, g, solver="lissa", damping=0.1, depth=2, x0=v_cold.numpy())


def test_train_surrogate_warm_start_and_step_bound():
    from engine.surrogate import SurrogateConfig, train_surrogate

    rng = np.random.default_rng(0)
    n, items = 64, 20
    t = _samples([(f"u{i}", rng.integers(0, items, rng.integers(1, 6)).tolist(), int(rng.integers(0, items)))
                  for i in range(n)])
    cfg = SurrogateConfig(hidden=16, n_heads=2, n_blocks=1, max_len=8, batch_size=16, epochs=1, loss="sampled",
                          negatives=8, log_every=0)
    m0, _ = train_surrogate(t, items, cfg, log=lambda s: None)
    state = {k: v.clone() for k, v in m0.state_dict().items()}
    cfg3 = SurrogateConfig(**{**cfg.to_dict(), "epochs": 5})
    m1, hist = train_surrogate(t, items, cfg3, log=lambda s: None, init_state=state, max_steps=3)
    assert len(hist) == 1  # 3 steps < one epoch of 4 batches: stopped inside epoch 1
    diff = sum(float((m1.state_dict()[k].float() - state[k].float()).abs().sum()) for k in state)
    assert diff > 0
    # one step from the warm start stays near it; a fresh init is far from it
    m2, _ = train_surrogate(t, items, cfg3, log=lambda s: None, init_state=state, max_steps=1)
    fresh = SurrogateConfig(**{**cfg.to_dict(), "seed": 5})
    m3, _ = train_surrogate(t, items, fresh, log=lambda s: None, max_steps=1)
    near = sum(float((m2.state_dict()[k].float() - state[k].float()).abs().sum()) for k in state)
    far = sum(float((m3.state_dict()[k].float() - state[k].float()).abs().sum()) for k in state)
    assert near < far
    with pytest.raises(ConfigError, match="max_steps"):
        train_surrogate(t, items, cfg, log=lambda s: None, max_steps=0)
