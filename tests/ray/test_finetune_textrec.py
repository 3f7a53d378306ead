"""The one fine-tune loop, textrec backend (MiniLM-like tiny BERT + LoRA, in-batch softmax): local,
DDP and DeepSpeed (ZeRO-2, gloo, fp32) train the same adapter. The item embeddings of every rank
are all-gathered with autograd by the backend, so each step is the whole batch's loss.

Dropout is switched off (BERT's and LoRA's) so that every run is a deterministic function of the
config. ~20-30 s per Ray Train run on an idle 2-core machine (the DeepSpeed shm comm op compiles
once per machine, ~40 s more); the DDP run is slow-tier.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.finetune import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GENRES = ["Quest", "Racer", "Arena", "Puzzle"]
WORDS = ["Alpha", "Bravo", "Delta", "Echo", "Omega", "Nova", "Zen", "Storm", "Ridge", "Vale", "Lunar", "Prime",
         "Rogue", "Titan", "Ember"]


def _tiny(tmp: Path, *, n_users: int = 64, seed: int = 0):
    """A learnable prepared folder (each user stays in one genre) and a tiny seeded BERT trained
    on its titles, dropout off: ``(data_dir, encoder_dir)``."""
    from engine.data.schema import PreparedWriter, atomic_dir
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder

    titles = [f"{g} {w}" for g in GENRES for w in WORDS]
    rng = np.random.default_rng(seed)
    data = tmp / "data"
    users, hist, tgt, test_h, test_t = [], [], [], [], []
    for u in range(n_users):
        g = int(rng.integers(0, len(GENRES)))
        pool = rng.permutation(np.arange(g * len(WORDS), (g + 1) * len(WORDS)))
        k = int(rng.integers(2, 6))
        users.append(f"u{u}")
        hist.append(pool[:k].tolist())
        tgt.append(int(pool[k]))
        test_h.append(pool[:k + 1].tolist())
        test_t.append(pool[k + 1:k + 3].tolist())
    with atomic_dir(data, overwrite=True) as w_dir:
        w = PreparedWriter(w_dir, rows_per_file=64)
        w.add_samples(users, hist, tgt)
        w.write_items(np.arange(len(titles)), titles)
        w.write_split("valid", users, hist, [[t] for t in tgt])
        w.write_split("test", users, test_h, test_t)
        w.close({"source": "test_finetune_textrec tiny"})
    enc = tmp / "encoder"
    build_tiny_encoder(enc, titles * 3 + [PROMPTS["games"].input_prefix] * 3, seed=seed)
    c = json.loads((enc / "config.json").read_text())
    c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (enc / "config.json").write_text(json.dumps(c))
    return data, enc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny(tmp_path_factory.mktemp("tiny"))


def _args(data, enc, out, *extra):
    from jobs import finetune

    p = argparse.ArgumentParser()
    finetune.add_arguments(p)
    return p.parse_args(["--backend", "textrec", "--textrec-model", str(enc), "--data", str(data), "--all",
                         "--out", str(out), "--epochs", "2", "--batch-size", "8", "--lr", "2e-2", "--lora-dropout",
                         "0", "--seed", "3", "--val-samples", "16", "--split", "test", "--max-eval-users", "30",
                         "--ks", "5", "10", "--workers", "2", *extra])


@pytest.fixture(scope="module")
def local(tiny, tmp_path_factory):
    from jobs import finetune

    data, enc = tiny
    out = tmp_path_factory.mktemp("trlocal") / "local"
    assert finetune.run(_args(data, enc, out, "--strategy", "local")) == 0
    return out


def _rep(out):
    return json.loads((Path(out) / "finetune.json").read_text())


def _check_same_adapter(out, local):
    from jobs import finetune

    rep, ref = _rep(out), _rep(local)
    assert rep["world"] == 2 and rep["optimizer_steps"] == ref["optimizer_steps"] == 2 * (64 // 8)
    np.testing.assert_allclose(rep["train_losses"], ref["train_losses"], rtol=1e-4)
    np.testing.assert_allclose(rep["val_losses"], ref["val_losses"], rtol=1e-4)
    # every rank holds the same LoRA, and it is the local run's (up to float rounding)
    assert len({c["sha256"] for c in rep["rank_checksums"]}) == 1
    assert rep["rank_checksums"][0]["sum"] == pytest.approx(ref["rank_checksums"][0]["sum"], rel=1e-4)
    np.testing.assert_allclose(finetune.read_per_user(out)["ndcg@10"], finetune.read_per_user(local)["ndcg@10"],
                               atol=1e-6)


def test_cli_records_the_backend_and_evaluates(local):
    rep = _rep(local)
    assert rep["backend"]["name"] == "textrec" and rep["config"]["backend"] == "textrec"
    assert rep["config"]["micro_batch"] is None and rep["config"]["lr_schedule"] == "constant"
    m = json.loads((local / "metrics.json").read_text())
    assert m["users"] == 30 and m["backend"]["name"] == "textrec" and "ndcg@10" in m
    assert all(np.isfinite(rep["val_losses"])) and rep["best_epoch"] in (1, 2)


def test_textrec_config_errors_name_field_and_value(tiny, tmp_path):
    from jobs import finetune

    data, enc = tiny
    with pytest.raises(ConfigError, match=r"micro_batch=2.*in-batch negatives"):
        finetune.config_from_args(_args(data, enc, tmp_path / "o", "--micro-batch", "2"))
    with pytest.raises(ConfigError, match="zero_stage=3"):
        finetune.config_from_args(_args(data, enc, tmp_path / "o", "--zero", "3"))
    with pytest.raises(ConfigError, match="textrec: lora_r=0"):
        FinetuneConfig(data=str(data), out=str(tmp_path), all_samples=True, backend="textrec",
                       textrec={"model": str(enc), "lora_r": 0})


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.parametrize("strategy", ["deepspeed", pytest.param("ddp", marks=pytest.mark.slow)])
def test_two_workers_train_the_local_adapter(ray_cluster, tiny, local, tmp_path, strategy):
    from jobs import finetune

    data, enc = tiny
    assert finetune.run(_args(data, enc, tmp_path / strategy, "--strategy", strategy)) == 0
    _check_same_adapter(tmp_path / strategy, local)
