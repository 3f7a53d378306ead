"""`dealrec finetune --backend textrec --strategy local` (no Ray): adapter export and reload through
the generic evaluator, reuse of a finished run and evaluation, the wall-time budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.data.schema import PreparedWriter, atomic_dir
from engine.errors import ResumeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from engine.llm.textrec import build_tiny_encoder

    root = tmp_path_factory.mktemp("ft-local")
    rng = np.random.default_rng(0)
    titles = [f"{g} {w}" for g in ("Quest", "Racer") for w in ("Alpha", "Bravo", "Delta", "Echo", "Nova", "Zen")]
    seqs = [rng.permutation(12)[: rng.integers(3, 7)].tolist() for _ in range(40)]
    with atomic_dir(root / "data", overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=16)
        w.add_samples([f"u{i}" for i in range(40)], [s[:-1] for s in seqs], [s[-1] for s in seqs])
        w.write_items(np.arange(12), titles)
        for split in ("valid", "test"):
            w.write_split(split, [f"u{i}" for i in range(40)], [s for s in seqs], [[int(rng.integers(12))] for _ in seqs])
        w.close({"source": "test_finetune_local"})
    enc = build_tiny_encoder(root / "enc", titles * 3 + ["The user has purchased the following"] * 3)
    return root / "data", enc


def _run(tiny, out, *extra):
    from jobs.cli import main

    data, enc = tiny
    return main(["finetune", "--data", str(data), "--all", "--out", str(out), "--backend", "textrec",
                 "--textrec-model", str(enc), "--strategy", "local", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.02", "--val-samples", "0", *extra])


def test_local_textrec_exports_adapter_reused_and_reloadable(tiny, tmp_path):
    from engine.evaluate import evaluate_backend
    from engine.llm import get_backend
    from jobs.finetune import read_per_user

    out = tmp_path / "ft"
    assert _run(tiny, out, "--split", "test", "--max-eval-users", "30", "--ks", "5", "10") == 0
    rep = json.loads((out / "finetune.json").read_text())
    assert rep["n_train"] == 40 and rep["optimizer_steps"] == 2 * (40 // 8) and rep["backend"]["name"] == "textrec"
    m = json.loads((out / "metrics.json").read_text())
    pu = read_per_user(out)
    assert len(pu["user_ids"]) == 30
    np.testing.assert_allclose(pu["ndcg@10"].mean(), m["ndcg@10"] if "ndcg@10" in m else m["metrics"]["ndcg@10"])
    # the exported adapter, reloaded through the backend, gives the same ranking metrics
    data, enc = tiny
    from engine.data.schema import read_items

    be = get_backend("textrec", read_items(data).column("title").to_pylist(),
                     config=json.loads((out / "finetune_config.json").read_text())["backend"]["options"]["config"])
    again = evaluate_backend(be, be.load_model(out / "adapter"), data, "test", ks=(5, 10), max_users=30, seed=0)
    np.testing.assert_allclose(again["per_user"]["ndcg@10"], pu["ndcg@10"], rtol=1e-5, atol=1e-6)
    stamp = (out / "finetune.json").stat().st_mtime_ns
    assert _run(tiny, out, "--split", "test", "--max-eval-users", "30", "--ks", "5", "10") == 0  # nothing to do
    assert (out / "finetune.json").stat().st_mtime_ns == stamp
    assert _run(tiny, out, "--lr", "0.001") == 2  # another training config: refused, named
    # other evaluation options: evaluated again (RunDir stage `evaluate`), never retrained
    assert _run(tiny, out, "--split", "test", "--max-eval-users", "20", "--ks", "5", "10") == 0
    assert (out / "finetune.json").stat().st_mtime_ns == stamp and len(read_per_user(out)["user_ids"]) == 20
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert stages["train"]["done"] and stages["evaluate"]["done"] and stages["evaluate"]["users"] == 20


def test_time_budget_stops_training(tiny, tmp_path):
    out = tmp_path / "tb"
    assert _run(tiny, out, "--epochs", "50", "--time-budget-s", "1e-6") == 0
    rep = json.loads((out / "finetune.json").read_text())
    assert rep["stopped_by_time_budget"] and rep["optimizer_steps"] == 1


def test_retrain_with_overwrite_drops_the_earlier_models_evaluations(tiny, tmp_path):
    """`dealrec evaluate` metrics beside the adapter belong to the model they measured: a retrain
    (--overwrite) deletes them (they would be read as the new model's), and the new model's
    evaluation then runs without --overwrite; an unchanged rerun keeps them."""
    from jobs.cli import main

    data, enc = tiny
    out = tmp_path / "ft"

    def evaluate():
        return main(["evaluate", "--data", str(data), "--adapter", str(out / "adapter"), "--split", "test",
                     "--backend", "textrec", "--textrec-model", str(enc), "--local", "--max-users", "10",
                     "--k", "5", "10", "20"])

    assert _run(tiny, out) == 0 and evaluate() == 0
    first = (out / "metrics-test.json").read_bytes()
    assert _run(tiny, out) == 0  # same config: nothing retrained, the evaluation kept
    assert (out / "metrics-test.json").read_bytes() == first
    assert _run(tiny, out, "--lr", "0.001", "--overwrite") == 0
    assert not (out / "metrics-test.json").exists() and not (out / "metrics-test.per_user.npz").exists()
    assert not any(s.startswith("evaluate:") for s in json.loads((out / "manifest.json").read_text())["stages"])
    assert evaluate() == 0  # the retrained adapter: evaluated, not refused
    assert (out / "metrics-test.json").read_bytes() != first
