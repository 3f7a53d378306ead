"""The validation target of the surrogate's influence (issue #20 item 2): g_bar over the validation
period equals a naive per-(user, item) autograd mean, the streamed iHVP uses it (and only it) in
place of the training g_bar, the validation rows are read and checked, and the target is part of
the iHVP stage's fingerprint (a changed target is refused on resume; the default hashes as before)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from engine.config import stable_hash, to_dict
from engine.errors import ConfigError, DataError
from engine.influence import (
    InfluenceConfig,
    compute_ihvp_for_samples,
    read_target_rows,
    solve_ihvp,
    trainable_params,
    valid_mean_gradient,
)
from engine.surrogate import SurrogateConfig, build_surrogate, make_batches, surrogate_loss, train_surrogate
from tests.unit.test_surrogate import random_samples

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, N_ITEMS, MAX_LEN = 30, 9, 5


def valid_rows(seed=4, users=7):
    """Validation rows: histories (some longer than max_len, one empty), 1-4 targets each."""
    rng = np.random.default_rng(seed)
    hists = [rng.integers(0, N_ITEMS, rng.integers(0, 9)).tolist() for _ in range(users)]
    hists[2] = []
    targets = [rng.integers(0, N_ITEMS, rng.integers(1, 5)).tolist() for _ in range(users)]
    return pa.table({"user_id": [f"u{i}" for i in range(users)],
                     "history": pa.array(hists, pa.list_(pa.int32())),
                     "targets": pa.array(targets, pa.list_(pa.int32()))})


def naive_valid_gradient(model, rows) -> torch.Tensor:
    """(1/U) sum_u (1/|T_u|) sum_t grad CE(score_next(history_u), t): one backward per (user, item)."""
    params = list(trainable_params(model).values())
    users = []
    model.eval()
    for h, ts in zip(rows.column("history").to_pylist(), rows.column("targets").to_pylist()):
        per_item = []
        for t in ts:
            one = pa.table({"history": pa.array([h], pa.list_(pa.int32())),
                            "targets": pa.array([[t]], pa.list_(pa.int32()))})
            (b,) = make_batches(one, batch_size=1, max_len=MAX_LEN)
            loss = F.cross_entropy(model.score_next(b), torch.tensor([t]))
            gs = torch.autograd.grad(loss, params, allow_unused=True)
            per_item.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for g, p in zip(gs, params)]))
        users.append(torch.stack(per_item).mean(0))
    return torch.stack(users).mean(0)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    t = random_samples(n=N, n_items=N_ITEMS, max_hist=7, seed=3)
    cfg = SurrogateConfig(hidden=4, n_heads=2, n_blocks=1, max_len=MAX_LEN, dropout=0.0, lr=2e-2,
                          weight_decay=1e-2, epochs=10, batch_size=N, log_every=0)
    model, _ = train_surrogate(t, N_ITEMS, cfg, log=lambda s: None)
    return t, model.double()


@pytest.mark.parametrize("arch,loss", [("sasrec", "full"), ("sasrec", "sampled"), ("bert4rec", "full")])
def test_valid_g_bar_equals_the_naive_per_item_mean(arch, loss):
    """Any surrogate and training loss: the target is the full-softmax CE of each validation item
    after the user's history, a mean per user, then over users; batching does not change it."""
    cfg = SurrogateConfig(model=arch, loss=loss, negatives=4, hidden=4, n_heads=2, n_blocks=1, max_len=MAX_LEN,
                          dropout=0.0, seed=2)
    model = build_surrogate(N_ITEMS, cfg).double()
    rows = valid_rows()
    ref = naive_valid_gradient(model, rows)
    assert float(ref.norm()) > 0
    for bs in (1, 3, 256):
        g, u = valid_mean_gradient(model, rows, batch_size=bs)
        assert u == rows.num_rows and g.dtype == torch.float64
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)
    # an iterable of chunks is the same mean over all their rows
    g, u = valid_mean_gradient(model, [rows.slice(0, 3), rows.slice(3)], batch_size=2)
    assert u == rows.num_rows
    torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-12)


