"""The LDS harness (engine/influence/lds.py): its statistics on hand-made cases, and an LDS near 1
for the exact influence of an L2-regularised logistic regression retrained on 50% subsets.

Convex toy: J_S(theta) = (1/|S|) sum_{i in S} L_i(theta) + (lam/2)||theta||^2 (mean over the kept
samples, as a surrogate retrain does), minimised by Newton's method in float64. Targets: the mean
loss over ALL n training samples (what g_bar targets) and the mean loss of a held-out set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.influence import directional_derivatives, mean_gradient, solve_ihvp
from engine.influence.lds import (
    attribution_from_influence,
    bootstrap_ci,
    bootstrap_diff_ci,
    ci_apart,
    format_table,
    lds,
    predicted_targets,
    rankdata,
    spearman,
    subset_indices,
    subset_masks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------ statistics by hand


def test_spearman_hand_case_with_ties():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5)
    assert np.allclose(rankdata([1, 2, 2, 3]), [1, 2.5, 2.5, 4])
    assert spearman(np.array([1, 2, 2, 3]), np.array([1, 3, 2, 4])) == pytest.approx(4.5 / np.sqrt(22.5), abs=1e-12)
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    assert np.isnan(spearman(x, np.ones(10)))


def test_spearman_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 6, 40).astype(float), rng.normal(size=40)  # many ties in a
    b[:5] = b[5]
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)


def test_bootstrap_resamples_pairs_jointly():
    x = np.arange(30.0)
    # every joint resample of a monotone relation is monotone (ties on both sides alike): CI is exactly 1
    assert bootstrap_ci(x, 2 * x + 1, n_boot=300) == (1.0, 1.0)
    assert bootstrap_ci(x, -x, n_boot=300) == (-1.0, -1.0)


def test_bootstrap_percentiles_hand_case():
    # mean of a resample of [0, 1]: 0, 0.5, 1 with probability 1/4, 1/2, 1/4. At level 0.4 the
    # 30th and 70th percentiles both fall in the 0.5 mass; at 0.95 the CI is [0, 1]
    a = np.array([0.0, 1.0])
    mean_a = lambda u, _v: float(u.mean())  # noqa: E731
    assert bootstrap_ci(a, a, stat=mean_a, n_boot=4000, level=0.4, seed=1) == (0.5, 0.5)
    assert bootstrap_ci(a, a, stat=mean_a, n_boot=4000, level=0.95, seed=1) == (0.0, 1.0)
    # seeded: the same CI twice
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=25), rng.normal(size=25)
    assert bootstrap_ci(u, v, seed=5) == bootstrap_ci(u, v, seed=5)


def test_subsets_predictions_and_table():
    idx = subset_indices(10, 3, fraction=0.5, seed=7)
    assert len(idx) == 5 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, subset_indices(10, 3, fraction=0.5, seed=7))
    masks = subset_masks(10, 6, fraction=0.5, seed=7)
    assert np.array_equal(np.flatnonzero(masks[3]), idx)
    assert len({tuple(np.flatnonzero(r)) for r in masks}) == 6
    attr = np.arange(4.0)
    m = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=bool)
    assert np.array_equal(predicted_targets(attr, m), [1.0, 5.0, 2.0])
    assert np.array_equal(attribution_from_influence(np.array([1.0, -2.0])), [-1.0, 2.0])
    r = lds(attr, m, np.array([10.0, 30.0, 20.0]), n_boot=50)
    assert r["spearman"] == pytest.approx(1.0) and r["subsets"] == 3
    assert ci_apart({"ci_low": 0.5, "ci_high": 0.7}, {"ci_low": 0.1, "ci_high": 0.4})
    assert not ci_apart({"ci_low": 0.3, "ci_high": 0.7}, {"ci_low": 0.1, "ci_high": 0.4})
    text = format_table([{"method": "a", "seconds": 12.0, "train": r, "note": "x"},
                         {"method": "b", "seconds": None, "note": "skipped"}], ["train"])
    assert "| a | +1.000 [" in text and "| 12 s | x |" in text and "| b | - | - | skipped |" in text


def test_paired_difference():
    rng = np.random.default_rng(0)
    y = rng.normal(size=60)
    good, bad = y + 0.1 * rng.normal(size=60), rng.normal(size=60)
    d = bootstrap_diff_ci(good, bad, y, n_boot=500)
    assert d["diff"] == pytest.approx(spearman(good, y) - spearman(bad, y))
    assert d["ci_low"] > 0.5
    same = bootstrap_diff_ci(good, good, y, n_boot=100)
    assert (same["diff"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------ convex toy

N, D, LAM, M = 400, 5, 0.3, 50  # LDS of exact influence 0.93-0.99 over data seeds 0-4


class LogReg(torch.nn.Module):
    def __init__(self, theta: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(theta[:D], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(theta[D:], dtype=torch.float64))


def logreg_loss(model, batch):
    return F.binary_cross_entropy_with_logits(batch["x"] @ model.w + model.b, batch["y"], reduction="none")


def _newton(x1, y, w, theta, lam):
    """argmin (1/sum w) sum_i w_i L_i + lam/2 ||theta||^2 (x1 has a bias column)."""
    n = w.sum()
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x1 @ theta)))
        g = x1.T @ (w * (p - y)) / n + lam * theta
        if np.linalg.norm(g) < 1e-12:
            break
        h = (x1 * (w * p * (1 - p))[:, None]).T @ x1 / n + lam * np.eye(len(theta))
        theta = theta - np.linalg.solve(h, g)
    return theta


def _risk(x1, y, theta):
    z = x1 @ theta
    return float(np.mean(np.logaddexp(0, z) - y * z))


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2 * N, D))
    y = (rng.random(2 * N) < 1 / (1 + np.exp(-(x @ rng.normal(size=D))))).astype(float)
    x1 = np.hstack([x, np.ones((2 * N, 1))])
    tr, va = slice(0, N), slice(N, 2 * N)
    theta = _newton(x1[tr], y[tr], np.ones(N), np.zeros(D + 1), LAM)
    masks = subset_masks(N, M, fraction=0.5, seed=0)
    measured = {"train": [], "valid": []}
    for keep in masks:
        th = _newton(x1[tr], y[tr], keep.astype(float), theta.copy(), LAM)
        measured["train"].append(_risk(x1[tr], y[tr], th))
        measured["valid"].append(_risk(x1[va], y[va], th))
    model = LogReg(theta)
    batches = [{"x": torch.tensor(x[i:i + 100]), "y": torch.tensor(y[i:i + 100])} for i in range(0, N, 100)]
    valid = [{"x": torch.tensor(x[N:]), "y": torch.tensor(y[N:])}]
    scores = {}
    for target, bs in (("train", batches), ("valid", valid)):
        g, _ = mean_gradient(model, logreg_loss, bs)
        for solver in ("exact", "identity"):
            v, _ = solve_ihvp(model, logreg_loss, batches, g, solver=solver, damping=LAM)
            infl = torch.cat([directional_derivatives(model, logreg_loss, b, v) for b in batches]).numpy() / N
            scores[solver, target] = attribution_from_influence(infl)
    return masks, {k: np.array(v) for k, v in measured.items()}, scores


@pytest.mark.parametrize("target", ["train", "valid"])
def test_exact_influence_lds_near_one(toy, target):
    masks, measured, scores = toy
    r = lds(scores["exact", target], masks, measured[target], n_boot=500)
    assert r["spearman"] > 0.9, r
    assert r["ci_low"] > 0.75, r
    # the harness can fail: the wrong sign gives about -1, a random attribution about 0
    flipped = lds(-scores["exact", target], masks, measured[target], n_boot=200)
    assert flipped["spearman"] < -0.9
    noise = lds(np.random.default_rng(1).normal(size=N), masks, measured[target], n_boot=500)
    assert abs(noise["spearman"]) < 0.4 and noise["ci_low"] < 0 < noise["ci_high"], noise
    assert ci_apart(r, noise)
