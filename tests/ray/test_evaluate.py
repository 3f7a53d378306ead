"""`dealrec evaluate` end to end on a tiny prepared data set: the Ray Data pools (TitleEmbedder, Ranker)
against the in-process path, for BIGRec and textrec; history exclusion; metrics JSON + per-user npz."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from engine.data.schema import PreparedWriter, atomic_dir, read_items


def make_tiny_data(out, *, n_users=40, n_items=30, seed=1):
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "quest", "star", "war", "tiny", "hero", "dark", "soul", "kart"]
    titles = [" ".join(rng.choice(words, size=2)) + f" {i % 25}" for i in range(n_items)]
    titles[7] = titles[2]  # duplicate title
    with atomic_dir(out, overwrite=True) as tmp:
        w = PreparedWriter(tmp, rows_per_file=16)
        seqs = [rng.integers(0, n_items, size=rng.integers(3, 8)).tolist() for _ in range(n_users)]
        w.add_samples([f"u{u}" for u in range(n_users)], [s[:-1] for s in seqs], [s[-1] for s in seqs])
        w.write_items(np.arange(n_items), titles)
        for split in ("valid", "test"):
            su = [f"u{u}" for u in range(n_users) if u % 3]
            targets = [rng.integers(0, n_items, size=rng.integers(1, 4)).tolist() for _ in su]
            targets[0] = []  # a user without items in the period is not scored
            w.write_split(split, su, [rng.integers(0, n_items, size=4).tolist() for _ in su], targets)
        w.close({"source": "test"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.llm.bigrec.model import LLMConfig, load_llm

    root = tmp_path_factory.mktemp("ev")
    data = make_tiny_data(root / "data")
    cache = root / "cache"
    titles = read_items(data).column("title").to_pylist()
    model, _ = load_llm(LLMConfig(cache_dir=str(cache), init_lora_weights=False), titles=titles)
    model.save_pretrained(str(root / "adapter"))
    return {"root": root, "data": data, "cache": cache, "adapter": root / "adapter"}


def parse(argv):
    from jobs import evaluate

    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    return p.parse_args(argv)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_evaluate_end_to_end_writes_all_k(ray_cluster, setup):
    from jobs import evaluate

    common = ["--data", str(setup["data"]), "--adapter", str(setup["adapter"]), "--split", "test",
              "--beams", "2", "--max-new-tokens", "8", "--cache-dir", str(setup["cache"]), "--batch-size", "4",
              "--user-batch", "8"]
    out = setup["root"] / "m-ray.json"
    assert evaluate.run(parse(common + ["--out", str(out), "--workers", "1", "--keep-history"])) == 0
    rep = json.loads(out.read_text())
    assert rep["backend"]["name"] == "bigrec" and rep["exclude_history"] is False
    for k in (5, 10, 20, 50):
        for name in ("recall", "ndcg"):
            assert 0.0 <= rep["metrics"][f"{name}@{k}"] <= 1.0
    n_with_targets = sum(1 for u in range(40) if u % 3) - 1
    assert rep["metrics"]["users"] == rep["users"] == n_with_targets
    # recall is monotone in K; with 30 items and K=50 every target is retrieved
    assert rep["metrics"]["recall@5"] <= rep["metrics"]["recall@10"] <= rep["metrics"]["recall@20"]
    assert rep["metrics"]["recall@50"] == pytest.approx(1.0)
    assert not rep["title_embedding_cache_hit"]  # the TitleEmbedder pool filled it
    with np.load(setup["root"] / "m-ray.per_user.npz") as z:
        ray_ranked = z["ranked"]
        assert z["recall@20"].mean() == pytest.approx(rep["metrics"]["recall@20"], abs=1e-12)

    # the in-process path gives the same rankings, and reuses the cached item embeddings
    out2 = setup["root"] / "m-local.json"
    assert evaluate.run(parse(common + ["--out", str(out2), "--local", "--keep-history"])) == 0
    rep2 = json.loads(out2.read_text())
    assert rep2["title_embedding_cache_hit"]
    for key, v in rep["metrics"].items():
        assert rep2["metrics"][key] == pytest.approx(v, abs=1e-9)
    with np.load(setup["root"] / "m-local.per_user.npz") as z:
        np.testing.assert_array_equal(z["ranked"], ray_ranked)

    # the protocol's default drops each user's history from the ranking
    out3 = setup["root"] / "m-excl.json"
    assert evaluate.run(parse(common + ["--out", str(out3), "--local"])) == 0
    with np.load(setup["root"] / "m-excl.per_user.npz") as z:
        excl = z["ranked"]
    from engine.data.schema import read_split
    from engine.evaluate import eval_users

    hist = eval_users(read_split(setup["data"], "test"))["history"]
    for h, r, full in zip(hist, excl, ray_ranked):
        assert r.tolist() == ([int(i) for i in full if int(i) not in set(h)] + [-1] * len(h))[:50]


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_textrec_ray_pool_equals_local(ray_cluster, setup):
    """`--backend textrec` through the Ranker pool (2 actors) ranks exactly as in process."""
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder
    from engine.llm.textrec.backend import TextEncoderBackend
    from jobs import evaluate

    titles = read_items(setup["data"]).column("title").to_pylist()
    enc = str(build_tiny_encoder(setup["root"] / "enc", titles * 2 + [PROMPTS["games"].input_prefix] * 2))
    be = TextEncoderBackend(titles, config={"model": enc, "init_lora_weights": False, "seed": 2})
    be.build_model().encoder.save_pretrained(str(setup["root"] / "text-adapter"))
    common = ["--backend", "textrec", "--textrec-model", enc, "--data", str(setup["data"]), "--adapter",
              str(setup["root"] / "text-adapter"), "--split", "valid", "--user-batch", "5"]
    got = {}
    for mode, extra in (("ray", ["--workers", "2"]), ("local", ["--local"])):
        out = setup["root"] / f"t-{mode}.json"
        assert evaluate.run(parse(common + extra + ["--out", str(out)])) == 0
        with np.load(setup["root"] / f"t-{mode}.per_user.npz") as z:
            got[mode] = (json.loads(out.read_text())["metrics"], z["ranked"], z["user_ids"].tolist())
    assert got["ray"][0] == got["local"][0] and got["ray"][2] == got["local"][2]
    np.testing.assert_array_equal(got["ray"][1], got["local"][1])


class SlowRanker:
    """actors.rank.Ranker whose every batch takes 8 s (imported lazily: workers import this module)."""

    def __init__(self, **kw):
        from actors.rank import Ranker

        self.inner = Ranker(**kw)

    def __call__(self, batch):
        import time

        time.sleep(8.0)
        return self.inner(batch)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_rank_pool_outlives_ray_datas_guard_and_a_pool_that_cannot_start_stalls(ray_cluster, setup):
    """A block ranked for longer than Ray Data's no-progress guard (30 min by default; 3 s here) is
    not a stall while its actor beats: it failed a working evaluation (ExecutionTimeoutError). A pool
    that cannot be placed (a GPU on a CPU cluster) still fails, as a StallError naming the knobs."""
    import ray

    from actors.shards import StallError
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder
    from engine.llm.textrec.backend import TextEncoderBackend
    from jobs import evaluate

    titles = read_items(setup["data"]).column("title").to_pylist()
    enc = str(build_tiny_encoder(setup["root"] / "enc-slow", titles * 2 + [PROMPTS["games"].input_prefix] * 2))
    TextEncoderBackend(titles, config={"model": enc, "init_lora_weights": False, "seed": 2}).build_model() \
        .encoder.save_pretrained(str(setup["root"] / "text-adapter-slow"))
    _, spec = evaluate.config_from_args(parse(["--backend", "textrec", "--textrec-model", enc, "--data",
                                               str(setup["data"]), "--adapter", str(setup["root"] / "text-adapter-slow")]))
    titles_ref = ray.put(titles)
    hist, ex = [[1, 2, 3], [4, 5], [6]] * 2, [[]] * 6
    ref = evaluate.rank_ray(ray, spec, titles_ref, workers=1, use_gpu=False, user_batch=6)(hist, ex, 5)
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_no_progress_timeout_s
    ctx.execution_no_progress_timeout_s = 3.0
    try:
        got = evaluate.rank_ray(ray, spec, titles_ref, workers=1, use_gpu=False, user_batch=6, stall=(0, 30.0),
                                ranker=SlowRanker)(hist, ex, 5)
    finally:
        ctx.execution_no_progress_timeout_s = before
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(StallError, match=r"(?s)no batch scored .* --workers 1 / --gpu, --stall-timeout-s 3"):
        evaluate.rank_ray(ray, spec, titles_ref, workers=1, use_gpu=True, user_batch=6, stall=(0, 3.0))(hist, ex, 5)


def test_bad_arguments_reported_together(setup, tmp_path):
    from engine.errors import ConfigError
    from jobs import evaluate

    args = parse(["--data", str(tmp_path / "nope"), "--adapter", str(tmp_path), "--beams", "0", "--k", "0"])
    with pytest.raises(ConfigError) as e:
        evaluate.config_from_args(args)
    assert len(e.value.problems) >= 4
