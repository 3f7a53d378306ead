"""Ray Train + DeepSpeed fine-tune: identical LoRA weights on every rank, exact resume.

The first DeepSpeed initialisation on a machine compiles its shared-memory comm op
(~30-60 s, cached in ~/.cache/torch_extensions); later runs take ~20-30 s each here.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from engine.data.schema import PreparedWriter, atomic_dir
from engine.errors import ConfigError, ResumeError
from engine.finetune import FinetuneConfig, deepspeed_config, epoch_shard, lr_lambda


def make_tiny_data(out, *, n_users=48, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "quest", "star", "war", "tiny", "hero", "dark", "soul", "kart", "ball", "zone"]
    titles = [" ".join(rng.choice(words, size=3)) + f" {i % 30}" for i in range(n_items)]
    titles[5] = titles[3]  # two items share a title
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=16)
        users, hists, tg = [], [], []
        for u in range(n_users):
            seq = rng.integers(0, n_items, size=rng.integers(3, 9)).tolist()
            users.append(f"u{u}")
            hists.append(seq[:-1])
            tg.append(seq[-1])
        w.add_samples(users, hists, tg)
        w.write_items(np.arange(n_items), titles)
        for split in ("valid", "test"):
            su = [f"u{u}" for u in range(0, n_users, 2)]
            w.write_split(split, su, [rng.integers(0, n_items, size=5).tolist() for _ in su],
                          [rng.integers(0, n_items, size=rng.integers(1, 4)).tolist() for _ in su])
        w.close({"source": "test"})
    return out


def parse(argv):
    from jobs import finetune

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return p.parse_args(argv)


def base_args(data, out, cache, *extra):
    return ["--data", str(data), "--all", "--out", str(out), "--workers", "2", "--batch-size", "8",
            "--micro-batch", "2", "--epochs", "2", "--warmup-steps", "2", "--lr", "1e-3",
            "--cache-dir", str(cache), "--val-samples", "12", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("ftdata") / "data")


@pytest.fixture(scope="module")
def resumed(ray_cluster, data, tmp_path_factory):
    """A 2-epoch DeepSpeed run interrupted after epoch 1 and resumed."""
    from jobs import finetune

    root = tmp_path_factory.mktemp("ft")
    out, cache = root / "resumed", root / "cache"
    assert finetune.run(parse(base_args(data, out, cache, "--stop-after-epochs", "1"))) == 0
    first = json.loads((out / "finetune.json").read_text())
    assert finetune.run(parse(base_args(data, out, cache))) == 0
    return {"out": out, "cache": cache, "first": first, "final": json.loads((out / "finetune.json").read_text())}


def test_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(data=str(tmp_path), out=str(tmp_path), all_samples=True, strategy="horovod", zero_stage=5,
                       batch_size=10, micro_batch=4, workers=2, lr=-1.0, llm={"lora_r": 0})
    msg = str(e.value)
    for word in ("strategy", "zero_stage", "batch_size", "lr", "lora_r"):
        assert word in msg
    assert len(e.value.problems) >= 5


def test_deepspeed_config_and_schedule(tmp_path):
    cfg = FinetuneConfig(data=str(tmp_path), out=str(tmp_path), all_samples=True, batch_size=128, micro_batch=4,
                         workers=4, zero_stage=3, offload=True)
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == 3 and "offload_param" in ds["zero_optimization"]
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, world_size=4, on_gpu=True)["bf16"]["enabled"] is True
    assert lr_lambda(0, warmup_steps=4, total_steps=10) == pytest.approx(0.2)
    assert lr_lambda(4, warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert lr_lambda(10, warmup_steps=4, total_steps=10) == 0.0
    # ranks partition the epoch's permutation
    parts = [epoch_shard(10, epoch=1, seed=0, rank=r, world=2, per_rank=5) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_deepspeed_two_workers_identical_lora_and_resume(resumed):
    first, final = resumed["first"], resumed["final"]
    assert first["epochs_done"] == 1 and not first["finished"]
    assert final["epochs_done"] == 2 and final["finished"]
    # the resumed run kept epoch 1 as it was and continued
    assert final["train_losses"][0] == first["train_losses"][0]
    assert final["optimizer_steps"] == 2 * first["optimizer_steps"] > 0
    for h in final["history"]:
        sums = h["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], "LoRA weights differ across ranks"
    # training moved the weights
    assert final["history"][0]["rank_checksums"][0] != final["history"][1]["rank_checksums"][0]
    assert (resumed["out"] / "adapter" / "adapter_config.json").exists()
    assert final["samples_per_s"] > 0 and final["config"]["strategy"] == "deepspeed"


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_changed_config_is_refused(resumed, data):
    from jobs import finetune

    with pytest.raises(ResumeError):
        finetune.run(parse(base_args(data, resumed["out"], resumed["cache"], "--lr", "5e-4")))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_resume_matches_uninterrupted_run(resumed, data, tmp_path):
    from jobs import finetune

    out = tmp_path / "straight"
    assert finetune.run(parse(base_args(data, out, resumed["cache"]))) == 0
    straight = json.loads((out / "finetune.json").read_text())
    np.testing.assert_allclose(straight["train_losses"], resumed["final"]["train_losses"], rtol=1e-6)
    np.testing.assert_allclose(straight["val_losses"], resumed["final"]["val_losses"], rtol=1e-6)
    assert straight["history"][-1]["rank_checksums"][0]["sum"] == pytest.approx(
        resumed["final"]["history"][-1]["rank_checksums"][0]["sum"], rel=1e-6)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ddp_strategy_runs_same_loop(ray_cluster, data, tmp_path):
    from jobs import finetune

    out = tmp_path / "ddp"
    args = base_args(data, out, tmp_path / "cache", "--strategy", "ddp", "--epochs", "1")
    assert finetune.run(parse(args)) == 0
    rep = json.loads((out / "finetune.json").read_text())
    sums = rep["history"][0]["rank_checksums"]
    assert sums[0] == sums[1] and rep["optimizer_steps"] > 0
    assert (out / "adapter" / "adapter_config.json").exists()
