"""Run-folder resume rules: done stages skipped, changed configs refused unless overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import collect_problems, stable_hash
from engine.errors import ConfigError, ResumeError
from engine.rundir import RunDir

OUTS = {"a": ["a.txt"], "b": ["bdir"]}


def test_done_stage_is_reported_and_kept(tmp_path):
    r = RunDir(tmp_path, OUTS)
    assert r.check({"a": "h1", "b": "h2"}, overwrite=False) == []
    (tmp_path / "a.txt").write_text("x")
    r.finish("a", 1.5, rows=3)
    r2 = RunDir(tmp_path, OUTS)
    assert r2.check({"a": "h1", "b": "h2"}, overwrite=False) == ["a"]
    st = json.loads((tmp_path / "manifest.json").read_text())["stages"]["a"]
    assert st["rows"] == 3
    # the recorded peak is this process's, in MiB: at least its resident set now (Linux /proc)
    status = Path("/proc/self/status")
    if status.exists():
        rss_kib = int(next(x for x in status.read_text().splitlines() if x.startswith("VmRSS:")).split()[1])
        assert st["driver_peak_rss_mib"] >= rss_kib / 1024 * 0.9
    assert st["driver_peak_rss_mib"] > 0


def test_changed_config_refused_then_overwritten(tmp_path):
    r = RunDir(tmp_path, OUTS)
    r.check({"a": "h1", "b": "h2"}, overwrite=False)
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "bdir").mkdir()
    r.finish("a", 1.0)
    r.finish("b", 1.0)
    with pytest.raises(ResumeError, match=r"\['b'\].*--overwrite"):
        RunDir(tmp_path, OUTS).check({"a": "h1", "b": "CHANGED"}, overwrite=False)
    assert (tmp_path / "bdir").exists()  # nothing deleted by a refusal
    r3 = RunDir(tmp_path, OUTS)
    assert r3.check({"a": "h1", "b": "CHANGED"}, overwrite=True) == ["a"]
    assert not (tmp_path / "bdir").exists() and (tmp_path / "a.txt").exists()


def test_stable_hash_ignores_key_order():
    assert stable_hash({"x": 1, "y": [1, 2]}) == stable_hash({"y": [1, 2], "x": 1})
    assert stable_hash({"x": 1}) != stable_hash({"x": 2})


def test_collect_problems_reports_every_config():
    def bad(msg):
        raise ConfigError([msg])

    built, problems = collect_problems([("one", lambda: bad("p1")), ("two", lambda: 5), ("three", lambda: bad("p3"))])
    assert built == {"two": 5}
    assert problems == ["one: p1", "three: p3"]
