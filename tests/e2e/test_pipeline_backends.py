"""The whole product per backend, through the CLI (``jobs.cli.main``) on a tiny synthetic set:
prune -> finetune (on the prune run's selection) -> evaluate (the fine-tuned adapter) -> tune
(lambda x K on the prune run's scores). Each stage records the backend it ran with."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_prune_backend import synthetic_data, tiny_encoder  # noqa: F401 (the same fixtures)
from tests.e2e.test_prune_job import FAST

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]


@pytest.mark.parametrize("backend", ["bigrec", "textrec"])
def test_prune_finetune_evaluate_tune(ray_cluster, one_torch_thread, synthetic_data, tiny_encoder, tmp_path,
                                     backend):
    data, encoder = synthetic_data, tiny_encoder
    from jobs.cli import main

    cache = tmp_path / "cache"
    opts = ["--backend", backend] + (["--textrec-model", str(encoder)] if backend == "textrec" else [])
    gen = ["--beams", "1", "--max-new-tokens", "4"] if backend == "bigrec" else []
    run, ft = tmp_path / "run", tmp_path / "ft"
    assert main(["prune", "--data", str(data), "--out", str(run), *FAST, "--llm-cache", str(cache), "--budget", "16",
                 "--groups", "4", *opts]) == 0
    assert json.loads((run / "manifest.json").read_text())["backend"]["name"] == backend
    sel = pq.read_table(run / "selected.parquet").column("sample_id").to_numpy()
    assert len(sel) == 16

    llm = ["--cache-dir", str(cache)] if backend == "bigrec" else []
    assert main(["finetune", "--data", str(data), "--selected", str(run / "selected.parquet"), "--out", str(ft),
                 "--strategy", "local", "--epochs", "1", "--batch-size", "8", *opts, *llm]) == 0
    rep = json.loads((ft / "finetune.json").read_text())
    assert rep["backend"]["name"] == backend and rep["n_train"] == 16 and (ft / "adapter").is_dir()

    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", "--data", str(data), "--adapter", str(ft / "adapter"), "--split", "test", "--local",
                 "--max-users", "12", "--k", "5", "10", "20", "--out", str(metrics), *opts, *gen, *llm]) == 0
    m = json.loads(metrics.read_text())
    assert m["backend"]["name"] == backend and 0 <= m["metrics"]["ndcg@10"] <= 1
    with np.load(metrics.with_name("metrics.per_user.npz")) as z:
        assert len(z["user_ids"]) == m["metrics"]["users"] == 12

    assert main(["tune", "--run", str(run), "--data", str(data), "--search", "grid", "--lam", "0.3", "2",
                 "--groups", "4", "--budget", "16", "--epochs", "1", "--val-users", "6", "--batch-size", "8",
                 "--max-concurrent", "2", *opts, *gen, *(["--cache-dir", str(cache)] if backend == "bigrec" else [])]) == 0
    best = json.loads((run / "best_config.json").read_text())
    assert best["backend"]["name"] == backend and best["trials"] == 2 and best["lam"] in (0.3, 2.0)