def test_streamed_ihvp_solves_against_the_valid_g_bar(trained):
    t, model = trained
    rows = valid_rows()
    g_valid = naive_valid_gradient(model, rows)
    # identity: v is the validation g_bar itself; n still counts the training samples
    rep = compute_ihvp_for_samples(model, t, InfluenceConfig(solver="identity", target="valid"), target_rows=rows,
                                   log=lambda s: None)
    assert rep["n"] == N and rep["target"] == "valid" and rep["n_target_users"] == rows.num_rows
    np.testing.assert_allclose(rep["v"], g_valid.numpy(), rtol=1e-9, atol=1e-12)
    # exact: v = (H_train + dI)^-1 g_valid, H still over the training samples
    cfg = InfluenceConfig(solver="exact", target="valid", damping=0.5, gauss_newton=False, hessian_samples=None)
    rep = compute_ihvp_for_samples(model, t, cfg, target_rows=rows, log=lambda s: None)
    batches = make_batches(t, batch_size=N, max_len=MAX_LEN)
    v, _ = solve_ihvp(model, surrogate_loss, batches, g_valid, solver="exact", damping=0.5)
    np.testing.assert_allclose(rep["v"], v.numpy(), rtol=1e-7, atol=1e-10)
    train = compute_ihvp_for_samples(model, t, InfluenceConfig(solver="identity"), log=lambda s: None)
    assert train["target"] == "train" and "n_target_users" not in train
    assert not np.allclose(train["v"], g_valid.numpy())
    with pytest.raises(ValueError, match="target_rows"):
        compute_ihvp_for_samples(model, t, InfluenceConfig(solver="identity", target="valid"), log=lambda s: None)


def test_read_target_rows_filters_checks_and_subsamples(tmp_path):
    rows = valid_rows(users=6)
    empty = pa.table({"user_id": ["x"], "history": pa.array([[1]], pa.list_(pa.int32())),
                      "targets": pa.array([[]], pa.list_(pa.int32()))})
    pq.write_table(pa.concat_tables([empty, rows]), tmp_path / "valid.parquet")
    got = read_target_rows(tmp_path, n_items=N_ITEMS)
    assert got.column("user_id").to_pylist() == rows.column("user_id").to_pylist()  # the empty one dropped
    sub = read_target_rows(tmp_path, max_rows=3, seed=1)
    assert sub.num_rows == 3 and set(sub.column("user_id").to_pylist()) <= set(rows.column("user_id").to_pylist())
    assert read_target_rows(tmp_path, max_rows=3, seed=1).equals(sub)
    with pytest.raises(DataError, match="unknown item id") as e:
        read_target_rows(tmp_path, n_items=2)  # an item id outside the catalogue
    assert e.value.field in ("history", "targets")
    pq.write_table(empty, tmp_path / "valid.parquet")
    with pytest.raises(DataError, match="no user of the validation split") as e:
        read_target_rows(tmp_path, needed_by="--influence-target valid")
    assert e.value.field == "targets" and "--influence-target valid" in str(e.value)
    (tmp_path / "valid.parquet").unlink()
    with pytest.raises(DataError, match="validation split") as e:
        read_target_rows(tmp_path)
    assert e.value.field == "valid" and "valid.parquet" in str(e.value)


def test_target_is_validated_and_fingerprinted_compatibly():
    with pytest.raises(ConfigError) as e:
        InfluenceConfig(target="test", target_users=0)
    assert "target='test'" in str(e.value) and "target_users=0" in str(e.value)
    d = InfluenceConfig().hash_dict()
    assert "target" not in d and "target_users" not in d
    # the default hashes exactly as the config did before the target existed
    old = {k: v for k, v in to_dict(InfluenceConfig()).items() if k not in ("target", "target_users")}
    assert stable_hash(d) == stable_hash(old)
    assert InfluenceConfig(target="valid").hash_dict()["target"] == "valid"
    assert stable_hash(InfluenceConfig(target="valid").hash_dict()) != stable_hash(
        InfluenceConfig(target="valid", target_users=5).hash_dict())
