"""A run folder with a manifest: per-stage config hashes, wall times, counts; resume rules.

Rules (kronfluence-style):
- each stage has a config hash that includes the hashes of the stages it reads from, so a
  change upstream changes every stage downstream;
- a stage whose hash matches the manifest and is marked done is skipped;
- a stage that was started with the same hash but not finished resumes (its finished
  shards are kept);
- a stage whose recorded hash differs from the current one is refused (ResumeError naming
  every changed stage) unless ``overwrite``; with ``overwrite`` its outputs are deleted
  and it runs again.
The manifest is rewritten atomically after every change.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from engine.errors import ResumeError

MANIFEST = "manifest.json"


class RunDir:
    """The output folder of one job run.

    Args:
        root: the folder (created if missing).
        stage_outputs: for each stage, the files/folders (relative to ``root``) it writes;
            they are deleted when the stage must be redone.
    """

    def __init__(self, root: str | os.PathLike, stage_outputs: dict[str, list[str]]):
        self.root = Path(root)
        self.stage_outputs = stage_outputs
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.root / MANIFEST
        self.manifest: dict[str, Any] = json.loads(p.read_text()) if p.exists() else {}
        self.manifest.setdefault("stages", {})

    # ---- resume planning -------------------------------------------------------------
    def check(self, hashes: dict[str, str], *, overwrite: bool) -> list[str]:
        """Compare current stage hashes with the manifest; return the stages already done.

        Raises:
            ResumeError: some stage ran with a different config and ``overwrite`` is false.
        """
        changed = [s for s, h in hashes.items()
                   if s in self.manifest["stages"] and self.manifest["stages"][s].get("config_hash") != h]
        if changed and not overwrite:
            raise ResumeError(
                f"{self.root} holds results of a different config for stage(s) {changed} "
                f"(see {MANIFEST}); rerun with --overwrite to recompute them, or use another --out"
            )
        for s in changed:
            self.reset(s)
        for s, h in hashes.items():
            self.manifest["stages"].setdefault(s, {})["config_hash"] = h
        self.save()
        return [s for s in hashes if self.done(s)]

    def reset(self, stage: str) -> None:
        for rel in self.stage_outputs.get(stage, []):
            p = self.root / rel
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        self.manifest["stages"][stage] = {}

    def done(self, stage: str) -> bool:
        return bool(self.manifest["stages"].get(stage, {}).get("done"))

    # ---- bookkeeping -----------------------------------------------------------------
    def finish(self, stage: str, wall_s: float, **info: Any) -> None:
        st = self.manifest["stages"].setdefault(stage, {})
        st.update(info)
        st["done"] = True
        st["wall_s"] = round(float(wall_s), 3)
        st["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        peak = _peak_rss_mib()
        if peak is not None:  # this process's peak so far: the stage that raised it is the culprit
            st["driver_peak_rss_mib"] = peak
        self.save()

    def set(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self.save()

    def save(self) -> None:
        p = self.root / MANIFEST
        tmp = p.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, p)

    def path(self, rel: str) -> Path:
        return self.root / rel


def _peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, MiB (None where ``resource`` is absent)."""
    try:
        import resource
        import sys

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
