"""The 'identity' solver: v = g_bar, so influence = plain gradient alignment g_bar . grad L_s / n,
checked against per-sample autograd gradients; the streamed prune path skips the Hessian."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.errors import ConfigError
from engine.influence import InfluenceConfig, compute_ihvp_streaming, influence_scores, solve_ihvp
from engine.surrogate import SurrogateConfig, make_batches, surrogate_loss, train_surrogate
from tests.unit.test_surrogate import random_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    t = random_samples(n=30, n_items=8, max_hist=6, seed=5)
    cfg = SurrogateConfig(hidden=4, n_heads=2, n_blocks=1, max_len=5, dropout=0.0, lr=2e-2, weight_decay=1e-2,
                          epochs=10, batch_size=30, log_every=0)
    model, _ = train_surrogate(t, 8, cfg, log=lambda s: None)
    return t, model.double()


def test_identity_influence_is_gradient_alignment(tiny):
    t, model = tiny
    batches = make_batches(t, batch_size=7, max_len=5)
    got = influence_scores(model, surrogate_loss, batches, solver="identity")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for b in batches:
        losses = surrogate_loss(model, b)
        for i in range(losses.shape[0]):
            g = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                    for x, p in zip(g, params)]))
    G = torch.stack(grads)
    want = (G @ G.mean(0) / len(G)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def test_identity_solve_and_streaming_skip_the_hessian(tiny):
    t, model = tiny
    g = torch.arange(5, dtype=torch.float64)
    v, rep = solve_ihvp(model, surrogate_loss, [], g, solver="identity", damping=0.5)
    assert torch.equal(v, g) and v is not g and rep.iterations == 0 and rep.hvps == 0 and rep.converged
    with pytest.raises(ConfigError, match="unknown option 'tol'"):
        solve_ihvp(model, surrogate_loss, [], g, solver="identity", tol=1e-3)
    cfg = InfluenceConfig(solver="identity", batch_size=8)
    calls = []

    def chunks():
        calls.append(1)
        return [t.slice(0, 15), t.slice(15)]

    rep = compute_ihvp_streaming(model, chunks, cfg, log=lambda s: None)
    assert len(calls) == 1  # one pass for g_bar; no second pass for a Hessian subsample
    batches = make_batches(t, batch_size=8, max_len=5, order="length")
    from engine.influence import mean_gradient

    g_bar, n = mean_gradient(model, surrogate_loss, batches)
    np.testing.assert_allclose(rep["v"], g_bar.numpy(), rtol=1e-10, atol=1e-14)
    assert rep["n"] == n == 30 and rep["iterations"] == 0
