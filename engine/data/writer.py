"""Writing a prepared data set (:mod:`engine.data.layout`): :func:`atomic_dir` (the folder appears
whole or not at all) and :class:`PreparedWriter` (the files, written incrementally by the
importers and generators). Re-exported by :mod:`engine.data.schema`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.data.layout import (
    DEFAULT_ROWS_PER_FILE,
    ITEMS_FILE,
    ITEMS_SCHEMA,
    META_FILE,
    SAMPLES_DIR,
    SAMPLES_SCHEMA,
    SPLIT_SCHEMA,
    SPLITS,
)
from engine.errors import DataError, OutputError
from engine.rundir import OUTPUT_ERRNOS, check_writable, make_dirs, output_errors

__all__ = ["PreparedWriter", "atomic_dir"]


@contextmanager
def atomic_dir(out: str | os.PathLike, *, overwrite: bool = False, option: str | None = "--out") -> Iterator[Path]:
    """Yield a temporary sibling folder; it becomes ``out`` only when the block succeeds.

    ``out`` is checked writable (and replaceable) before the block runs. Whatever fails (the
    block, the disk, the final swap), no temporary folder is left, nor a parent folder this
    call created, and an existing ``out`` is kept: it is renamed away, the new folder renamed
    in, and only then the old one deleted.

    Raises:
        DataError: ``out`` is a non-empty folder and ``overwrite`` is false.
        OutputError: ``out`` cannot be written or replaced (read-only, not a folder, a mount
            point, no space); names ``out`` and ``option``.
    """
    out = Path(out)
    if out.is_dir() and not overwrite and any(out.iterdir()):
        raise DataError("output folder exists and is not empty; pass --overwrite to replace it", path=out)
    check_writable(out, option=option, replace=out.exists())
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.parent / f".{out.name}.tmp-{tag}", out.parent / f".{out.name}.old-{tag}"
    made = None
    try:
        with output_errors(out, option=option):
            made = make_dirs(out.parent)
            tmp.mkdir()
        try:
            yield tmp
        except OSError as e:  # a full or read-only disk under the block's writes is an output error
            if e.errno in OUTPUT_ERRNOS or (e.filename and str(e.filename).startswith(str(tmp))):
                raise OutputError.from_os(e, out, option=option) from None
            raise
        with output_errors(out, option=option):
            if out.exists():
                os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                if old.exists():
                    os.replace(old, out)
                raise
        made = None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


class PreparedWriter:
    """Writes a prepared folder incrementally (samples in several files), for streaming importers.

    Use inside :func:`atomic_dir`; ``add_samples`` may be called many times with
    consecutive sample ids.
    """

    def __init__(self, root: Path, *, rows_per_file: int = DEFAULT_ROWS_PER_FILE):
        self.root = Path(root)
        (self.root / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
        self.rows_per_file = rows_per_file
        self._buf: list[pa.Table] = []
        self._buf_rows = 0
        self._part = 0
        self.n_samples = 0
        self._split_writers: dict[str, pq.ParquetWriter] = {}
        self._splits_written: set[str] = set()
        self.split_rows = {s: 0 for s in SPLITS}

    def add_samples(self, user_ids, histories, targets) -> None:
        n = len(targets)
        if n == 0:
            return
        t = pa.Table.from_arrays(
            [
                pa.array(np.arange(self.n_samples, self.n_samples + n, dtype=np.int64)),
                pa.array([str(u) for u in user_ids], pa.string()),
                pa.array(histories, pa.list_(pa.int32())) if not isinstance(histories, pa.Array) else histories,
                pa.array(np.asarray(targets, dtype=np.int32)),
            ],
            schema=SAMPLES_SCHEMA,
        )
        self.n_samples += n
        self._buf.append(t)
        self._buf_rows += n
        while self._buf_rows >= self.rows_per_file:
            self._flush(self.rows_per_file)

    def _flush(self, rows: int) -> None:
        t = pa.concat_tables(self._buf)
        head, rest = t.slice(0, rows), t.slice(rows)
        pq.write_table(head, self.root / SAMPLES_DIR / f"part-{self._part:05d}.parquet")
        self._part += 1
        self._buf = [rest] if rest.num_rows else []
        self._buf_rows = rest.num_rows

    def write_items(self, item_ids, titles, categories=None) -> None:
        n = len(titles)
        t = pa.Table.from_arrays(
            [
                pa.array(np.asarray(item_ids, dtype=np.int32)),
                pa.array(list(titles), pa.string()),
                pa.array(list(categories) if categories is not None else [None] * n, pa.string()),
            ],
            schema=ITEMS_SCHEMA,
        )
        pq.write_table(t, self.root / ITEMS_FILE)

    def write_split(self, split: str, user_ids, histories, targets) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split; expected one of {SPLITS}", field="split", value=split)
        t = pa.Table.from_arrays(
            [
                pa.array([str(u) for u in user_ids], pa.string()),
                pa.array(histories, pa.list_(pa.int32())),
                pa.array(targets, pa.list_(pa.int32())),
            ],
            schema=SPLIT_SCHEMA,
        )
        pq.write_table(t, self.root / f"{split}.parquet")
        self._splits_written.add(split)
        self.split_rows[split] = t.num_rows

    def append_split(self, split: str, user_ids, histories, targets) -> None:
        """Append rows to ``valid.parquet`` / ``test.parquet`` (one row group per call).

        The streaming counterpart of :meth:`write_split`: use one or the other for a
        split. ``histories`` and ``targets`` may be Arrow list arrays (no copy) or
        lists of lists. A split never appended to is written empty by :meth:`close`.
        """
        if split not in SPLITS:
            raise DataError(f"unknown split; expected one of {SPLITS}", field="split", value=split)
        n = len(user_ids)
        if n == 0:
            return

        def _lists(x):
            return x if isinstance(x, pa.Array) else pa.array(x, pa.list_(pa.int32()))

        t = pa.Table.from_arrays(
            [pa.array([str(u) for u in user_ids], pa.string()), _lists(histories), _lists(targets)],
            schema=SPLIT_SCHEMA,
        )
        w = self._split_writers.get(split)
        if w is None:
            w = self._split_writers[split] = pq.ParquetWriter(self.root / f"{split}.parquet", SPLIT_SCHEMA)
        w.write_table(t)
        self.split_rows[split] += n

    def close(self, meta: dict) -> None:
        if self._buf_rows:
            self._flush(self._buf_rows)
        for split in SPLITS:
            if split in self._split_writers:
                self._split_writers.pop(split).close()
            elif split not in self._splits_written:
                pq.write_table(SPLIT_SCHEMA.empty_table(), self.root / f"{split}.parquet")
        if self.n_samples == 0:
            raise DataError("no samples: every user has an empty training sequence", field="history")
        meta = dict(meta)
        meta.setdefault("counts", {})["samples"] = self.n_samples
        (self.root / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
