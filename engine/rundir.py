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

Also the file-system helpers every job writes through, so that an OS error on an output
path is one :class:`engine.errors.OutputError` naming the path, found before any work
(:func:`check_writable`), and no temporary file outlives a failure
(:func:`atomic_write_with`); and :func:`read_json`, which names the file of a corrupt JSON.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.errors import DataError, OutputError, ResumeError, os_reason

MANIFEST = "manifest.json"


class RunDir:
    """The output folder of one job run.

    Args:
        root: the folder (created if missing).
        stage_outputs: for each stage, the files/folders (relative to ``root``) it writes;
            they are deleted when the stage must be redone.
    """

    def __init__(self, root: str | os.PathLike, stage_outputs: dict[str, list[str]], *, create: bool = True):
        self.root = Path(root)
        self.stage_outputs = stage_outputs
        p = self.root / MANIFEST
        self.manifest: dict[str, Any] = read_json(
            p, hint="; delete it (or the folder) to start this run afresh, or use another --out") if p.exists() else {}
        if not isinstance(self.manifest.get("stages", {}), dict):
            raise DataError("'stages' must be a JSON object; delete the file to start this run afresh",
                            path=p, field="stages", value=self.manifest["stages"])
        self.manifest.setdefault("stages", {})
        check_writable(self.root, option="--out")
        if create:  # create=False: nothing is written before the first save (a job whose inputs may still fail)
            with output_errors(self.root, option="--out"):
                self.root.mkdir(parents=True, exist_ok=True)

    # ---- resume planning -------------------------------------------------------------
    def plan(self, hashes: dict[str, str], *, overwrite: bool, recompute: Iterable[str] = ()) -> list[str]:
        """The stages whose recorded config differs from ``hashes`` (to be redone); changes nothing.

        Args:
            recompute: stages redone, not refused, when their config changed (a cheap stage whose
                result is replaced whole, e.g. an evaluation with other options).

        Raises:
            ResumeError: some other stage ran with a different config and ``overwrite`` is false.
        """
        changed = [s for s, h in hashes.items()
                   if s in self.manifest["stages"] and self.manifest["stages"][s].get("config_hash") not in (None, h)]
        refused = [s for s in changed if s not in set(recompute)]
        if refused and not overwrite:
            raise ResumeError(
                f"{self.root} holds results of a different config for stage(s) {refused} "
                f"(see {MANIFEST}); rerun with --overwrite to recompute them, or use another --out"
            )
        return changed

    def check(self, hashes: dict[str, str], *, overwrite: bool, recompute: Iterable[str] = ()) -> list[str]:
        """Compare current stage hashes with the manifest (:meth:`plan`), delete the outputs of
        the stages to redo and record the hashes; return the stages already done.

        Raises:
            ResumeError: some stage ran with a different config and ``overwrite`` is false.
        """
        for s in self.plan(hashes, overwrite=overwrite, recompute=recompute):
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
        with output_errors(self.root, option="--out"):
            self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / MANIFEST,
                           json.dumps(self.manifest, indent=2, sort_keys=True, default=str).encode(), option="--out")

    def path(self, rel: str) -> Path:
        return self.root / rel


