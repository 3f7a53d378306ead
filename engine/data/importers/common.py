"""What every importer shares: placeholder titles, the part-file size, and writing the items and
meta.json that close a prepared folder (see :mod:`engine.data.prepare` for the policies)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.data.layout import DEFAULT_ROWS_PER_FILE
from engine.data.writer import PreparedWriter

__all__ = ["auto_rows_per_file", "fill_titles", "finish", "placeholder_title"]


def placeholder_title(item_id: int) -> str:
    """The title given to a catalogue item that has none (see :mod:`engine.data.prepare`)."""
    return f"<item {item_id}>"


def auto_rows_per_file(n: int) -> int:
    """Samples per Parquet part file for ``n`` samples (``--rows-per-file 0``): about n/8, 256..8192."""
    # Several part files even for small sets, so Ray Data reads several blocks.
    return int(min(DEFAULT_ROWS_PER_FILE, max(256, math.ceil(n / 8))))


def fill_titles(n_items: int, titles: dict[int, str]) -> tuple[list[str], int]:
    """Titles of items 0..n_items-1, stripped, blanks and gaps filled with :func:`placeholder_title`;
    and how many were filled."""
    out, filled = [], 0
    for i in range(n_items):
        t = titles.get(i)
        t = t.strip() if isinstance(t, str) else ""
        if not t:
            t, filled = placeholder_title(i), filled + 1
        out.append(t)
    return out, filled


def finish(tmp: Path, writer: PreparedWriter, counts: dict, titles: list[str],
           categories: list[str | None] | None, header: dict, extra: dict | None = None) -> dict:
    """Write the items table and meta.json (``header`` + ``counts`` + ``extra``); return that meta.

    Raises:
        DataError: no user has a training item (no sample).
    """
    writer.write_items(np.arange(len(titles), dtype=np.int32), titles, categories)
    meta = dict(header)
    counts["items"] = len(titles)
    meta["counts"] = counts
    if extra:
        meta.update(extra)
    writer.close(meta)  # raises DataError when no user has a training item
    return json.loads((tmp / "meta.json").read_text())

