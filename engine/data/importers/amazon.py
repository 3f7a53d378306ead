"""The ``amazon`` importer: raw Amazon review JSON lines and metadata JSON lines.

Reviews: ``reviewerID``, ``asin``, ``overall``, ``unixReviewTime``; metadata: ``asin``,
``title``, optional ``categories`` (2014: list of category paths, the first is used) or
``category`` (2018: one path); optionally gzip-compressed; Python-literal lines of the 2014 dumps
are accepted (read with ``ast.literal_eval``, which runs no code). ``--input`` is the reviews file
with ``--meta`` the metadata file, or a folder holding one ``meta*`` file and one other
``*.json*`` file. Cut, filter, split and indexing: :mod:`engine.data.importers.interactions`.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import math
from pathlib import Path

import numpy as np

from engine.data.importers.interactions import InteractionRules, from_interactions
from engine.errors import DataError

__all__ = ["import_amazon"]


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path):
    """Yield (line number, dict) for each non-blank line: JSON, or a Python literal (2014 dumps)."""
    try:
        with _open_text(path) as f:
            any_line = False
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                any_line = True
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        rec = ast.literal_eval(line.strip())
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        raise DataError("line is neither JSON nor a Python literal", path=path,
                                        field=f"line {lineno}", value=line.strip()[:80]) from None
                if not isinstance(rec, dict):
                    raise DataError("each line must be a JSON object", path=path, field=f"line {lineno}",
                                    value=line.strip()[:80])
                yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read ({type(e).__name__}: {e})", path=path) from None
    if not any_line:
        raise DataError("empty file: expected one JSON object per line", path=path)

def _amazon_files(src: Path, meta: str | None) -> tuple[Path, Path]:
    """(reviews file, metadata file) of ``--input`` ``src`` and ``--meta`` ``meta``."""
    if src.is_file():
        if meta is None:
            raise DataError("amazon: pass the metadata file with --meta (or --input a folder holding "
                            "the reviews file and a meta* file)", path=src, field="meta")
        return src, Path(meta)
    files = sorted(p for p in src.iterdir() if p.is_file() and ".json" in p.name)
    metas = [p for p in files if p.name.startswith("meta")]
    reviews = [p for p in files if not p.name.startswith("meta")]
    meta_files = [Path(meta)] if meta else metas
    if len(reviews) != 1 or len(meta_files) != 1:
        raise DataError("amazon: the folder must hold exactly one reviews *.json[l][.gz] file and one "
                        f"meta*.json[l][.gz] file; found reviews={[p.name for p in reviews]}, "
                        f"meta={[p.name for p in meta_files]}", path=src, field="files")
    return reviews[0], meta_files[0]

def import_amazon(src: Path, meta: str | None, tmp: Path, *, rules: InteractionRules, header: dict) -> dict:
    """Import the Amazon reviews (file or folder ``src``, metadata ``meta``) into ``tmp``; return its meta.json."""
    rpath, mpath = _amazon_files(src, meta)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[float] = []
    for lineno, rec in _json_lines(rpath):
        for key in ("reviewerID", "asin", "overall", "unixReviewTime"):
            if key not in rec:
                raise DataError("missing key", path=rpath, field=f"{key} (line {lineno})",
                                value=sorted(rec)[:8])
        u, a = rec["reviewerID"], rec["asin"]
        if not isinstance(u, str) or not u or not isinstance(a, str) or not a:
            raise DataError("reviewerID and asin must be non-empty strings", path=rpath,
                            field=f"reviewerID/asin (line {lineno})", value=(u, a))
        try:
            r, t = float(rec["overall"]), float(rec["unixReviewTime"])
            if not (math.isfinite(r) and math.isfinite(t)):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError("overall and unixReviewTime must be numbers", path=rpath,
                            field=f"overall/unixReviewTime (line {lineno})",
                            value=(rec["overall"], rec["unixReviewTime"])) from None
        users.append(u)
        items.append(a)
        ratings.append(r)
        times.append(t)
    titles: dict[str, str] = {}
    categories: dict[str, str | None] = {}
    for lineno, rec in _json_lines(mpath):
        a = rec.get("asin")
        if not isinstance(a, str) or not a:
            raise DataError("missing or empty asin", path=mpath, field=f"asin (line {lineno})", value=a)
        t = rec.get("title")
        if isinstance(t, str) and t.strip():
            titles[a] = t.strip()
        cats = rec.get("categories", rec.get("category"))
        if isinstance(cats, list) and cats and isinstance(cats[0], list):
            cats = cats[0]  # 2014 dumps: a list of category paths; the first is the main one
        if isinstance(cats, list) and all(isinstance(c, str) for c in cats):
            categories[a] = " > ".join(c.strip() for c in cats if c.strip()) or None
    return from_interactions(
        tmp, users=np.array(users, dtype=object), items=np.array(items, dtype=object),
        ratings=np.array(ratings), times=np.array(times), titles=titles, categories=categories, source=rpath,
        rules=rules, header=header,
        extra={"files": {"reviews": str(rpath.resolve()), "meta": str(mpath.resolve())}},
    )
