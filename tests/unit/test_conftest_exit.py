"""The suite's process ends with pytest's own status once Ray is imported (tests/conftest.py):
a thread left running (as Ray's clients can be, after the session's instance is gone) does not
hold the process, and a failing test still fails the run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
LINGER = """
import threading, time
import ray  # noqa: F401  (the guard applies to a process that imported Ray)

def test_leaves_a_thread_running():
    threading.Thread(target=time.sleep, args=(3600,), name="left-running").start()
    assert {outcome}
"""


@pytest.mark.parametrize("outcome, status", [("True", 0), ("False", 1)])
def test_a_thread_left_running_neither_holds_the_process_nor_hides_a_failure(tmp_path, outcome, status):
    (tmp_path / "tests").mkdir()
    shutil.copy(CONFTEST, tmp_path / "tests" / "conftest.py")
    (tmp_path / "tests" / "test_linger.py").write_text(LINGER.format(outcome=outcome))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == status, r.stdout + r.stderr
    assert "threads alive at exit" in r.stderr and "left-running" in r.stderr