def tree_digest(path: str | os.PathLike | None) -> str | None:
    """sha256 over the relative paths and bytes of every file under ``path`` (a model or adapter
    folder), so that a stage reading it is redone when it is rewritten in place; None for None."""
    if path is None:
        return None
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]:
        h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, MiB (None where ``resource`` is absent)."""
    try:
        import resource
        import sys

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


# ---- file-system helpers -------------------------------------------------------------
#: OS errors that are about the place written, whichever file (input or output) raised them.
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


def make_dirs(path: str | os.PathLike) -> Path | None:
    """``mkdir -p path``; returns the topmost folder it created (None: it existed), so that a
    failed job can remove what it made and leave the file system as it found it."""
    p = Path(path)
    top = None
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    Path(path).mkdir(parents=True, exist_ok=True)
    return top


@contextmanager
def output_errors(path: object, *, option: str | None = None) -> Iterator[None]:
    """``with output_errors(path, option="--out"):`` turns an ``OSError`` raised inside the
    block into an :class:`OutputError` naming ``path`` (wrap writes only: a read error is
    not an output problem)."""
    try:
        yield
    except OSError as e:
        raise OutputError.from_os(e, path, option=option) from None


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object], *, option: str | None = None) -> None:
    """Write ``path`` atomically: ``write(tmp)`` writes a temporary sibling, which then
    replaces ``path``. The temporary file is removed on every failure.

    Raises:
        OutputError: an OS error while writing (read-only, no space, not a folder, ...).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with output_errors(path, option=option):
            write(tmp)
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, option: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_with`)."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data), option=option)


def _unwritable(path: str | os.PathLike, *, option: str | None, kind: str, replace: bool) -> OutputError | None:
    p = Path(path)
    if p.exists():
        if kind == "dir" and not p.is_dir():
            return OutputError(p, "it exists and is a regular file, not a folder", option=option)
        if kind == "file" and p.is_dir():
            return OutputError(p, "it exists and is a folder, not a file", option=option)
        where = [p if kind == "dir" else p.parent]
        if replace:
            if os.path.ismount(p):
                return OutputError(p, "it is a mount point, which cannot be replaced; write into a folder "
                                      "inside it", option=option)
            where.append(p.parent)
    else:
        a = p.parent
        while not a.exists() and a != a.parent:
            a = a.parent
        if not a.is_dir():
            return OutputError(p, f"{str(a)!r} is a regular file, not a folder", option=option)
        where = [a]
    for d in where:
        try:  # a real write, not os.access: root passes access() on a read-only mount
            fd, name = tempfile.mkstemp(prefix=".dealrec-probe-", dir=d)
            try:
                os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
                os.unlink(name)
        except OSError as e:  # name the folder that refused the probe, not the probe file
            return OutputError(p, os_reason(e) + ("" if Path(d) == p else f" ({d})"), option=option)
    return None


def writable_problem(path: str | os.PathLike, *, option: str | None = None, kind: str = "dir",
                     replace: bool = False) -> str | None:
    """Why ``path`` cannot be written, or None; creates nothing (a probe file is written in
    the nearest existing folder and removed). For config validation that reports every
    problem at once; :func:`check_writable` raises instead.

    Args:
        path: the output folder (``kind="dir"``) or file (``kind="file"``), existing or not.
        option: the command-line option it came from, for the message.
        replace: the existing ``path`` is replaced as a whole (renamed away): its parent
            must be writable too and it must not be a mount point.
    """
    err = _unwritable(path, option=option, kind=kind, replace=replace)
    return None if err is None else str(err)


def check_writable(path: str | os.PathLike, *, option: str | None = None, kind: str = "dir",
                   replace: bool = False) -> None:
    """Raise :class:`OutputError` when ``path`` cannot be written (see :func:`writable_problem`).
    Call it before any work, so that a bad output path costs nothing."""
    err = _unwritable(path, option=option, kind=kind, replace=replace)
    if err is not None:
        raise err


def read_json(path: str | os.PathLike, *, expect: type | None = dict, hint: str = "") -> Any:
    """A JSON file, parsed.

    Args:
        expect: the type of the top-level value (None: any).
        hint: appended to the message (how to fix it).

    Raises:
        DataError: missing, unreadable, not JSON, or not of type ``expect``; names the file.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise DataError("file not found" + hint, path=p) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the file ({e}){hint}", path=p) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg}: line {e.lineno} column {e.colno}){hint}", path=p) from None
    if expect is not None and not isinstance(obj, expect):
        raise DataError(f"expected a JSON {'object' if expect is dict else expect.__name__}, "
                        f"found {type(obj).__name__}{hint}", path=p)
    return obj
