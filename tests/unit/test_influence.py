"""iHVP solvers agree with the dense oracle; batched products equal the naive loop; scores
do not depend on batch size or order; baseline scores equal their per-sample definitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from engine.errors import ConfigError, SolverError
from engine.influence import (
    InfluenceConfig,
    compute_ihvp_for_samples,
    compute_ihvp_streaming,
    hessian_rows,
    dense_hessian,
    hessian_vector_product,
    score_surrogate_batch,
    directional_derivatives,
    el2n_scores,
    flatten_params,
    grand_scores,
    influence_scores,
    mean_gradient,
    solve_ihvp,
    trainable_params,
    unflatten,
)
from engine.surrogate import SurrogateConfig, make_batches, surrogate_loss, train_surrogate

from tests.unit.test_surrogate import random_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")



N, N_ITEMS, MAX_LEN = 40, 8, 5


@pytest.fixture(scope="module")
def tiny():
    """A trained ~200-parameter SASRec in float64, its samples and batches, H's spectrum."""
    torch.manual_seed(0)
    t = random_samples(n=N, n_items=N_ITEMS, max_hist=6, seed=3)
    cfg = SurrogateConfig(hidden=4, n_heads=2, n_blocks=1, max_len=MAX_LEN, dropout=0.0, lr=2e-2,
                          weight_decay=1e-2, epochs=40, batch_size=N, log_every=0)
    model, _ = train_surrogate(t, N_ITEMS, cfg, log=lambda s: None)
    model = model.double()
    batches = make_batches(t, batch_size=20, max_len=MAX_LEN)
    g, n = mean_gradient(model, surrogate_loss, batches)
    evals = torch.linalg.eigvalsh(dense_hessian(model, surrogate_loss, batches))
    lam_min, lam_max = float(evals[0]), float(evals[-1])
    damping = max(0.0, -lam_min) + 1.0  # makes H + damping I positive definite (min eigenvalue 1)
    v_exact, rep = solve_ihvp(model, surrogate_loss, batches, g, solver="exact", damping=damping)
    assert rep.rel_residual < 1e-10
    return dict(t=t, model=model, batches=batches, g=g, n=n, damping=damping, lam_max=lam_max + damping,
                v=v_exact)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_cg_matches_exact(tiny):
    v, rep = solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="cg",
                        damping=tiny["damping"], tol=1e-10, max_iter=500)
    assert rep.converged and rep.rel_residual < 1e-8 and rep.hvps == rep.iterations + 1
    assert _rel(v, tiny["v"]) < 1e-6  # tolerance: CG to 1e-10 residual, condition number < 1e3


def test_lissa_matches_exact(tiny):
    # Damping chosen so that cond(H + dI) <= ~11 keeps the recursion short (rate 1 - lambda_min/scale).
    d = tiny["damping"] - 1.0 + 0.1 * tiny["lam_max"]
    v_ref, _ = solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="exact", damping=d)
    scale = 1.05 * (tiny["lam_max"] + d - tiny["damping"])
    depth = int(12 * np.log(1e5)) + 1
    # full-batch Hessian estimates: a deterministic Richardson iteration, must reach the solution
    v, rep = solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="lissa",
                        damping=d, depth=depth, scale=scale, hessian_batch_size=N)
    assert _rel(v, v_ref) < 1e-3 and rep.rel_residual < 1e-3, rep
    assert rep.hvps == depth + 1
    # stochastic mini-batches (the paper's estimator), averaged over repeats: close, not exact
    v2, rep2 = solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="lissa",
                          damping=d, depth=depth, scale=2 * scale, hessian_batch_size=N // 2, repeats=2, seed=1)
    assert _rel(v2, v_ref) < 0.25, rep2


def test_lissa_divergence_names_the_knob(tiny):
    with pytest.raises(SolverError, match="increase scale"):
        solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="lissa",
                   damping=tiny["damping"], depth=300, scale=tiny["lam_max"] / 4, hessian_batch_size=N)


