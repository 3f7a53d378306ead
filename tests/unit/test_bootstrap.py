"""Paired bootstrap: hand and analytic cases (identical arrays, clear shifts, normal-theory widths)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.bootstrap import paired_bootstrap, seed_pooled
from engine.errors import ConfigError


def test_identical_arrays_give_zero_and_p_one():
    a = np.random.default_rng(0).random(300)
    r = paired_bootstrap(a, a.copy(), n_boot=500)
    assert r["rel_diff"] == 0 and r["diff"] == 0
    assert r["ci_low"] <= 0 <= r["ci_high"]
    assert r["ci_low"] == r["ci_high"] == 0  # every resample has d* = 0 exactly
    assert r["p_value"] == 1.0
    assert r["users"] == 300 and r["seeds"] == 1 and r["n_boot"] == 500


def test_clear_shift_excludes_zero():
    rng = np.random.default_rng(1)
    a = rng.random(400)
    b = a + 0.2 + 0.01 * rng.standard_normal(400)
    r = paired_bootstrap(a, b, n_boot=1000)
    assert r["ci_low"] > 0 and r["diff_ci_low"] > 0
    assert r["rel_diff"] == pytest.approx((b.mean() - a.mean()) / a.mean())
    assert r["ci_low"] <= r["rel_diff"] <= r["ci_high"]
    assert r["p_value"] == pytest.approx(2 / 1001)  # no resample with d* <= 0: the floor of the estimator
    worse = paired_bootstrap(b, a, n_boot=1000)
    assert worse["ci_high"] < 0 and worse["p_value"] == r["p_value"]


def test_constant_shift_is_exact_in_the_difference():
    """b = a + c: every resample's difference is exactly c (pairing cancels the user spread)."""
    a = np.random.default_rng(2).random(200)
    r = paired_bootstrap(a, a + 0.05, n_boot=300)
    assert r["diff_ci_low"] == pytest.approx(0.05) and r["diff_ci_high"] == pytest.approx(0.05)
    # the relative CI only reflects the spread of mean(a*)
    assert r["ci_low"] < 0.05 / a.mean() < r["ci_high"]


def test_width_matches_normal_theory():
    """For n users, the CI of mean(b-a) is ~ +-1.96 sd(b-a)/sqrt(n)."""
    rng = np.random.default_rng(3)
    n = 2000
    a = rng.random(n)
    b = a + rng.normal(0.0, 0.3, n)
    r = paired_bootstrap(a, b, n_boot=4000, seed=7)
    half = 1.959964 * np.std(b - a, ddof=0) / np.sqrt(n)
    assert (r["diff_ci_high"] - r["diff_ci_low"]) / 2 == pytest.approx(half, rel=0.1)
    assert r["diff_ci_low"] < r["diff"] < r["diff_ci_high"]


def test_no_effect_p_is_not_small_on_average():
    """Under the null (exchangeable a/b) the p-values are roughly uniform: few below 0.05."""
    rng = np.random.default_rng(4)
    ps = []
    for _ in range(40):
        x = rng.random(150)
        noise = rng.normal(0, 0.1, 150)
        ps.append(paired_bootstrap(x, x + noise, n_boot=400, seed=int(rng.integers(1000)))["p_value"])
    assert np.mean(np.asarray(ps) < 0.05) <= 0.15
    assert 0.3 < np.mean(ps) < 0.7


def test_seed_and_determinism():
    rng = np.random.default_rng(5)
    a, b = rng.random(100), rng.random(100)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3)["ci_low"] != paired_bootstrap(a, b, seed=4)["ci_low"]


def test_seed_pooled_one_seed_equals_paired():
    rng = np.random.default_rng(6)
    a, b = rng.random(120), rng.random(120) + 0.1
    assert seed_pooled([a], [b], n_boot=300, seed=2) == paired_bootstrap(a, b, n_boot=300, seed=2)


def test_seed_pooled_means_and_joint_resampling():
    rng = np.random.default_rng(7)
    a = rng.random((3, 250))
    b = a + 0.1
    r = seed_pooled(a, b, n_boot=400)
    assert r["mean_a"] == pytest.approx(a.mean()) and r["mean_b"] == pytest.approx(b.mean())
    assert r["seeds"] == 3 and r["users"] == 250
    # joint resampling keeps the pairing across seeds: the difference is exactly 0.1 in every resample
    assert r["diff_ci_low"] == pytest.approx(0.1) and r["diff_ci_high"] == pytest.approx(0.1)
    # three copies of one seed: same means and CIs as that seed alone
    one = rng.random(250)
    two = one + rng.normal(0, 0.2, 250)
    rep = seed_pooled([one] * 3, [two] * 3, n_boot=300, seed=1)
    single = paired_bootstrap(one, two, n_boot=300, seed=1)
    for k in ("mean_a", "mean_b", "rel_diff", "ci_low", "ci_high", "p_value"):
        assert rep[k] == pytest.approx(single[k])


def test_zero_reference_gives_nan_relative():
    r = paired_bootstrap(np.zeros(50), np.ones(50), n_boot=100)
    assert np.isnan(r["rel_diff"]) and np.isnan(r["ci_low"])
    assert r["diff"] == 1.0 and r["p_value"] < 0.05


def test_bad_input_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        paired_bootstrap([1.0, 2.0], [1.0], n_boot=0, ci=95)
    msg = str(e.value)
    assert "same users" in msg and "n_boot" in msg and "ci=" in msg
    with pytest.raises(ConfigError, match="nan"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ConfigError, match="different numbers of users"):
        seed_pooled([[1.0, 2.0], [1.0]], [[1.0, 2.0], [1.0, 2.0]])
    with pytest.raises(ConfigError, match="same seeds"):
        seed_pooled(np.ones((2, 5)), np.ones((3, 5)))
