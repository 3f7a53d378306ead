"""The one fine-tune loop, BIGRec backend: local, DDP and DeepSpeed train the same LoRA; exact resume.

LoRA dropout is 0, so every run is a deterministic function of the config and the strategies can
be compared (up to float rounding: ranks sum gradients in another order). The default tier runs
the local run (no Ray) only: the interrupted + resumed DeepSpeed run, DDP and ZeRO-3 are slow-tier
(the generic loop's DeepSpeed path stays in the default tier through test_finetune_textrec and
test_finetune_tiger).
The first DeepSpeed initialisation on a machine compiles its shared-memory comm op (~30-60 s,
cached in ~/.cache/torch_extensions); later Ray Train runs take ~20-30 s each on an idle 2-core
machine (minutes when it is shared).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from engine.data.schema import PreparedWriter, atomic_dir
from engine.errors import ConfigError, DealrecError, ResumeError
from engine.finetune import FinetuneConfig, deepspeed_config, epoch_shard, lr_lambda

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
            "--micro-batch", "2", "--epochs", "2", "--warmup-steps", "2", "--lr", "1e-3", "--lora-dropout", "0",
            "--cache-dir", str(cache), "--val-samples", "8", *extra]


def report(out):
    return json.loads((out / "finetune.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("ftdata") / "data", n_users=24)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ftcache")


@pytest.fixture(scope="module")
def local(data, cache, tmp_path_factory):
    """The local run (no Ray), interrupted after epoch 1 and resumed, and the same run uninterrupted."""
    from jobs import finetune

    root = tmp_path_factory.mktemp("ftlocal")
    out = root / "resumed"
    assert finetune.run(parse(base_args(data, out, cache, "--strategy", "local", "--stop-after-epochs", "1"))) == 0
    first = report(out)
    assert finetune.run(parse(base_args(data, out, cache, "--strategy", "local"))) == 0
    assert finetune.run(parse(base_args(data, root / "straight", cache, "--strategy", "local"))) == 0
    return {"out": out, "first": first, "final": report(out), "straight": report(root / "straight")}


def final_sum(rep):
    sums = rep["rank_checksums"]
    assert len({c["sha256"] for c in sums}) == 1, "LoRA weights differ across ranks"
    return sums[0]["sum"]


def test_config_reports_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        FinetuneConfig(data=str(tmp_path), out=str(tmp_path), all_samples=True, strategy="horovod", zero_stage=5,
                       batch_size=10, micro_batch=4, workers=2, lr=-1.0, llm={"lora_r": 0})
    msg = str(e.value)
    for word in ("strategy", "zero_stage", "batch_size", "lr", "lora_r"):
        assert word in msg
    assert len(e.value.problems) >= 5


def test_user_errors_are_named_config_errors(tmp_path, data):
    """Backend-specific refusals are ConfigErrors naming the field and value (never a bare ValueError)."""
    from jobs import finetune

    with pytest.raises(ConfigError, match=r"batch_size=8 must be a multiple of micro_batch x workers = 6"):
        finetune.config_from_args(parse(base_args(data, tmp_path / "o", tmp_path, "--micro-batch", "3")))
    with pytest.raises(ConfigError, match="backend='horovod'"):
        FinetuneConfig(data=str(data), out=str(tmp_path), all_samples=True, backend="horovod")
    with pytest.raises(ConfigError, match="textrec options given"):
        FinetuneConfig(data=str(data), out=str(tmp_path), all_samples=True, textrec={"lora_r": 4})
    with pytest.raises(DealrecError, match="sample_id outside"):
        finetune.load_examples(FinetuneConfig(data=str(data), out=str(tmp_path), sample_ids=[0, 999]))


def test_deepspeed_config_and_schedule(tmp_path):
    cfg = FinetuneConfig(data=str(tmp_path), out=str(tmp_path), all_samples=True, batch_size=128, micro_batch=4,
                         workers=4, zero_stage=3, offload=True)
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 128 and ds["gradient_accumulation_steps"] == 8
    assert ds["zero_optimization"]["stage"] == 3 and "offload_param" in ds["zero_optimization"]
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["bf16"]["enabled"] is False
    assert deepspeed_config(cfg, world_size=4, on_gpu=True)["bf16"]["enabled"] is True
    assert deepspeed_config(cfg, world_size=4, on_gpu=True, bf16=False)["bf16"]["enabled"] is False
    assert lr_lambda(0, warmup_steps=4, total_steps=10) == pytest.approx(0.2)
    assert lr_lambda(4, warmup_steps=4, total_steps=10) == pytest.approx(1.0)
    assert lr_lambda(10, warmup_steps=4, total_steps=10) == 0.0
    # ranks partition the epoch's permutation
    parts = [epoch_shard(10, epoch=1, seed=0, rank=r, world=2, per_rank=5) for r in range(2)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(10))


def test_local_resume_is_the_uninterrupted_run(local):
    first, final, straight = local["first"], local["final"], local["straight"]
    assert first["epochs_done"] == 1 and not first["finished"] and final["finished"] and final["epochs_done"] == 2
    assert final["train_losses"][0] == first["train_losses"][0]
    assert final["optimizer_steps"] == 2 * first["optimizer_steps"] == 2 * (24 // 8)
    # resumed from the epoch-1 checkpoint (LoRA, AdamW, schedule): bit for bit the straight run
    assert final["train_losses"] == straight["train_losses"] and final["val_losses"] == straight["val_losses"]
    assert final["rank_checksums"] == straight["rank_checksums"]
    assert final["history"][0]["rank_checksums"] != final["history"][1]["rank_checksums"]  # training moved it
    assert (local["out"] / "adapter" / "adapter_config.json").exists()
    assert final["backend"]["name"] == "bigrec" and final["strategy"] == "local"


def test_finished_run_is_reused_and_changed_config_refused(local, data, cache):
    from jobs import finetune

    out = local["out"]
    cfg = finetune.config_from_args(parse(base_args(data, out, cache, "--strategy", "local")))
    assert finetune.fit(cfg, log=None)["trained"] is False  # finished: not trained again
    with pytest.raises(ResumeError, match="--overwrite"):
        finetune.run(parse(base_args(data, out, cache, "--strategy", "local", "--lr", "5e-4")))
    changed = finetune.config_from_args(parse(base_args(data, out, cache, "--strategy", "local", "--lr", "5e-4")))
    assert finetune.check_resume(changed, overwrite=True) is True  # --overwrite would discard it


@pytest.fixture(scope="module")
def deepspeed_run(ray_cluster, data, cache, tmp_path_factory):
    """2 DeepSpeed workers (ZeRO-2), interrupted after epoch 1 and resumed."""
    from jobs import finetune

    out = tmp_path_factory.mktemp("ftds") / "ds"
    assert finetune.run(parse(base_args(data, out, cache, "--stop-after-epochs", "1"))) == 0
    first = report(out)
    assert finetune.run(parse(base_args(data, out, cache))) == 0
    return {"out": out, "first": first, "final": report(out)}


@pytest.mark.ray
@pytest.mark.slow  # ~85 s; the default tier keeps DeepSpeed through test_finetune_textrec / test_finetune_tiger
@pytest.mark.timeout(900)
def test_deepspeed_resumes_and_trains_the_local_adapter(deepspeed_run, local):
    first, final = deepspeed_run["first"], deepspeed_run["final"]
    assert first["epochs_done"] == 1 and not first["finished"] and final["epochs_done"] == 2 and final["finished"]
    assert final["train_losses"][0] == first["train_losses"][0]
    assert final["optimizer_steps"] == local["final"]["optimizer_steps"]
    for h in final["history"]:
        assert len(h["rank_checksums"]) == 2 and h["rank_checksums"][0] == h["rank_checksums"][1]
    # the same micro-batches per step as the local run: the same adapter up to float rounding
    np.testing.assert_allclose(final["train_losses"], local["final"]["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(final["val_losses"], local["final"]["val_losses"], rtol=1e-5)
    assert final_sum(final) == pytest.approx(final_sum(local["final"]), rel=1e-5)
    assert (deepspeed_run["out"] / "adapter" / "adapter_config.json").exists()
    assert final["config"]["strategy"] == "deepspeed" and final["backend"]["name"] == "bigrec"


@pytest.mark.ray
@pytest.mark.slow  # needs the DeepSpeed run above; the refusal itself is default-tier in test_rundir / test_finetune_local
@pytest.mark.timeout(900)
def test_changed_config_is_refused_on_ray(deepspeed_run, data, cache):
    from jobs import finetune

    with pytest.raises(ResumeError):
        finetune.run(parse(base_args(data, deepspeed_run["out"], cache, "--lr", "5e-4")))


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra", [pytest.param(["--strategy", "ddp"], id="ddp", marks=pytest.mark.slow),
                                   pytest.param(["--zero", "3"], id="zero3", marks=pytest.mark.slow)])
def test_ddp_and_zero3_train_the_local_adapter(ray_cluster, data, cache, local, tmp_path, extra):
    from jobs import finetune

    out = tmp_path / "run"
    assert finetune.run(parse(base_args(data, out, cache, *extra))) == 0
    rep = report(out)
    np.testing.assert_allclose(rep["train_losses"], local["final"]["train_losses"], rtol=1e-5)
    assert final_sum(rep) == pytest.approx(final_sum(local["final"]), rel=1e-5)
    assert (out / "adapter" / "adapter_config.json").exists()
