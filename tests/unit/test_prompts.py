"""BIGRec prompts: record/template text, oldest-first truncation, labels, batching, padding-free loss."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.llm.bigrec.model import LLMConfig, load_llm
from engine.llm.bigrec.prompts import (
    PROMPTS,
    PromptConfig,
    collate,
    encode_prompt,
    encode_sample,
    get_prompt_config,
    make_record,
    per_sample_causal_lm_loss,
    render_prompt,
)

TITLES = [f"Game {i} {w}" for i, w in enumerate(["Quest", "Racer", "Arena", "Legends", "Puzzle", "Saga"] * 10)]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "dealrec-cache"
    return load_llm(LLMConfig(cache_dir=str(cache)), titles=TITLES)


def test_record_and_template_follow_bigrec():
    rec = make_record(["A b", "C\nd"], "E", PROMPTS["games"])
    assert rec["instruction"] == PROMPTS["games"].instruction
    assert rec["input"] == "The user has purchased the following game products before, with titles as: A b; Cd;"
    assert rec["output"] == "E"
    text = render_prompt(rec, with_output=True)
    assert text.startswith("Below is an instruction that describes a task")
    assert text.endswith("### Input:\n" + rec["input"] + "\n\n### Response:\nE")
    assert render_prompt(rec, with_output=False).endswith("### Response:\n")
    assert make_record([], None, PROMPTS["book"])["output"] == ""


def test_presets_and_validation():
    assert set(PROMPTS) >= {"games", "book", "movies", "generic"}
    assert get_prompt_config("games", cutoff_len=128).cutoff_len == 128
    with pytest.raises(ConfigError) as e:
        PromptConfig(instruction="", input_prefix=3, cutoff_len=2)
    assert len(e.value.problems) == 3
    with pytest.raises(ConfigError, match="unknown prompt preset"):
        get_prompt_config("gmaes")
    with pytest.raises(ConfigError, match="unknown field"):
        get_prompt_config({"preset": "games", "cutof_len": 3})


def test_truncation_drops_oldest_first_and_is_maximal(llm):
    _, tok = llm
    hist = TITLES[:40]
    full = encode_sample(tok, hist, "Game 50 Quest", get_prompt_config("games", cutoff_len=4096))
    assert full["n_history_kept"] == 40
    cutoff = len(full["input_ids"]) - 30
    cfg = get_prompt_config("games", cutoff_len=cutoff)
    enc = encode_sample(tok, hist, "Game 50 Quest", cfg)
    k = enc["n_history_kept"]
    assert 0 < k < 40 and len(enc["input_ids"]) <= cutoff
    text = tok.decode(enc["input_ids"])
    kept = hist[40 - k:]
    assert ": " + "; ".join(kept) + ";" in text  # the newest k titles, in order
    assert hist[39 - k] + ";" not in text.split("titles as: ")[1]  # the next older one is gone
    # One more (older) title would not fit: the truncation is maximal.
    more = encode_sample(tok, hist[39 - k:], "Game 50 Quest", get_prompt_config("games", cutoff_len=10_000))
    assert len(more["input_ids"]) > cutoff
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert enc["input_ids"][0] == tok.bos_token_id
    # Generation prompts truncate the same way and end with the response header.
    p = encode_prompt(tok, hist, cfg, reserve_tokens=10)
    assert len(p) <= cutoff - 10
    assert tok.decode(p).endswith("### Response:\n")


def test_labels_whole_sequence_or_response_only(llm):
    _, tok = llm
    cfg = get_prompt_config("games")
    enc = encode_sample(tok, TITLES[:3], "Game 7 Racer", cfg)
    assert enc["labels"] == enc["input_ids"]
    ro = encode_sample(tok, TITLES[:3], "Game 7 Racer", get_prompt_config("games", train_on_inputs=False))
    assert ro["input_ids"] == enc["input_ids"]
    n_masked = sum(1 for x in ro["labels"] if x == -100)
    assert all(x == -100 for x in ro["labels"][:n_masked])
    assert ro["labels"][n_masked:] == ro["input_ids"][n_masked:]
    assert tok.decode(ro["labels"][n_masked:], skip_special_tokens=True).strip() == "Game 7 Racer"


def test_cutoff_smaller_than_instruction_cuts_tokens(llm):
    _, tok = llm
    enc = encode_sample(tok, TITLES[:3], "Game 7 Racer", get_prompt_config("games", cutoff_len=20))
    assert len(enc["input_ids"]) == 20 and enc["n_history_kept"] == 0


def test_collate_pads_right_and_masks_labels():
    enc = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8], "labels": [-100]}]
    b = collate(enc, pad_token_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [-100, -100, -100]]
    assert all(v.dtype == torch.long for v in b.values())


def test_per_sample_loss_ignores_padding_and_batch(llm):
    model, tok = llm
    cfg = get_prompt_config("games")
    enc = [encode_sample(tok, TITLES[: 2 + 5 * i], TITLES[30 + i], cfg) for i in range(4)]
    together = per_sample_causal_lm_loss(model, collate(enc, tok.pad_token_id)).detach()
    for i, e in enumerate(enc):
        alone = per_sample_causal_lm_loss(model, collate([e], tok.pad_token_id)).detach()
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)
    # Mean over the sample's own valid tokens.
    b = collate(enc[:1], tok.pad_token_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, b["input_ids"][0, 1:])
    torch.testing.assert_close(together[0], ref.detach(), rtol=1e-5, atol=1e-6)
