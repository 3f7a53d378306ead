"""Surrogate training on Ray Train (DDP, gloo on CPU) vs the local path of engine.surrogate.

Checks: a 2-worker run ends with bit-identical parameters on both ranks (SHA-256 per rank)
and a validation Recall@K well above random; a 1-worker run equals local training; with
dropout 0, a 2-worker run (2 x 32 samples per step) equals local training with batch 64
(the same samples per step, gradients averaged by DDP) to float rounding.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.data.schema import PreparedWriter, atomic_dir, read_samples, read_split, sample_loaders
from engine.errors import ConfigError
from engine.surrogate import SurrogateConfig, evaluate_ranking, load_surrogate, make_batches, train_surrogate

N_USERS, N_ITEMS, K = 200, 30, 5  # random ranking: Recall@5 ~ 5/30


def make_cyclic_data(out, *, n_users=N_USERS, n_items=N_ITEMS, seed=0):
    """Users walk item i -> i+1 (mod n_items): learnable; valid target = the next item."""
    rng = np.random.default_rng(seed)
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=64)
        users, hists, tg, vh, vt = [], [], [], [], []
        for u in range(n_users):
            start, length = int(rng.integers(n_items)), int(rng.integers(2, 9))
            s = [(start + j) % n_items for j in range(length)]
            users.append(f"u{u}")
            hists.append(s[:-1])
            tg.append(s[-1])
            vh.append(s)
            vt.append([(s[-1] + 1) % n_items])
        w.add_samples(users, hists, tg)
        w.write_items(np.arange(n_items), [f"item {i}" for i in range(n_items)])
        w.write_split("valid", users, vh, vt)
        w.write_split("test", users, [h + t for h, t in zip(vh, vt)], [[(t[0] + 1) % n_items] for t in vt])
        w.close({"source": "test"})
    return out


def small_cfg(**kw) -> SurrogateConfig:
    base = dict(hidden=16, n_blocks=1, max_len=10, dropout=0.2, lr=5e-3, epochs=4, patience=2, eval_k=K,
                batch_size=64, log_every=0, seed=3)
    base.update(kw)
    return SurrogateConfig(**base)


def assert_same_params(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_cyclic_data(tmp_path_factory.mktemp("surdata") / "data")


@pytest.fixture(scope="module")
def local_inputs(data):
    return read_samples(data), read_split(data, "valid")


@pytest.fixture(scope="module")
def local_streamed(data):
    """What every Ray Train rank (and the prune job's local path) trains on: the files, streamed."""
    return sample_loaders(data), read_split(data, "valid")


# ---------------------------------------------------------------- no Ray needed
def test_config_switch_validation():
    assert SurrogateConfig().distributed == "local" and SurrogateConfig().num_workers == 2
    SurrogateConfig(distributed="ray_train", num_workers=4, batch_size=256)
    with pytest.raises(ConfigError) as e:
        SurrogateConfig(distributed="spark", num_workers=0)
    assert "distributed='spark'" in str(e.value) and "num_workers=0" in str(e.value)
    with pytest.raises(ConfigError, match="multiple of num_workers"):
        SurrogateConfig(distributed="ray_train", num_workers=3, batch_size=256)
    SurrogateConfig(distributed="local", num_workers=3, batch_size=256)  # ignored by the local path
    assert "help" in SurrogateConfig.__dataclass_fields__["num_workers"].metadata


def test_rank_arguments_are_checked(local_inputs):
    samples, _ = local_inputs
    cfg = small_cfg(epochs=1)
    for kw in ({"rank": 2, "world_size": 2}, {"rank": 0, "world_size": 0}, {"rank": 0, "world_size": 3}):
        with pytest.raises(ConfigError):
            train_surrogate(samples, N_ITEMS, cfg, log=lambda s: None, reduce_fn=lambda o: [o], **kw)


# ---------------------------------------------------------------- Ray Train
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_workers_identical_ranks_and_beats_random(ray_cluster, data, tmp_path):
    from jobs.surrogate_train import REPORT_FILE, param_checksum, train_surrogate_ray

    cfg = small_cfg(distributed="ray_train", num_workers=2)
    lines: list[str] = []
    model, hist = train_surrogate_ray(str(data), N_ITEMS, cfg, out_dir=tmp_path / "sur", log=lines.append,
                                      use_gpu=False)
    rep = json.loads((tmp_path / "sur" / REPORT_FILE).read_text())
    print("rank checksums:", rep["rank_checksums"])
    assert len(rep["rank_checksums"]) == 2 and len(set(rep["rank_checksums"])) == 1, rep["rank_checksums"]
    assert rep["rank_checksums"][0] == rep["checksum_loaded"] == param_checksum(model)
    assert 1 <= len(hist) <= cfg.epochs and all("recall" in h and "train_loss" in h for h in hist)
    best = max(h["recall"] for h in hist)
    assert best > 3 * K / N_ITEMS, hist  # random ranking gives ~0.17
    vb = make_batches(read_split(data, "valid"), batch_size=128, max_len=cfg.max_len)
    assert evaluate_ranking(model, vb, k=K)["recall"] == pytest.approx(best)  # the best epoch was kept
    again = load_surrogate(tmp_path / "sur")
    assert param_checksum(again) == param_checksum(model) and not model.training
    assert any("Ray Train done" in s and "identical" in s for s in lines)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_one_worker_equals_local(ray_cluster, data, local_streamed, tmp_path):
    from jobs.surrogate_train import train_surrogate_ray

    samples, valid = local_streamed
    cfg = small_cfg(distributed="ray_train", num_workers=1)
    ray_model, ray_hist = train_surrogate_ray(str(data), N_ITEMS, cfg, out_dir=tmp_path / "sur", log=lambda s: None,
                                              use_gpu=False)
    local_model, local_hist = train_surrogate(samples, N_ITEMS, small_cfg(), valid=valid, log=lambda s: None)
    assert [h["epoch"] for h in ray_hist] == [h["epoch"] for h in local_hist]
    for a, b in zip(ray_hist, local_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["recall"] == pytest.approx(b["recall"], abs=1e-9)
    assert_same_params(ray_model, local_model)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_two_workers_without_dropout_equal_local_batch(ray_cluster, data, local_streamed, tmp_path):
    """200 samples in files of 64, 64, 64 and 8 rows, streamed in the same seeded order by both
    ranks and the local loop; no padding: rank r's batch of a file is perm[r::2][:32], so both
    ranks together see the local batch's 64 (or 8) samples and DDP's averaged gradient is the
    local one."""
    from jobs.surrogate_train import train_surrogate_ray

    samples, valid = local_streamed
    cfg = small_cfg(distributed="ray_train", num_workers=2, dropout=0.0, epochs=2)
    ray_model, ray_hist = train_surrogate_ray(str(data), N_ITEMS, cfg, out_dir=tmp_path / "sur", log=lambda s: None,
                                              use_gpu=False)
    local_model, local_hist = train_surrogate(samples, N_ITEMS, small_cfg(dropout=0.0, epochs=2), valid=valid,
                                              log=lambda s: None)
    assert len(ray_hist) == len(local_hist)
    for a, b in zip(ray_hist, local_hist):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert_same_params(ray_model, local_model, rtol=1e-4, atol=1e-5)


def test_rank_loop_with_fake_gather_pads_and_stops_on_time_box(local_inputs):
    """One process plays rank 1 of 2 with a fake all-gather (both ranks 'equal'): the padded
    slice, the combined train loss and the per-batch time-box vote run without torch.distributed."""
    samples, valid = local_inputs
    odd = samples.slice(0, 199)  # 199 samples -> padded to 200, 100 per rank
    calls: list[object] = []

    def gather(obj):
        calls.append(obj)
        return [obj, obj]

    cfg = small_cfg(epochs=2)
    m, hist = train_surrogate(odd, N_ITEMS, cfg, valid=valid, log=lambda s: None, rank=1, world_size=2,
                              reduce_fn=gather)
    assert len(hist) == 2 and "recall" not in hist[0]  # validation only runs on rank 0
    assert [c for c in calls if isinstance(c, dict)][0]["seen"] == 100
    assert not any(isinstance(c, bool) for c in calls)  # no time box: no per-batch vote
    calls.clear()
    m, hist = train_surrogate(odd, N_ITEMS, small_cfg(epochs=3, max_minutes=1e-9), valid=valid,
                              log=lambda s: None, rank=0, world_size=2, reduce_fn=gather)
    assert len(hist) == 1 and "recall" in hist[0]  # stopped after the first batch of epoch 1
    assert calls[0] is True and calls[1]["seen"] == 32 and calls[1]["timed_out"] is True
