"""The one fine-tune loop, TIGER backend (issue #19): every parameter trains, and local, DDP (2 Ray
Train workers, gloo) and DeepSpeed ZeRO-2 runs of one config train the same weights up to float
rounding; the local run resumes exactly from an epoch checkpoint (the whole model + AdamW), the
DeepSpeed run from its ZeRO checkpoint.

Dropout is 0 (``--tiger-config``), so each run is a deterministic function of the config. The
model is a 1+1-layer d_model-32 T5 over 2 x 8 semantic-ID codes (built from seeded random
embeddings: no encoder), so a Ray Train run costs its worker start-up, not its steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_finetune import make_tiny_data, parse  # tests/ray is on sys.path (no __init__.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"num_layers": 1, "num_decoder_layers": 1, "d_model": 32, "d_kv": 8, "num_heads": 2, "d_ff": 64,
        "n_user_tokens": 16, "dropout": 0, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_data(tmp_path_factory.mktemp("tiger-ftdata") / "data", n_users=24)


@pytest.fixture(scope="module")
def sids(data, tmp_path_factory):
    from engine.data.schema import read_items
    from engine.semantic_ids import build_semantic_ids, write_semantic_ids

    titles = read_items(data).column("title").to_pylist()
    s = build_semantic_ids(titles, None, {"levels": 2, "codes": 8},
                           embeddings=np.random.default_rng(0).normal(size=(len(titles), 8)))
    return write_semantic_ids(tmp_path_factory.mktemp("tiger-sid") / "sid", s)


def args(data, sids, out, *extra):
    return ["--data", str(data), "--all", "--out", str(out), "--backend", "tiger", "--semantic-ids", str(sids),
            "--tiger-config", json.dumps(TINY), "--workers", "2", "--batch-size", "8", "--epochs", "2",
            "--warmup-steps", "2", "--lr", "3e-3", "--val-samples", "8", *extra]


def report(out):
    return json.loads((out / "finetune.json").read_text())


def weights(out) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def local(data, sids, tmp_path_factory):
    """The local run (no Ray) straight, and interrupted after epoch 1 and resumed."""
    from jobs import finetune

    root = tmp_path_factory.mktemp("tiger-ftlocal")
    assert finetune.run(parse(args(data, sids, root / "straight", "--strategy", "local"))) == 0
    out = root / "resumed"
    assert finetune.run(parse(args(data, sids, out, "--strategy", "local", "--stop-after-epochs", "1"))) == 0
    first = report(out)
    assert finetune.run(parse(args(data, sids, out, "--strategy", "local"))) == 0
    return {"out": root / "straight", "final": report(root / "straight"), "first": first, "resumed": out}


def assert_same_weights(out, ref_out):
    got, ref = weights(out), weights(ref_out)
    assert sorted(got) == sorted(ref)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=2e-6, err_msg=k)


def test_local_full_finetune_exports_the_model_and_resumes_exactly(local, data, sids):
    import torch

    from engine.data.schema import read_items
    from engine.llm import get_backend

    final, first = local["final"], local["first"]
    out = local["out"]
    assert final["backend"]["name"] == "tiger" and final["finished"] and final["epochs_done"] == 2
    assert final["optimizer_steps"] == 2 * (24 // 8)
    # the whole model, in the backend's save_model format; no LoRA adapter
    assert (out / "model" / "tiger_layout.json").is_file() and not (out / "adapter").exists()
    man = json.loads((out / "manifest.json").read_text())
    assert man["backend"]["name"] == "tiger" and man["stages"]["train"]["trained"] == "model"
    # resumed from the epoch-1 checkpoint (every parameter, AdamW, schedule): the straight run bit for bit
    resumed = report(local["resumed"])
    assert first["epochs_done"] == 1 and not first["finished"]
    assert resumed["train_losses"] == final["train_losses"] and resumed["val_losses"] == final["val_losses"]
    assert resumed["rank_checksums"] == final["rank_checksums"]
    # every parameter trained: each tensor moved from the seeded init; reloaded, it is the exported one
    be = get_backend("tiger", read_items(data).column("title").to_pylist(), config=TINY, semantic_ids=str(sids))
    init = {n: p.detach().numpy() for n, p in be.build_model().named_parameters()}
    trained = be.load_model(str(out / "model"))
    assert not trained.training
    w = weights(out)
    for n, p in trained.named_parameters():
        key = n if n in w else "shared.weight"  # encoder/decoder embeddings are the one shared table
        assert torch.equal(p.detach(), torch.from_numpy(w[key])), n
        assert not np.array_equal(p.detach().numpy(), init[n]), f"{n} did not train"
    assert final["val_losses"][-1] < final["val_losses"][0]


@pytest.fixture(scope="module")
def deepspeed_run(ray_cluster, data, sids, tmp_path_factory):
    """2 DeepSpeed workers (ZeRO-2), interrupted after epoch 1 and resumed."""
    from jobs import finetune

    out = tmp_path_factory.mktemp("tiger-ftds") / "ds"
    assert finetune.run(parse(args(data, sids, out, "--stop-after-epochs", "1"))) == 0
    first = report(out)
    assert finetune.run(parse(args(data, sids, out))) == 0
    return {"out": out, "first": first, "final": report(out)}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_deepspeed_trains_the_local_weights_and_resumes(deepspeed_run, local):
    first, final = deepspeed_run["first"], deepspeed_run["final"]
    assert first["epochs_done"] == 1 and not first["finished"] and final["finished"] and final["epochs_done"] == 2
    assert final["config"]["strategy"] == "deepspeed" and final["world"] == 2 and final["backend"]["name"] == "tiger"
    for h in final["history"]:
        assert len(h["rank_checksums"]) == 2 and h["rank_checksums"][0] == h["rank_checksums"][1]
    np.testing.assert_allclose(final["train_losses"], local["final"]["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(final["val_losses"], local["final"]["val_losses"], rtol=1e-5)
    assert_same_weights(deepspeed_run["out"], local["out"])


@pytest.mark.ray
@pytest.mark.timeout(900)
@pytest.mark.parametrize("extra", [pytest.param(["--strategy", "ddp"], id="ddp"),
                                   pytest.param(["--zero", "3"], id="zero3", marks=pytest.mark.slow)])
def test_ddp_and_zero3_train_the_local_weights(ray_cluster, data, sids, local, tmp_path, extra):
    from jobs import finetune

    out = tmp_path / "run"
    assert finetune.run(parse(args(data, sids, out, *extra))) == 0
    rep = report(out)
    assert rep["world"] == 2 and all(len(h["rank_checksums"]) == 2 for h in rep["history"])
    assert rep["history"][-1]["rank_checksums"][0] == rep["history"][-1]["rank_checksums"][1]
    np.testing.assert_allclose(rep["train_losses"], local["final"]["train_losses"], rtol=1e-5)
    assert_same_weights(out, local["out"])
