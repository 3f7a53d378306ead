"""Text-encoder fine-tune on Ray Train: 2-worker DeepSpeed (ZeRO-2, gloo, fp32) trains the adapter of
a local run of the same config (item embeddings all-gathered with autograd: the whole batch's loss).

Dropout is switched off (BERT's and LoRA's) so that both runs are deterministic functions of the
config. ~30-40 s on 2 cores (the DeepSpeed shm comm op compiles once per machine, ~40 s more).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jobs import finetune_textrec as ftr


def _tiny(tmp: Path):
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "selection_quality.py"
    spec = importlib.util.spec_from_file_location("selection_quality", path)
    sq = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("selection_quality", sq)
    spec.loader.exec_module(sq)
    data, enc, _ = sq.make_tiny_dataset(tmp, n_users=64)
    c = json.loads((enc / "config.json").read_text())
    c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (enc / "config.json").write_text(json.dumps(c))
    return data, enc


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_deepspeed_two_workers_matches_local(ray_cluster, tmp_path):
    data, enc = _tiny(tmp_path / "tiny")
    tc = {"model": str(enc), "max_len_user": 48, "max_len_item": 8, "epochs": 2, "batch_size": 8, "lr": 2e-2,
          "lora_dropout": 0.0, "init_lora_weights": False, "seed": 3}
    common = dict(data=str(data), sample_ids=list(range(40)), textrec=tc, ks=(5, 10), max_eval_users=30,
                  workers_cpu=1.0)
    local = ftr.fit(ftr.TextFinetuneConfig(out=str(tmp_path / "local"), strategy="local", **common), log=None)
    ds = ftr.fit(ftr.TextFinetuneConfig(out=str(tmp_path / "ds"), strategy="deepspeed", workers=2, zero_stage=2,
                                        **common), log=None)
    lt, dt = local["train"], ds["train"]
    assert dt["world"] == 2 and dt["optimizer_steps"] == lt["optimizer_steps"] == 2 * (40 // 8)
    np.testing.assert_allclose(dt["train_losses"], lt["train_losses"], rtol=1e-4)
    # every rank holds the same LoRA, and it is the local run's (up to float rounding)
    sums = [c["sum"] for c in dt["rank_checksums"]]
    assert len(set(c["sha256"] for c in dt["rank_checksums"])) == 1
    assert sums[0] == pytest.approx(lt["rank_checksums"][0]["sum"], rel=1e-4)
    assert (tmp_path / "ds" / "adapter" / "adapter_config.json").exists()
    np.testing.assert_allclose(ftr.read_per_user(tmp_path / "ds")["ndcg@10"],
                               ftr.read_per_user(tmp_path / "local")["ndcg@10"], atol=1e-6)
