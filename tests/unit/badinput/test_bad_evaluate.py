"""`dealrec evaluate` on a malformed adapter and bad output paths (issue #17): refused before
any model is loaded or any user evaluated (--local: no Ray), exit 2, the file named, no
traceback (not peft's JSONDecodeError), and nothing written."""

from __future__ import annotations

import json

import pytest

from badinput_helpers import assert_rejected, run_cli

GOOD_CONFIG = json.dumps({"peft_type": "LORA", "base_model_name_or_path": "tiny", "r": 8})

# (id, {file name: bytes} of the adapter folder, strings the message must name)
ADAPTER_CASES = [
    ("malformed-config", {"adapter_config.json": b'{"base_model'}, ["adapter_config.json", "not valid JSON"]),
    ("config-not-an-object", {"adapter_config.json": b"[1]"}, ["adapter_config.json", "object"]),
    ("config-without-peft-type", {"adapter_config.json": b"{}"}, ["adapter_config.json", "peft_type"]),
    ("no-config", {"adapter_model.safetensors": b"x"}, ["adapter_config.json", "not found"]),
    ("no-weights", {"adapter_config.json": GOOD_CONFIG.encode()}, ["adapter_model.safetensors"]),
    ("corrupt-weights", {"adapter_config.json": GOOD_CONFIG.encode(), "adapter_model.safetensors": b"\xff" * 64},
     ["adapter_model.safetensors", "unreadable"]),
]

#: the issue's own reproductions run in a fresh interpreter, as a user runs them
FRESH = {'malformed-config'}


@pytest.mark.parametrize("files, named", [c[1:] for c in ADAPTER_CASES], ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter(request, tmp_path, synth_data, files, named):
    ad = tmp_path / "bad_adapter"
    ad.mkdir()
    for name, b in files.items():
        (ad / name).write_bytes(b)
    res = run_cli("evaluate", "--data", synth_data, "--adapter", "bad_adapter", "--local", "--max-users", "4",
                  cwd=tmp_path,
                  fresh=request.node.callspec.id in FRESH)
    assert_rejected(res, *named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_adapter"]  # no metrics next to it


def test_out_on_a_read_only_location(tmp_path, synth_data, read_only):
    """Checked before evaluating (it used to fail only once every user was evaluated)."""
    read_only("ro")
    res = run_cli("evaluate", "--data", synth_data, "--local", "--out", "ro/metrics.json", cwd=tmp_path, fresh=True)
    assert_rejected(res, "--out", "ro/metrics.json", "read-only")


@pytest.mark.parametrize("out, named", [("f/metrics.json", "regular file"), (".", "folder")],
                         ids=["inside-a-file", "a-folder"])
def test_out_not_a_writable_file(tmp_path, synth_data, out, named):
    (tmp_path / "f").write_text("hi")
    res = run_cli("evaluate", "--data", synth_data, "--local", "--out", out, cwd=tmp_path)
    assert_rejected(res, "--out", named)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
