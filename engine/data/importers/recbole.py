"""The ``recbole`` importer: RecBole atomic files.

``*.inter`` (tab-separated, typed header, fields ``user_id``, ``item_id``, ``timestamp`` and
optionally ``rating``) and ``*.item`` (``item_id`` and a title field:
``movie_title``/``title``/``item_title``/``name``; optional ``release_year`` is appended as
``"Title (1995)"`` to tell remakes apart, and a ``class``/``genre``/``categories``/``category``
field becomes the category, tokens joined with ``", "``). ``--input`` is the folder or the
``.inter`` file. Cut, filter, split and indexing: :mod:`engine.data.importers.interactions`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from engine.data.importers.interactions import InteractionRules, from_interactions
from engine.errors import DataError

__all__ = ["import_recbole"]


def _read_atomic(path: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Read a RecBole atomic file as strings; return (frame with bare field names, field -> type)."""
    if path.stat().st_size == 0:
        raise DataError("empty file: expected a header 'field:type<TAB>...'", path=path)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n\r").split("\t")
    types: dict[str, str] = {}
    for h in header:
        name, sep, typ = h.partition(":")
        if not sep or typ not in ("token", "token_seq", "float", "float_seq"):
            raise DataError("header fields must look like 'name:token|token_seq|float|float_seq'",
                            path=path, field="header", value=h)
        types[name] = typ
    try:
        df = pd.read_csv(path, sep="\t", header=0, names=list(types), dtype=str, keep_default_na=False,
                         quoting=csv.QUOTE_NONE, encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot parse as tab-separated atomic file ({e})", path=path) from None
    return df.fillna(""), types  # short rows: missing fields read as empty, then reported as such


def _numeric(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError("not a number", path=path, field=f"{col} (line {i + 2})", value=df[col].iloc[i])
    return vals

def import_recbole(src: Path, tmp: Path, *, rules: InteractionRules, header: dict) -> dict:
    """Import the RecBole folder or ``.inter`` file ``src`` into ``tmp``; return its meta.json."""
    if src.is_dir():
        inters = sorted(src.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(f"expected exactly one *.inter file in the folder, found {len(inters)}",
                            path=src, field="files", value=[p.name for p in inters])
        inter = inters[0]
    else:
        inter = src
    item_path = inter.with_suffix(".item")
    df, types = _read_atomic(inter)
    missing = [f for f in ("user_id", "item_id", "timestamp") if f not in types]
    if missing:
        raise DataError(f"missing field(s) {missing}; header has {list(types)}", path=inter, field=missing[0])
    if len(df) == 0:
        raise DataError("no interactions (header only)", path=inter)
    for col in ("user_id", "item_id"):
        blank = (df[col].str.strip() == "").to_numpy()
        if blank.any():
            i = int(np.flatnonzero(blank)[0])
            raise DataError("empty id", path=inter, field=f"{col} (line {i + 2})", value=df[col].iloc[i])
    times = _numeric(df, "timestamp", inter)
    ratings = _numeric(df, "rating", inter) if "rating" in types else None
    titles: dict[str, str] = {}
    categories: dict[str, str | None] | None = None
    if item_path.is_file():
        idf, itypes = _read_atomic(item_path)
        if "item_id" not in itypes:
            raise DataError(f"missing field 'item_id'; header has {list(itypes)}", path=item_path, field="item_id")
        dup = idf["item_id"].duplicated().to_numpy()
        if dup.any():
            i = int(np.flatnonzero(dup)[0])
            raise DataError("item appears twice", path=item_path, field=f"item_id (line {i + 2})",
                            value=idf["item_id"].iloc[i])
        tfield = next((f for f in ("movie_title", "title", "item_title", "name") if f in itypes), None)
        if tfield is None:
            raise DataError(f"no title field (movie_title/title/item_title/name); header has {list(itypes)}",
                            path=item_path, field="title")
        t = idf[tfield].str.strip()
        if "release_year" in itypes:
            year = idf["release_year"].str.strip()
            t = t.where(year == "", t + " (" + year + ")")
        titles = dict(zip(idf["item_id"], t))
        cfield = next((f for f in ("class", "genre", "categories", "category") if f in itypes), None)
        if cfield is not None:
            c = idf[cfield].str.split().str.join(", ")
            categories = {k: (v or None) for k, v in zip(idf["item_id"], c)}
    return from_interactions(
        tmp, users=df["user_id"].to_numpy(dtype=object), items=df["item_id"].to_numpy(dtype=object),
        ratings=ratings, times=times, titles=titles, categories=categories, source=inter, rules=rules, header=header,
        extra={"files": {"inter": str(inter.resolve()),
                         "item": str(item_path.resolve()) if item_path.is_file() else None}},
    )
