"""Influence agrees with actual leave-one-out retraining on L2-regularised logistic regression.

Objective J(theta) = (1/n) sum_i L_i(theta) + (lam/2)||theta||^2, L_i the logistic loss.
Removing s = dropping its (1/n) L_s term (penalty unchanged) and retraining to convergence
(Newton's method in float64, gradient norm < 1e-13). Ground truth: R(theta_{-s}) - R(theta_hat),
R = (1/n) sum_i L_i over ALL n samples, which ``influence_scores(..., damping=lam)`` estimates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.influence import influence_scores

N, D, LAM = 200, 5, 0.05

pytestmark = pytest.mark.usefixtures("one_torch_thread")



class LogReg(torch.nn.Module):
    def __init__(self, theta: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(theta[:D], dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.tensor(theta[D:], dtype=torch.float64))

    def outputs(self, x):
        return x @ self.w + self.b


def logreg_loss(model, batch):
    return F.binary_cross_entropy_with_logits(model.outputs(batch["x"]), batch["y"], reduction="none")


logreg_loss.split = (lambda m, b: m.outputs(b["x"]),
                     lambda z, b: F.binary_cross_entropy_with_logits(z, b["y"], reduction="none"))


def _newton(x1, y, w, theta, lam, n):
    """argmin (1/n) sum_i w_i L_i + lam/2 ||theta||^2 by Newton's method (x1 has a bias column)."""
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x1 @ theta)))
        g = x1.T @ (w * (p - y)) / n + lam * theta
        if np.linalg.norm(g) < 1e-13:
            break
        h = (x1 * (w * p * (1 - p))[:, None]).T @ x1 / n + lam * np.eye(len(theta))
        theta = theta - np.linalg.solve(h, g)
    return theta


def _risk(x1, y, theta):
    z = x1 @ theta
    return float(np.mean(np.logaddexp(0, z) - y * z))


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    w_true = rng.normal(size=D)
    y = (rng.random(N) < 1 / (1 + np.exp(-(x @ w_true)))).astype(float)
    x1 = np.hstack([x, np.ones((N, 1))])
    theta = _newton(x1, y, np.ones(N), np.zeros(D + 1), LAM, N)
    r0 = _risk(x1, y, theta)
    loo = np.empty(N)
    for s in range(N):
        w = np.ones(N)
        w[s] = 0.0
        loo[s] = _risk(x1, y, _newton(x1, y, w, theta.copy(), LAM, N)) - r0
    return x, y, theta, loo


def _batches(x, y, bs):
    return [{"x": torch.tensor(x[i:i + bs]), "y": torch.tensor(y[i:i + bs])} for i in range(0, len(y), bs)]


@pytest.mark.parametrize("solver,opts", [
    ("exact", {}),
    ("cg", {"tol": 1e-12}),
    ("cg", {"tol": 1e-12, "gauss_newton": True}),  # GGN = H for a canonical-link GLM
])
def test_influence_matches_leave_one_out(problem, solver, opts):
    x, y, theta, loo = problem
    est = influence_scores(LogReg(theta), logreg_loss, _batches(x, y, 64), solver=solver, damping=LAM, **opts)
    r = np.corrcoef(est, loo)[0, 1]
    slope = np.polyfit(est, loo, 1)[0]
    assert r >= 0.95, r
    assert abs(slope - 1) <= 0.10, slope
    # sign convention: positive = removing s raises the training loss
    assert np.mean(np.sign(est) == np.sign(loo)) > 0.9


def test_lissa_matches_leave_one_out(problem):
    x, y, theta, loo = problem
    est = influence_scores(LogReg(theta), logreg_loss, _batches(x, y, 64), solver="lissa", damping=LAM,
                           depth=1500, scale=2.0, hessian_batch_size=N)
    assert np.corrcoef(est, loo)[0, 1] >= 0.95
    assert abs(np.polyfit(est, loo, 1)[0] - 1) <= 0.10
