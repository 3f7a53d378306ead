"""LLM loading: tiny base is deterministic and cached; LoRA wrapping, adapters, config checks."""

from __future__ import annotations

import os

import pytest
import torch

from engine.llm.bigrec import model as llm_mod
from engine.errors import ConfigError
from engine.llm.bigrec.model import LLMConfig, build_tiny_base, load_llm, resolve_base

TITLES = ["Space Quest", "Kart Racer Deluxe", "Puzzle Arena", "Legends of the Sword", "Retro Saga II"] * 4


def _state(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_tiny_build_is_deterministic(tmp_path):
    cfg = LLMConfig(seed=3)
    a = build_tiny_base(cfg, TITLES, tmp_path / "a")
    b = build_tiny_base(cfg, TITLES, tmp_path / "b")
    c = build_tiny_base(LLMConfig(seed=4), TITLES, tmp_path / "c")
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_resolve_base_caches(tmp_path, monkeypatch):
    cfg = LLMConfig(cache_dir=str(tmp_path / "cache"))
    p1 = resolve_base(cfg, TITLES)
    assert os.path.basename(p1).startswith("tiny-")

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(llm_mod, "build_tiny_base", boom)
    assert resolve_base(cfg, TITLES) == p1
    assert resolve_base(LLMConfig(cache_dir=str(tmp_path / "cache"), lora_r=4), TITLES) == p1  # LoRA not in key
    with pytest.raises(AssertionError):
        resolve_base(cfg, TITLES + ["New Title"])  # other titles -> other base
    assert [n for n in os.listdir(tmp_path / "cache") if ".tmp-" in n] == []
    with pytest.raises(ConfigError, match="titles"):
        resolve_base(cfg, None)
    assert resolve_base(LLMConfig(model="/some/folder")) == "/some/folder"


def test_load_llm_lora_and_adapter_roundtrip(tmp_path):
    cfg = LLMConfig(cache_dir=str(tmp_path / "cache"))
    model, tok = load_llm(cfg, titles=TITLES)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert tok.pad_token_id is not None and tok.padding_side == "right"

    rnd, _ = load_llm(LLMConfig(cache_dir=str(tmp_path / "cache"), init_lora_weights=False, seed=1), titles=TITLES)
    rnd.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_llm(LLMConfig(cache_dir=str(tmp_path / "cache"), adapter=str(tmp_path / "adapter"), seed=1),
                         titles=TITLES)
    sd_a = {n: p for n, p in rnd.named_parameters() if "lora_" in n}
    sd_b = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert all(p.requires_grad for p in sd_b.values())
    frozen, _ = load_llm(cfg, titles=TITLES, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_config_reports_every_problem():
    with pytest.raises(ConfigError) as e:
        LLMConfig(lora_r=0, lora_dropout=1.5, dtype="fp8", device="tpu", tiny_hidden=30, tiny_heads=4,
                  target_modules=())
    assert len(e.value.problems) == 6
    with pytest.raises(ConfigError, match="unknown field"):
        LLMConfig.from_dict({"lora_rank": 8})
    assert LLMConfig.from_dict({"target_modules": ["q_proj"]}).target_modules == ("q_proj",)
    with pytest.raises(ConfigError, match="cannot load|not found|target_modules"):
        load_llm(LLMConfig(model="/nonexistent/model"))
