"""The ``dealrec-release`` importer: the layout the DEALRec authors ship (``../shared/data/games``).

``sequential_{train,valid,test}.txt`` (``user_seqid item_seqid ...``, ids 1-based, one line per
user, time order), ``title_maps.npy`` (``seqid2title``: '1'-based str -> title) and optionally
``category_map.npy`` (``seqid2category``: lists of str, joined with ``" > "``). The ``.npy`` maps
are read with the restricted unpickler of :mod:`engine.data.safe_pickle`. Item ids become
``seqid - 1``; the catalogue is ``0..N-1`` with ``N`` = the largest id of the title map;
``user_id`` is the user's seqid as written in the file. The splits are taken as given.

An item id *outside* the catalogue (e.g. an id in ``sequential_valid.txt`` beyond the title map)
is an error: it means the files do not belong together. The Games release itself names 19
title-less items ``"title_{recid}"``; those are kept as given (the authors' prompts used them)
and counted in ``release_placeholder_titles``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from engine.data.importers.common import auto_rows_per_file, fill_titles, finish
from engine.data.safe_pickle import load_npy_object
from engine.data.segments import write_user_segments
from engine.data.writer import PreparedWriter
from engine.errors import DataError

__all__ = ["import_release"]


def _read_sequential(path: Path, n_items: int | None) -> dict[str, list[int]]:
    """Parse ``user_seqid item_seqid ...`` lines into {user token: [0-based item ids]}."""
    if path.stat().st_size == 0:
        raise DataError("empty file: expected lines 'user_seqid item_seqid ...'", path=path)
    seqs: dict[str, list[int]] = {}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text ({e})", path=path) from None
    for lineno, line in enumerate(lines, 1):
        tok = line.split()
        if not tok:
            continue
        user = tok[0]
        try:
            if int(user) < 1:
                raise ValueError
        except ValueError:
            raise DataError("user_seqid must be a positive integer", path=path, field=f"line {lineno}",
                            value=user) from None
        try:
            ids = [int(t) for t in tok[1:]]
        except ValueError:
            bad = next(t for t in tok[1:] if not t.lstrip("+-").isdigit())
            raise DataError("item_seqid must be an integer", path=path, field=f"line {lineno}", value=bad) from None
        if ids:
            lo, hi = min(ids), max(ids)
            if lo < 1:
                raise DataError("item_seqid must be >= 1 (ids are 1-based)", path=path, field=f"line {lineno}",
                                value=lo)
            if n_items is not None and hi > n_items:
                raise DataError(f"unknown item id: beyond the title map (ids 1..{n_items}); the files do not "
                                "belong to the same data set", path=path, field=f"line {lineno}", value=hi)
        if user in seqs:
            raise DataError("user appears twice", path=path, field=f"line {lineno}", value=user)
        seqs[user] = [i - 1 for i in ids]
    if not seqs:
        raise DataError("no data lines: expected 'user_seqid item_seqid ...'", path=path)
    return seqs


def _seqid_map(obj: object, path: Path, key: str) -> dict[int, object]:
    if not isinstance(obj, dict) or key not in obj:
        found = sorted(map(str, obj.keys()))[:10] if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"expected a dict with key {key!r}; found {found}", path=path, field=key)
    m = obj[key]
    if not isinstance(m, dict):
        raise DataError(f"{key} must be a dict", path=path, field=key, value=type(m).__name__)
    out: dict[int, object] = {}
    for k, v in m.items():
        try:
            i = int(k)
            if i < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise DataError("keys must be 1-based item seqids", path=path, field=f"{key} key", value=k) from None
        out[i - 1] = v
    return out


_RELEASE_PLACEHOLDER = re.compile(r"^title_\d+$")


def import_release(root: Path, tmp: Path, *, rows_per_file: int, header: dict) -> dict:
    """Import the release folder ``root`` into ``tmp``; return its meta.json (``header`` + counts).

    ``rows_per_file``: samples per part file, 0 = :func:`~engine.data.importers.common.auto_rows_per_file`.
    """
    if not root.is_dir():
        raise DataError("dealrec-release input must be a folder", path=root)
    need = {
        "sequential_train.txt": "training split",
        "sequential_valid.txt": "validation split",
        "sequential_test.txt": "test split",
        "title_maps.npy": "item titles",
    }
    missing = [f"{name} ({what})" for name, what in need.items() if not (root / name).is_file()]
    if missing:
        raise DataError(
            "incomplete DEALRec release folder; missing: " + ", ".join(missing)
            + ". A folder with only valid/test and item_map.npy (e.g. book-partial) cannot be imported",
            path=root, field="files", value=sorted(p.name for p in root.iterdir()),
        )
    title_path = root / "title_maps.npy"
    titles_raw = _seqid_map(load_npy_object(title_path), title_path, "seqid2title")
    n_items = max(titles_raw) + 1 if titles_raw else 0
    if n_items == 0:
        raise DataError("title map is empty", path=title_path, field="seqid2title")
    for i, t in titles_raw.items():
        if t is not None and not isinstance(t, str):
            raise DataError("titles must be strings", path=title_path, field=f"seqid2title[{i + 1!r}]", value=t)
    categories: list[str | None] | None = None
    cat_path = root / "category_map.npy"
    if cat_path.is_file():
        cats_raw = _seqid_map(load_npy_object(cat_path), cat_path, "seqid2category")
        categories = [None] * n_items
        for i, c in cats_raw.items():
            if i >= n_items:
                continue  # categories of items outside the catalogue are irrelevant
            if isinstance(c, (list, tuple)) and all(isinstance(x, str) for x in c):
                categories[i] = " > ".join(x.strip() for x in c if x.strip()) or None
            elif isinstance(c, str):
                categories[i] = c.strip() or None
            elif c is not None:
                raise DataError("category must be a list of str or a str", path=cat_path,
                                field=f"seqid2category[{i + 1!r}]", value=c)

    splits = {s: _read_sequential(root / f"sequential_{s}.txt", n_items) for s in ("train", "valid", "test")}
    # Users in training-file order, then users seen only in valid/test (no sample; cold rows).
    users = list(splits["train"])
    known = set(users)
    for s in ("valid", "test"):
        for u in splits[s]:
            if u not in known:
                known.add(u)
                users.append(u)
    n_tr = np.array([len(splits["train"].get(u, ())) for u in users], dtype=np.int64)
    n_va = np.array([len(splits["valid"].get(u, ())) for u in users], dtype=np.int64)
    n_te = np.array([len(splits["test"].get(u, ())) for u in users], dtype=np.int64)
    flat = np.fromiter(
        (i for u in users for s in ("train", "valid", "test") for i in splits[s].get(u, ())),
        dtype=np.int32, count=int(n_tr.sum() + n_va.sum() + n_te.sum()),
    )
    starts = np.concatenate([[0], np.cumsum(n_tr + n_va + n_te)[:-1]])
    writer = PreparedWriter(tmp, rows_per_file=rows_per_file or auto_rows_per_file(int((n_tr > 0).sum())))
    counts = write_user_segments(writer, np.array(users, dtype=object), flat, starts, n_tr, n_va, n_te)
    counts["users_total"] = len(users)
    titles, filled = fill_titles(n_items, titles_raw)  # type: ignore[arg-type]
    counts["placeholder_titles"] = filled
    # The authors' preparation names title-less items "title_{recid}" (19 of Games' 17,332). Kept as
    # given, so prompts match theirs, but counted so the gap is visible.
    counts["release_placeholder_titles"] = sum(1 for t in titles if _RELEASE_PLACEHOLDER.match(t))
    return finish(tmp, writer, counts, titles, categories, header)
