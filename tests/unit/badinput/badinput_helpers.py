"""Helpers of the bad-input tests (see conftest.py): run a command as a user does, assert how
it was refused, take a snapshot of what it must not have touched."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_cli(*args: str, cwd: Path, fresh: bool = False) -> subprocess.CompletedProcess:
    """``dealrec ARGS`` run in ``cwd``, captured.

    ``fresh``: in a new interpreter (the venv's python), exactly as a user runs it, ~3 s each;
    each test module runs its defects from the issue so. Otherwise through ``jobs.cli.main``
    in this process (an escaping exception is printed as the traceback Python would print,
    exit 1), so that the neighbouring cases stay within the default suite's time.
    """
    if not fresh:
        return _run_in_process([str(a) for a in args], cwd)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _run_in_process(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from jobs.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse
                rc = e.code if isinstance(e.code, int) else 1
            except Exception:  # noqa: BLE001 - what a user would see as a traceback
                traceback.print_exc()
                rc = 1
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def assert_rejected(res: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2, no traceback, and every string of ``named`` (file, field, option) in the message."""
    assert res.returncode == 2, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr, res.stderr
    for n in named:
        assert n in res.stderr, f"{n!r} not named in:\n{res.stderr}"


def snapshot(path: Path) -> dict[str, str] | None:
    """Every entry below ``path`` (hidden ones too) with a hash of its bytes; None: absent."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": hashlib.sha1(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}
