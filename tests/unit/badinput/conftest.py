"""Shared pieces of the bad-input tests (issue #17): every command is run as a user runs it,
in a subprocess, and every rejection must be exit status 2, one message naming the file or
field, no traceback, and the output left absent or unchanged.

Cases that would need Ray or a long run are rejected before Ray starts (that is what they
check), so each costs one interpreter start (~1 s for prepare, ~3 s for the others).
The helpers live in badinput_helpers.py (a conftest is not importable by name).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    """A tiny prepared folder (300 users, several sample files); copy it before damaging it."""
    from engine.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("badinput") / "data"
    prepare(PrepareConfig(format="synthetic", users=300, out=str(out)))
    return out


@pytest.fixture
def data_copy(synth_data, tmp_path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(synth_data, d)
    return d


def _mount_read_only(d: Path) -> bool:
    try:
        subprocess.run(["mount", "--bind", str(d), str(d)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(d)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        subprocess.run(["umount", str(d)], capture_output=True)
        return False
    return True


@pytest.fixture
def read_only(tmp_path):
    """``make(name, fill=None)``: a read-only folder ``tmp_path/name`` (``fill(folder)`` writes
    into it first). As root (where os.access and permissions lie) a read-only bind mount; as
    another user a chmod 555 folder; skipped where root may not mount."""
    mounted: list[Path] = []
    chmodded: list[Path] = []

    def make(name: str, fill=None) -> Path:
        d = tmp_path / name
        d.mkdir()
        if fill is not None:
            fill(d)
        if os.geteuid() == 0:
            if not _mount_read_only(d):
                pytest.skip("running as root without permission to mount: no read-only location to test")
            mounted.append(d)
        else:
            for p in [d, *d.rglob("*")]:
                if p.is_dir():
                    p.chmod(0o555)
                    chmodded.append(p)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)
    for p in chmodded:
        p.chmod(0o755)
