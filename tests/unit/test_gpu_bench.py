"""benchmarks/gpu/run.sh --dry-run: the prepared GPU check runs end to end on CPU with tiny shapes,
so it cannot rot before a device is lent (~30 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
LENGTHS = ROOT / "benchmarks" / "gpu" / "games_lengths.json"


def test_lengths_file_is_small_and_holds_lengths_only():
    d = json.loads(LENGTHS.read_text())
    assert LENGTHS.stat().st_size < 16_000
    assert set(d) == {"what", "made_by", "prompt_tokens", "history_items"}
    for key in ("prompt_tokens", "history_items"):
        assert len(d[key]) == 512 and all(isinstance(x, int) and x >= 0 for x in d[key])
    assert min(d["prompt_tokens"]) > 0  # a user with one training item has an empty history, never an empty prompt
    assert 100 < sum(d["prompt_tokens"]) / 512 < 250  # Games effort prompts: ~150 tokens


@pytest.mark.timeout(300)
def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python")))
    if not Path(env["PYTHON"]).exists():
        env.pop("PYTHON")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["dry_run"] is True and res["meta"]["device"] == "cpu"
    assert res["meta"]["imported_but_absent_on_device"] == []  # no ray / deepspeed: engine/ only
    parts = res["parts"]
    assert set(parts) == {"effort_7b", "effort_8layer", "influence_games", "effort_smollm2"}
    assert all(p["error"] is None for p in parts.values()), {k: p["error"] for k, p in parts.items()}
    for name in ("effort_7b", "effort_8layer"):
        p = parts[name]
        assert p["effort_finite"] and p["agreement_max_rel_err"] < 1e-4
        for k in ("effort", "loop", "fwd_bwd"):
            assert p[f"{k}_s_per_batch"] > 0 and p[f"{k}_tokens_per_s"] > 0 and p[f"{k}_peak_mib"] >= 0
        assert p["effort_speedup_vs_loop"] == pytest.approx(p["loop_s_per_batch"] / p["effort_s_per_batch"])
    proj = parts["effort_8layer"]["book_projection"]
    assert proj["batches"] == -(-88_000 // 4)
    assert proj["projected_s"] == pytest.approx(proj["batches"] * parts["effort_7b"]["effort_s_per_batch_T150"])
    assert parts["influence_games"]["jvp_vs_loop_max_rel_err"] < 1e-4
    assert parts["influence_games"]["games_pass_projected_s"] > 0
    sm = parts["effort_smollm2"]
    assert sm["shape"]["vocab"] == 49152 and sm["agreement_max_rel_err"] < 1e-4 and sm["effort_tokens_per_s"] > 0
    assert set(res["goals"]) == {"effort_speedup_vs_loop_7b>=10", "effort_cost_vs_fwd_bwd_7b<=1.3",
                                 "book_effort_pass<=20min"}


def test_a_failing_part_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    """One part's exception lands in the JSON; the others still run (in process, two parts)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu import bench

    def boom(*a, **k):
        raise RuntimeError("simulated CUDA out of memory")

    monkeypatch.setitem(bench.RUNNERS, "effort_7b", boom)
    out = tmp_path / "gpu.json"
    rc = bench.main(["--dry-run", "--out", str(out), "--parts", "effort_7b", "effort_8layer"])
    res = json.loads(out.read_text())
    assert rc == 1
    assert "simulated CUDA out of memory" in res["parts"]["effort_7b"]["error"]
    p8 = res["parts"]["effort_8layer"]
    assert p8["error"] is None and p8["effort_s_per_batch"] > 0
    assert "from_32_layers_direct_s" not in p8["book_projection"]  # no 7B timing: the 8-layer x4 estimate
    assert p8["book_projection"]["projected_s"] == p8["book_projection"]["from_8_layers_x4_s"]


def test_a_part_past_its_budget_is_cut_and_recorded(tmp_path, monkeypatch):
    import sys
    import time

    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu import bench

    def slow(p, device, dtype, attn, res, ctx):
        res["measured_before_the_cut"] = 1.0
        time.sleep(30)

    monkeypatch.setitem(bench.RUNNERS, "effort_smollm2", slow)
    out = tmp_path / "gpu.json"
    t = time.perf_counter()
    assert bench.main(["--dry-run", "--out", str(out), "--parts", "effort_smollm2", "--budget-scale", "0.02"]) == 1
    assert time.perf_counter() - t < 10
    p = json.loads(out.read_text())["parts"]["effort_smollm2"]
    assert p["error"].startswith("timeout") and p["measured_before_the_cut"] == 1.0