class _Saddle(torch.nn.Module):
    """Per-sample loss 0.5 * (w0^2 - w1^2) + a_s . w: Hessian diag(1, -1), indefinite."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))


def _saddle_loss(model, batch):
    w = model.w
    return 0.5 * (w[0] ** 2 - w[1] ** 2) + batch["a"] @ w


def test_cg_reports_indefinite_hessian():
    model = _Saddle()
    batches = [{"a": torch.tensor([[0.1, 1.0], [0.1, 1.0]], dtype=torch.float64)}]
    g, n = mean_gradient(model, _saddle_loss, batches)
    with pytest.raises(SolverError, match="raise damping"):
        solve_ihvp(model, _saddle_loss, batches, g, solver="cg", damping=0.5)
    v, rep = solve_ihvp(model, _saddle_loss, batches, g, solver="cg", damping=2.0)
    torch.testing.assert_close(v, g / torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert rep.rel_residual < 1e-12


def test_bad_options_are_config_errors(tiny):
    with pytest.raises(ConfigError, match="solver='newton'"):
        solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="newton")
    with pytest.raises(ConfigError, match="unknown option 'depth'"):
        solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="cg", depth=3)
    with pytest.raises(ConfigError, match="damping"):
        solve_ihvp(tiny["model"], surrogate_loss, tiny["batches"], tiny["g"], solver="cg", damping=-1.0)


def _loop_grads(model, batch):
    out = []
    for i in range(len(batch["sample_id"])):
        b = {k: v[i:i + 1] for k, v in batch.items()}
        gs = torch.autograd.grad(surrogate_loss(model, b).sum(), list(trainable_params(model).values()))
        out.append(flatten_params(gs))
    return torch.stack(out)


def test_directional_derivatives_equal_naive_loop(tiny):
    model, v = tiny["model"], tiny["v"]
    for b in tiny["batches"]:
        loop = _loop_grads(model, b) @ v
        jv = directional_derivatives(model, surrogate_loss, b, v)
        torch.testing.assert_close(jv, loop, rtol=1e-9, atol=1e-12)
        fd = directional_derivatives(model, surrogate_loss, b, v, method="fd", eps=1e-6)
        torch.testing.assert_close(fd, loop, rtol=1e-5, atol=1e-7 * float(loop.abs().max()))


def test_scores_independent_of_batch_size_and_order(tiny):
    model, t = tiny["model"], tiny["t"]
    kw = dict(solver="cg", damping=tiny["damping"], tol=1e-12, max_iter=500)
    ref = influence_scores(model, surrogate_loss, make_batches(t, batch_size=N, max_len=MAX_LEN), **kw)
    # definition: (1/n) grad L_s . (H + dI)^-1 g_bar
    direct = (_loop_grads(model, make_batches(t, batch_size=N, max_len=MAX_LEN)[0]) @ tiny["v"]) / N
    np.testing.assert_allclose(ref, direct.numpy(), rtol=1e-6, atol=1e-12)
    perm = np.random.default_rng(0).permutation(N)
    for bs in (3, 7, 16):
        got = influence_scores(model, surrogate_loss, make_batches(t.take(perm), batch_size=bs, max_len=MAX_LEN), **kw)
        out = np.empty(N)
        out[perm] = got
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-12 * np.abs(ref).max())


def test_flatten_unflatten_roundtrip(tiny):
    p = trainable_params(tiny["model"])
    flat = flatten_params(p)
    back = unflatten(flat, p)
    assert all(torch.equal(back[k], p[k]) for k in p)
    with pytest.raises(ValueError):
        unflatten(flat[:-1], p)


def test_grand_and_el2n_equal_definitions(tiny):
    model, b = tiny["model"], tiny["batches"][0]
    torch.testing.assert_close(grand_scores(model, surrogate_loss, b, chunk_size=5), _loop_grads(model, b).norm(dim=1))
    p = torch.softmax(model.score_next(b), -1)
    onehot = torch.nn.functional.one_hot(b["target"], N_ITEMS).double()
    torch.testing.assert_close(el2n_scores(model, b).double(), (p - onehot).norm(dim=1), rtol=1e-5, atol=1e-6)


def test_gauss_newton_is_psd_and_cg_solves_it(tiny):
    model, batches = tiny["model"], tiny["batches"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(tiny["g"].numel(), generator=gen, dtype=torch.float64)
        assert float(x @ hessian_vector_product(model, surrogate_loss, batches, x, gauss_newton=True)) >= -1e-12
    v, rep = solve_ihvp(model, surrogate_loss, batches, tiny["g"], solver="cg", damping=0.1, gauss_newton=True,
                        tol=1e-10, max_iter=1000)
    assert rep.converged and rep.rel_residual < 1e-8
    # the report's residual is the real one: recompute it
    r = hessian_vector_product(model, surrogate_loss, batches, v, damping=0.1, gauss_newton=True) - tiny["g"]
    assert float(r.norm() / tiny["g"].norm()) == pytest.approx(rep.rel_residual, rel=1e-3, abs=1e-12)


def test_influence_config_and_driver_step(tiny):
    with pytest.raises(ConfigError) as e:
        InfluenceConfig(solver="newton", damping=-1.0, tol=0.0, depth=0, method="loop")
    assert len(e.value.problems) == 5
    cfg = InfluenceConfig(solver="cg", damping=tiny["damping"], gauss_newton=False, tol=1e-10, max_iter=500,
                          hessian_samples=None, batch_size=20)
    out = compute_ihvp_for_samples(tiny["model"], tiny["t"], cfg, log=lambda s: None)
    assert out["n"] == N and out["rel_residual"] < 1e-8
    np.testing.assert_allclose(out["v"], tiny["v"].numpy(), rtol=1e-5, atol=1e-8 * float(tiny["v"].abs().max()))
    t = tiny["t"]
    batch = {"sample_id": t["sample_id"].to_numpy(), "target": t["target"].to_numpy(),
             "history": np.array([np.array(h, dtype=np.int32) for h in t["history"].to_pylist()], dtype=object)}
    s = score_surrogate_batch(tiny["model"], batch, v=out["v"], n_train=N, batch_size=9)
    ref = influence_scores(tiny["model"], surrogate_loss, tiny["batches"], solver="exact", damping=tiny["damping"])
    np.testing.assert_allclose(s["influence"], ref, rtol=1e-5, atol=1e-8 * np.abs(ref).max())
    assert s["sample_id"].dtype == np.int64 and set(s) == {"sample_id", "influence", "grand", "el2n"}


def test_streamed_ihvp_equals_in_memory_and_the_subsampled_oracle(tiny):
    """g_bar streamed chunk by chunk and the Hessian subsample picked by row position give the
    same v whatever the chunking; v equals the dense solve on exactly those rows."""
    model, t = tiny["model"], tiny["t"]
    # exact solve: the 16-row subsample's H need not be PD at the full set's damping (CG vs exact
    # is tested above); what is checked here is which rows and which g_bar reach the solver
    cfg = InfluenceConfig(solver="exact", damping=tiny["damping"], hessian_samples=16, batch_size=7)
    quiet = dict(log=lambda s: None)
    one = compute_ihvp_for_samples(model, t, cfg, **quiet)
    chunked = compute_ihvp_streaming(model, lambda: [t.slice(0, 13), t.slice(13, 0), t.slice(13, 20), t.slice(33)],
                                     cfg, **quiet)
    as_dicts = compute_ihvp_streaming(model, lambda: [{k: np.asarray(t.slice(a, 20).column(k).to_pylist(), dtype=object)
                                                       if k == "history" else t.slice(a, 20).column(k).to_numpy()
                                                       for k in ("sample_id", "history", "target")}
                                                      for a in (0, 20)], cfg, **quiet)
    for other in (chunked, as_dicts):
        assert other["n"] == one["n"] == N and other["extra"]["n_hessian_samples"] == 16
        np.testing.assert_allclose(other["v"], one["v"], rtol=1e-9, atol=1e-12)
    rows = hessian_rows(N, cfg)
    assert len(rows) == 16 and np.all(np.diff(rows) > 0)
    g, _ = mean_gradient(model, surrogate_loss, tiny["batches"])
    sub = make_batches(t.take(pa.array(rows)), batch_size=16, max_len=MAX_LEN)
    v_oracle, _ = solve_ihvp(model, surrogate_loss, sub, g, solver="exact", damping=tiny["damping"],
                             gauss_newton=cfg.gauss_newton)
    np.testing.assert_allclose(one["v"], v_oracle.numpy(), rtol=1e-6, atol=1e-9 * float(v_oracle.abs().max()))
    with pytest.raises(ValueError, match="no samples"):
        compute_ihvp_streaming(model, lambda: [], cfg, **quiet)


def test_split_direction_gives_the_same_products_and_checks_names(tiny):
    from engine.influence import split_direction

    model, v, b = tiny["model"], tiny["v"], tiny["batches"][0]
    vs = split_direction(model, v.numpy())
    assert all(t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in vs.values())
    for method in ("jvp", "fd"):
        torch.testing.assert_close(directional_derivatives(model, surrogate_loss, b, vs, method=method),
                                   directional_derivatives(model, surrogate_loss, b, v, method=method),
                                   rtol=1e-12, atol=0.0)
    with pytest.raises(ConfigError, match="split_direction"):
        directional_derivatives(model, surrogate_loss, b, {k: t for k, t in list(vs.items())[1:]})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compile_of_a_loss_with_data_dependent_shapes_is_a_clear_error(tiny):
    """The full-softmax loss gathers valid positions (data-dependent shapes): compiling it as one
    graph fails, and says so instead of silently running eager."""
    from engine.influence import DirectionalDerivatives

    compiled = DirectionalDerivatives(tiny["model"], surrogate_loss, tiny["v"], compile=True)
    with pytest.raises(ConfigError, match="does not compile as one graph"):
        compiled(tiny["batches"][0])


@pytest.mark.slow  # ~31 s of torch.compile on 2 cores
def test_compiled_scoring_pads_to_few_shapes_and_keeps_the_values():
    """score_surrogate_batch with a compiled pass (the actors' path) on the prune job's default
    loss (sampled softmax): padded micro-batches, values of the eager path in input order."""
    from engine.influence import DirectionalDerivatives, score_surrogate_batch
    from engine.surrogate import build_surrogate, length_bucket, pad_batch

    assert [length_bucket(t, 50) for t in (1, 8, 9, 31, 33, 50)] == [8, 8, 16, 32, 50, 50]
    assert length_bucket(3, 5) == 5
    torch.manual_seed(0)
    t = random_samples(n=30, n_items=40, max_hist=8, seed=5)
    model = build_surrogate(40, SurrogateConfig(hidden=8, n_blocks=1, max_len=6, loss="sampled", negatives=6)).double()
    m = sum(p.numel() for p in trainable_params(model).values())
    v = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    b = make_batches(t, batch_size=9, max_len=6, order="length")[0]
    padded = pad_batch(b, 12, 6)
    assert padded["seq"].shape == (12, 6) and (padded["sample_id"][9:] == -1).all()
    losses = surrogate_loss(model.eval(), padded)
    torch.testing.assert_close(losses[:9], surrogate_loss(model, b))
    assert (losses[9:] == 0).all()
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch(b, 4, 6)

    batch = {"sample_id": t.column("sample_id").to_numpy(), "target": t.column("target").to_numpy(),
             "history": np.array([np.array(h, dtype=np.int32) for h in t.column("history").to_pylist()], dtype=object)}
    ref = score_surrogate_batch(model, batch, v=v, n_train=30, what=("influence",), batch_size=9)
    loop = torch.cat([_loop_grads(model, bb) @ v for bb in make_batches(t, batch_size=30, max_len=6)]).numpy() / 30
    np.testing.assert_allclose(ref["influence"], loop, rtol=1e-9, atol=1e-14)
    before = _graphs()
    compiled = DirectionalDerivatives(model, surrogate_loss, v, compile=True)
    got = score_surrogate_batch(model, batch, directional=compiled, n_train=30, what=("influence",), batch_size=9)
    assert _graphs() == before + 1  # 4 micro-batches (9, 9, 9, 3 rows; lengths 1..6) -> one shape (9, 6)
    np.testing.assert_array_equal(got["sample_id"], ref["sample_id"])
    np.testing.assert_allclose(got["influence"], ref["influence"], rtol=1e-9, atol=1e-14)


def test_directional_options_are_checked(tiny):
    from engine.influence import DirectionalDerivatives

    model, v = tiny["model"], tiny["v"]
    with pytest.raises(ConfigError, match="compile=True needs method='jvp'"):
        DirectionalDerivatives(model, surrogate_loss, v, method="fd", compile=True)
    with pytest.raises(ConfigError, match="method='hvp'"):
        DirectionalDerivatives(model, surrogate_loss, v, method="hvp")
    with pytest.raises(ConfigError, match="eps=0.0"):
        DirectionalDerivatives(model, surrogate_loss, v, method="fd", eps=0.0)


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_mean_gradient_equals_the_per_sample_loop_with_dense_embeddings(loss):
    """g_bar from row-sparse embedding gradients (repeated items, padding rows, several
    batches) equals the mean of per-sample dense gradients, and the embeddings' flags are back."""
    torch.manual_seed(1)
    t = random_samples(n=37, n_items=30, max_hist=9, seed=7)
    cfg = SurrogateConfig(hidden=8, n_heads=2, n_blocks=1, max_len=6, dropout=0.0, loss=loss, negatives=5,
                          epochs=1, batch_size=16, log_every=0)
    model, _ = train_surrogate(t, 30, cfg, log=lambda s: None)
    model = model.double().eval()
    g, n = mean_gradient(model, surrogate_loss, make_batches(t, batch_size=8, max_len=6))
    assert n == 37
    embs = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embs and not any(m.sparse for m in embs)
    params = trainable_params(model)
    naive = torch.zeros_like(g)
    for b in make_batches(t, batch_size=1, max_len=6):
        gs = torch.autograd.grad(surrogate_loss(model, b).sum(), list(params.values()), allow_unused=True)
        assert not any(x is not None and x.is_sparse for x in gs)
        naive += flatten_params([x if x is not None else torch.zeros_like(p) for x, p in zip(gs, params.values())])
    naive /= 37
    torch.testing.assert_close(g, naive, rtol=1e-10, atol=1e-13)
