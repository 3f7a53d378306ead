"""The one evaluator over ``backend.rank_items`` (engine.evaluate) and `dealrec evaluate --local`:

* the generic evaluator on a numpy backend: metrics = engine.metrics on the rankings, per-user
  values average to them, any user batch gives the same result, history exclusion is passed on;
* textrec through it == :func:`engine.llm.textrec.evaluate` (the evaluation every textrec number
  so far came from), bit for bit, for any user batch;
* BIGRec's rank_items: catalogue ids, history excluded, the same rows for any user batch, and
  the no-exclusion ranking with the history removed;
* the job through jobs.cli.main on a `dealrec prepare --format synthetic` folder, both backends.

Tiny seeded models (a 2-layer BERT, the tiny LLaMA); no Ray (the Ray pools are tests/ray/test_evaluate.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.evaluate import eval_users, evaluate_backend, score_rankings
from engine.metrics import recall_ndcg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KS = (1, 5, 10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from jobs.cli import main

    out = tmp_path_factory.mktemp("evb") / "data"
    assert main(["prepare", "--format", "synthetic", "--users", "120", "--items", "60", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def titles(data):
    from engine.data.schema import read_items

    return read_items(data).column("title").to_pylist()


@pytest.fixture(scope="module")
def test_split(data):
    from engine.data.schema import read_split

    return read_split(data, "test")


class NumpyBackend:
    """A backend ranking items by a fixed random score per (user history length, item)."""

    name = "numpy"

    def __init__(self, n_items: int):
        self.scores = np.random.default_rng(0).normal(size=(64, n_items))
        self.calls: list[int] = []

    def rank_items(self, model, histories, k, *, exclude=None):
        self.calls.append(len(histories))
        exclude = histories if exclude is None else exclude
        out = []
        for h, e in zip(histories, exclude):
            order = [int(i) for i in np.argsort(-self.scores[len(h) % 64], kind="stable") if int(i) not in set(e)]
            out.append(order[:k])
        return np.asarray(out, dtype=np.int64)


def test_generic_evaluator_on_a_numpy_backend(test_split, titles):
    be = NumpyBackend(len(titles))
    users = eval_users(test_split)
    assert len(users["user_id"]) == sum(1 for t in test_split.column("targets").to_pylist() if t)
    ref = None
    for ub in (1, 7, 1000):
        res = evaluate_backend(be, None, test_split, ks=KS, user_batch=ub)
        assert max(be.calls[-1:]) <= ub
        if ref is None:
            ref = res
            ranked = [be.rank_items(None, [h], max(KS))[0] for h in users["history"]]
            assert res["metrics"] == recall_ndcg(ranked, users["targets"], ks=KS)
            for key, v in res["per_user"].items():
                assert v.mean() == pytest.approx(res["metrics"][key], abs=1e-12)
            for h, r in zip(users["history"], res["ranked"]):  # history excluded by default
                assert not set(h) & set(r.tolist())
        assert res["metrics"] == ref["metrics"] and res["user_ids"] == ref["user_ids"]
        np.testing.assert_array_equal(res["ranked"], ref["ranked"])
    kept = evaluate_backend(be, None, test_split, ks=KS, exclude_history=False)
    ranked = [be.rank_items(None, [h], max(KS), exclude=[[]])[0] for h in users["history"]]
    assert kept["metrics"] == recall_ndcg(ranked, users["targets"], ks=KS)
    # a seeded subset: the same users for the same seed, in split order
    a = evaluate_backend(be, None, test_split, ks=KS, max_users=9, seed=4)
    b = evaluate_backend(be, None, test_split, ks=KS, max_users=9, seed=4)
    assert a["user_ids"] == b["user_ids"] and len(a["user_ids"]) == 9
    order = {u: i for i, u in enumerate(users["user_id"])}
    assert [order[u] for u in a["user_ids"]] == sorted(order[u] for u in a["user_ids"])


def test_score_rankings_pads_are_no_items():
    m, pu = score_rankings(np.array([[3, -1, -1], [-1, -1, -1]]), [[3], [4, 5]], ks=(1, 3))
    assert m["recall@1"] == 0.5 and pu["recall@1"].tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- textrec


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, titles):
    from engine.llm.bigrec.prompts import PROMPTS
    from engine.llm.textrec import build_tiny_encoder

    return str(build_tiny_encoder(tmp_path_factory.mktemp("enc"), titles * 2 + [PROMPTS["games"].input_prefix] * 3))


@pytest.fixture(scope="module")
def text_adapter(tmp_path_factory, encoder, titles):
    """A random (non-zero) textrec LoRA exported as a peft folder, as a fine-tune leaves it."""
    from engine.llm.textrec.backend import TextEncoderBackend

    be = TextEncoderBackend(titles, config={"model": encoder, "init_lora_weights": False, "lora_r": 4, "seed": 5,
                                            "max_len_user": 48, "max_len_item": 12})
    out = tmp_path_factory.mktemp("ft-text") / "adapter"
    be.build_model().encoder.save_pretrained(str(out))
    return out


def test_textrec_through_the_evaluator_equals_textrec_evaluate(data, titles, encoder, text_adapter):
    from engine.llm import get_backend
    from engine.llm.textrec import TextRecConfig
    from engine.llm.textrec import evaluate as textrec_evaluate

    cfg = TextRecConfig(model=encoder, max_len_user=48, max_len_item=12)  # LoRA shape comes from the folder
    be = get_backend("textrec", titles, config=cfg)
    model = be.load_model(str(text_adapter))
    assert model.cfg.lora_r == 4 and not model.training
    for split, max_users, seed in (("test", None, 0), ("valid", 25, 3)):
        want = textrec_evaluate(model, data, split, TextRecConfig.from_dict(dict(cfg.to_dict(), seed=seed)),
                                max_users=max_users, ks=KS)
        for ub in (1000, 8):
            got = evaluate_backend(be, model, data, split, ks=KS, max_users=max_users, seed=seed, user_batch=ub)
            assert got["user_ids"] == want["user_ids"]
            assert got["metrics"] == {k: want[k] for k in got["metrics"]}, (split, ub)
            for key in want["per_user"]:
                np.testing.assert_array_equal(got["per_user"][key], want["per_user"][key])


# ----------------------------------------------------------------------------- BIGRec


@pytest.fixture(scope="module")
def bigrec(tmp_path_factory, titles):
    """A tiny LLaMA with a random LoRA saved as an adapter, and a backend for it."""
    from engine.llm import get_backend
    from engine.llm.bigrec.model import LLMConfig, load_llm

    root = tmp_path_factory.mktemp("bigrec")
    llm = LLMConfig(cache_dir=str(root / "cache"), init_lora_weights=False).to_dict()
    model, _ = load_llm(llm, titles=titles)
    model.save_pretrained(str(root / "adapter"))
    be = get_backend("bigrec", titles, llm=llm, prompt="generic",
                     generation={"beams": 2, "max_new_tokens": 6, "batch_size": 4})
    return {"backend": be, "model": be.load_model(str(root / "adapter")), "root": root, "llm": llm}


def test_bigrec_rank_items_grounds_to_catalogue_ids_without_history(bigrec, test_split, titles):
    be, model = bigrec["backend"], bigrec["model"]
    hist = eval_users(test_split, max_users=12, seed=1)["history"]
    k = 20
    ranked = be.rank_items(model, hist, k)
    assert ranked.shape == (12, k) and ranked.dtype == np.int64
    assert ((ranked >= 0) & (ranked < len(titles))).all()
    for h, r in zip(hist, ranked):
        assert not set(h) & set(r.tolist()) and len(set(r.tolist())) == k
    # the ranking without exclusion, with the history dropped, is the same list
    kept = be.rank_items(model, hist, k + max(len(h) for h in hist), exclude=[[] for _ in hist])
    for h, r, full in zip(hist, ranked, kept):
        assert r.tolist() == [int(i) for i in full if int(i) not in set(h)][:k]
    # users are ranked independently: any split of the users gives the same rows
    parts = np.concatenate([be.rank_items(model, hist[:4], k), be.rank_items(model, hist[4:], k)])
    np.testing.assert_array_equal(parts, ranked)
    assert be.title_cache_hit is not None and be.title_cache_missing() is None


# ----------------------------------------------------------------------------- the job, in process


def test_job_textrec_local_equals_textrec_evaluate(data, titles, encoder, text_adapter, tmp_path, capsys):
    from engine.llm.textrec import TextRecConfig, build_model
    from engine.llm.textrec import evaluate as textrec_evaluate
    from engine.finetune.adapter import load_adapter
    from jobs.cli import main

    out = tmp_path / "m.json"
    argv = ["evaluate", "--backend", "textrec", "--textrec-model", encoder, "--data", str(data), "--adapter",
            str(text_adapter), "--local", "--max-users", "30", "--seed", "2", "--k", "5", "10", "--out", str(out)]
    assert main(argv) == 0
    assert "textrec test: 30 users" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["backend"]["name"] == "textrec" and rep["backend"]["options"]["config"]["model"] == encoder
    tc = TextRecConfig(model=encoder, lora_r=4, seed=2)  # the job read r=4 from the adapter folder
    want = textrec_evaluate(load_adapter(build_model(tc), text_adapter), data, "test", tc, max_users=30, ks=(5, 10))
    assert rep["metrics"] == {k: want[k] for k in rep["metrics"]}
    with np.load(tmp_path / "m.per_user.npz") as z:
        assert z["user_ids"].tolist() == want["user_ids"] and z["ranked"].shape == (30, 10)
        np.testing.assert_array_equal(z["ndcg@10"], want["per_user"]["ndcg@10"])
    # the same evaluation again: reused from the folder's manifest, files untouched
    before = out.read_bytes(), out.stat().st_mtime_ns
    assert main(argv) == 0
    assert "not repeated" in capsys.readouterr().out
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before
    # another evaluation into the same file: refused (exit 2, nothing changed) unless --overwrite
    other = [a if a != "30" else "20" for a in argv]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert out.read_bytes() == before[0]
    assert main(other + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["users"] == 20


def test_job_bigrec_local(data, bigrec, tmp_path, capsys):
    from jobs.cli import main

    bigrec["backend"].title_embeddings(bigrec["model"])  # fills the disk cache the job reads
    out = tmp_path / "m.json"
    argv = ["evaluate", "--data", str(data), "--adapter", str(bigrec["root"] / "adapter"), "--local",
            "--cache-dir", str(bigrec["root"] / "cache"), "--beams", "2", "--max-new-tokens", "6",
            "--batch-size", "4", "--max-users", "10", "--k", "5", "20", "--out", str(out)]
    assert main(argv) == 0
    assert "bigrec test: 10 users" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["backend"]["name"] == "bigrec" and rep["exclude_history"] is True and rep["users"] == 10
    assert rep["backend"]["options"]["generation"]["beams"] == 2
    assert rep["title_embedding_cache_hit"] is True
    with np.load(tmp_path / "m.per_user.npz") as z:
        for key in ("recall@5", "ndcg@20"):
            assert z[key].mean() == pytest.approx(rep["metrics"][key], abs=1e-12)
        assert ((z["ranked"] >= 0) & (z["ranked"] < 60)).all()


def test_job_takes_unset_text_options_from_the_finetune_record(tmp_path, data):
    """An adapter is evaluated on the prompt it was trained with (finetune_config.json beside it);
    an option given on the command line wins."""
    import argparse

    from engine.llm.bigrec.prompts import PROMPTS
    from jobs import evaluate as ev

    ad = tmp_path / "ft" / "adapter"
    ad.mkdir(parents=True)
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny"}))
    (ad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (tmp_path / "ft" / "finetune_config.json").write_text(json.dumps(
        {"config": {"backend": "bigrec", "prompt": "games", "cutoff_len": 256, "max_history": 4}}))
    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    _, spec = ev.config_from_args(p.parse_args(["--data", str(data), "--adapter", str(ad), "--local"]))
    assert spec["options"]["prompt"]["instruction"] == PROMPTS["games"].instruction
    assert spec["options"]["prompt"]["cutoff_len"] == 256 and spec["options"]["generation"]["max_history"] == 4
    _, spec = ev.config_from_args(p.parse_args(["--data", str(data), "--adapter", str(ad), "--local",
                                                "--prompt", "generic", "--max-history", "7"]))
    assert spec["options"]["prompt"]["instruction"] == PROMPTS["generic"].instruction
    assert spec["options"]["generation"]["max_history"] == 7


def test_job_user_errors_name_the_field(data, tmp_path, capsys):
    from jobs.cli import main

    rc = main(["evaluate", "--backend", "textrec", "--textrec-model", str(tmp_path / "nope"), "--data", str(data),
               "--local", "--user-batch", "0", "--out", str(tmp_path / "m.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "model=" in err and "nope" in err and "user_batch=0" in err
    assert not (tmp_path / "m.json").exists()
