"""Reading a prepared data set (:mod:`engine.data.layout`), with Arrow schemas checked on read.

The writing side (:func:`atomic_dir`, :class:`PreparedWriter`) is :mod:`engine.data.writer`,
re-exported here; the layout constants and schemas are re-exported from :mod:`engine.data.layout`.
"""

from __future__ import annotations

import os
from typing import Any
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
from engine.data.writer import PreparedWriter, atomic_dir
from engine.errors import DataError
from engine.rundir import read_json

__all__ = [
    "DEFAULT_ROWS_PER_FILE", "ITEMS_FILE", "ITEMS_SCHEMA", "META_FILE", "PARQUET_ERRORS", "SAMPLES_DIR",
    "SAMPLES_SCHEMA", "SPLITS", "SPLIT_SCHEMA", "PreparedWriter", "atomic_dir", "check_item_ids", "check_samples",
    "count_samples", "parquet_rows", "read_id_column", "read_items", "read_meta", "read_parquet",
    "read_parquet_checked", "read_sample_rows", "read_samples", "read_split", "sample_files", "sample_loaders",
    "sample_rows", "take_rows", "validate_prepared",
]


def _check_schema(table: pa.Table, schema: pa.Schema, path: object) -> pa.Table:
    """Check that ``table`` has every column of ``schema`` with a castable type; return it cast."""
    names = set(table.column_names)
    for f in schema:
        if f.name not in names:
            raise DataError(
                f"missing column; expected columns {schema.names}, found {table.column_names}",
                path=path,
                field=f.name,
            )
    table = table.select(schema.names)
    cols = []
    for f in schema:
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataError(
                    f"column has type {col.type}, expected {f.type} ({e})", path=path, field=f.name
                ) from None
        if not f.nullable and col.null_count:
            idx = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"null value at row {idx} in a non-nullable column", path=path, field=f.name)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


#: What reading a corrupt Parquet file raises (a truncated file: ArrowInvalid, a ValueError; a
#: corrupt page or footer: OSError or another ArrowException), turned into one DataError naming the file.
PARQUET_ERRORS = (pa.ArrowException, OSError)


def read_parquet(path: str | os.PathLike, *, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file (or a folder of them), any schema.

    Raises:
        DataError: the file is missing or not readable Parquet (truncated, corrupt); names the file.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        return pq.read_table(path, columns=columns)
    except PARQUET_ERRORS as e:
        raise DataError(f"not a readable Parquet file ({e})", path=path) from None


def parquet_rows(path: str | os.PathLike) -> int:
    """Row count of one Parquet file from its footer (no data read).

    Raises:
        DataError: the file is missing or its footer is unreadable (e.g. a truncated file).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        return int(pq.read_metadata(path).num_rows)
    except PARQUET_ERRORS as e:
        raise DataError(f"not a readable Parquet file ({e})", path=path) from None


def read_parquet_checked(path: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """Read one Parquet file (or a folder of them) and check it against ``schema``.

    Raises:
        DataError: the file is missing, not Parquet, or lacks a column / has a wrong type.
    """
    return _check_schema(read_parquet(path), schema, Path(path))


def read_id_column(path: str | os.PathLike, field: str = "sample_id") -> np.ndarray:
    """The integer id column ``field`` of a Parquet file (a selected.parquet, a scores.parquet), as int64.

    Raises:
        DataError: unreadable file, missing column, a non-integer type or a null; names the file and field.
    """
    t = read_parquet(path)
    if field not in t.column_names:
        raise DataError(f"missing column; found {t.column_names}", path=path, field=field)
    col = t.column(field)
    if not pa.types.is_integer(col.type):
        raise DataError(f"column has type {col.type}, expected integers", path=path, field=field)
    if col.null_count:
        idx = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"null value at row {idx}", path=path, field=field)
    return np.asarray(col.to_numpy(), dtype=np.int64)


def sample_files(data_dir: str | os.PathLike) -> list[Path]:
    """Sorted list of the samples Parquet files of a prepared folder."""
    d = Path(data_dir) / SAMPLES_DIR
    files = sorted(d.glob("*.parquet"))
    if not files:
        raise DataError(
            "no samples Parquet files; prepare the data first, e.g. "
            "`dealrec prepare --format dealrec-release --input ../shared/data/games --out DIR` "
            "or `dealrec prepare --format synthetic --out DIR`",
            path=d,
        )
    return files


def sample_loaders(data_dir: str | os.PathLike) -> list:
    """One loader per samples Parquet file (a callable returning the schema-checked Table): the
    streamed input of :func:`engine.surrogate.train_surrogate`, one file in memory at a time."""
    from functools import partial

    return [partial(read_parquet_checked, f, SAMPLES_SCHEMA) for f in sample_files(data_dir)]


def count_samples(data_dir: str | os.PathLike) -> int:
    """Number of samples of a prepared folder, from the Parquet footers (no data read)."""
    return int(sum(parquet_rows(f) for f in sample_files(data_dir)))


def check_samples(data_dir: str | os.PathLike, *, n_items: int | None = None) -> int:
    """Read every samples file once, one at a time (schemas, nulls, every page), and check that
    the sample ids are exactly 0..n-1 across files (and, given ``n_items``, that every history
    and target item is in the catalogue); return n. The check a job runs where it reads the
    data, before any cluster work: a bad file fails here in seconds, named, instead of inside
    an actor pool.

    Raises:
        DataError: an unreadable file, a bad column, an item id outside the catalogue, or a
            duplicate / missing / out-of-range sample id (with the file(s) holding it).
    """
    files = sample_files(data_dir)
    ids, owner = [], []
    for i, f in enumerate(files):
        t = read_parquet_checked(f, SAMPLES_SCHEMA)
        if n_items is not None:
            check_item_ids(t.column("target").to_numpy(), n_items, path=f, field="target")
            check_item_ids(t.column("history").combine_chunks().flatten().to_numpy(), n_items, path=f,
                           field="history")
        col = t.column("sample_id").to_numpy()
        ids.append(col)
        owner.append(np.full(col.size, i, dtype=np.int32))
    ids_all, owner_all = np.concatenate(ids), np.concatenate(owner)
    order = np.argsort(ids_all, kind="stable")
    s = ids_all[order]
    dup = np.flatnonzero(s[1:] == s[:-1])
    if dup.size:
        v = int(s[dup[0]])
        where = sorted({files[int(owner_all[j])].name for j in order[s == v]})
        raise DataError(f"duplicate sample_id (in {', '.join(where)}); sample ids must be unique, 0..n-1",
                        path=Path(data_dir) / SAMPLES_DIR, field="sample_id", value=v)
    n = int(s.size)
    if n and (s[0] != 0 or s[-1] != n - 1):  # unique ids: dense iff the first is 0 and the last n-1
        j = int(order[0] if s[0] < 0 else order[-1])
        bad = int(ids_all[j])
        raise DataError(f"sample_id outside 0..{n - 1} (in {files[int(owner_all[j])].name}); "
                        "sample ids must be dense 0..n-1", path=Path(data_dir) / SAMPLES_DIR, field="sample_id",
                        value=bad)
    return n


def read_sample_rows(data_dir: str | os.PathLike, sample_ids: np.ndarray) -> pa.Table:
    """The samples with these ids (sorted by sample_id), read one file at a time: memory is that
    of the subset and one file, not of every sample (a selected 2% of millions).

    Raises:
        DataError: an id that no samples file holds.
    """
    want = np.unique(np.asarray(sample_ids, dtype=np.int64))
    if want.size and want[0] == 0 and want[-1] == want.size - 1 and want.size == count_samples(data_dir):
        return read_samples(data_dir)  # every sample: one read, no per-file id matching
    parts = []
    for f in sample_files(data_dir):
        t = read_parquet_checked(f, SAMPLES_SCHEMA)
        keep = np.flatnonzero(np.isin(t.column("sample_id").to_numpy(), want))
        if keep.size:
            parts.append(t.take(pa.array(keep)))
    table = pa.concat_tables(parts) if parts else SAMPLES_SCHEMA.empty_table()
    table = table.sort_by("sample_id")
    got = table.column("sample_id").to_numpy()
    if got.size != want.size:
        missing = want[~np.isin(want, got)]
        raise DataError("sample id not in any samples file", path=Path(data_dir) / SAMPLES_DIR, field="sample_id",
                        value=int(missing[0]) if missing.size else None)
    return table


def read_samples(data_dir: str | os.PathLike, *, check_dense: bool = True) -> pa.Table:
    """All samples of a prepared folder, schema-checked, ordered by ``sample_id``."""
    tables = [read_parquet_checked(f, SAMPLES_SCHEMA) for f in sample_files(data_dir)]
    table = pa.concat_tables(tables)
    ids = table.column("sample_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    if check_dense:
        if not np.array_equal(ids[order], np.arange(len(ids))):
            raise DataError(
                "sample_id must be dense 0..n-1 without duplicates", path=Path(data_dir) / SAMPLES_DIR,
                field="sample_id",
            )
    if not np.array_equal(order, np.arange(len(ids))):
        table = table.take(pa.array(order))
    return table


def read_items(data_dir: str | os.PathLike) -> pa.Table:
    """The items table of a prepared folder, schema-checked, ordered by ``item_id``."""
    t = read_parquet_checked(Path(data_dir) / ITEMS_FILE, ITEMS_SCHEMA)
    return t.sort_by("item_id")


def sample_rows(n: int, k: int | None, seed: int) -> np.ndarray | None:
    """A seeded random subset of ``k`` of the row positions 0..n-1, sorted; None = all rows
    (k None or >= n). The one rule behind every fixed subsample (Hessian rows, validation users)."""
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(k), replace=False))


def take_rows(chunk: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of a pyarrow Table or of a dict of numpy columns (same kind back)."""
    if hasattr(chunk, "take") and hasattr(chunk, "num_rows"):
        return chunk.take(pa.array(idx, pa.int64()))
    return {k: np.asarray(v)[idx] for k, v in chunk.items()}


def read_split(data_dir: str | os.PathLike, split: str, *, max_rows: int | None = None, seed: int = 0) -> pa.Table:
    """The ``valid`` or ``test`` table of a prepared folder, schema-checked.

    ``max_rows``: keep a seeded random subset of that many rows (:func:`sample_rows`), read in
    record batches so that memory stays that of the subset (millions of users).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split; expected one of {SPLITS}", field="split", value=split)
    path = Path(data_dir) / f"{split}.parquet"
    if max_rows is None:
        return read_parquet_checked(path, SPLIT_SCHEMA)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        f = pq.ParquetFile(path)
        rows = sample_rows(f.metadata.num_rows, max_rows, seed)
        if rows is None:
            return read_parquet_checked(path, SPLIT_SCHEMA)
        parts, start = [], 0
        for rb in f.iter_batches(batch_size=65536):
            lo, hi = np.searchsorted(rows, [start, start + rb.num_rows])
            if hi > lo:
                parts.append(pa.Table.from_batches([rb]).take(pa.array(rows[lo:hi] - start)))
            start += rb.num_rows
    except PARQUET_ERRORS as e:
        raise DataError(f"not a readable Parquet file ({e})", path=path) from None
    table = pa.concat_tables(parts) if parts else f.schema_arrow.empty_table()
    return _check_schema(table, SPLIT_SCHEMA, path)


def read_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json of a prepared folder (a JSON object).

    Raises:
        DataError: missing, not JSON or not an object; names the file.
    """
    p = Path(data_dir) / META_FILE
    if not p.exists():
        raise DataError("meta.json missing: not a prepared dealrec folder", path=p)
    return read_json(p, hint="; prepare the folder again (`dealrec prepare ... --overwrite`)")


def check_item_ids(ids: np.ndarray, n_items: int, *, path: object, field: str) -> None:
    """Raise DataError naming the first id outside ``[0, n_items)``."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= n_items)
    if bad.any():
        raise DataError(
            f"unknown item id (catalogue has ids 0..{n_items - 1})", path=path, field=field,
            value=int(ids[np.flatnonzero(bad)[0]]),
        )


def validate_prepared(data_dir: str | os.PathLike) -> dict:
    """Full consistency check of a prepared folder; returns counts.

    Checks schemas, dense sample ids, and that every history/target item id exists in
    the items table.
    """
    items = read_items(data_dir)
    n_items = items.num_rows
    if not np.array_equal(items.column("item_id").to_numpy(), np.arange(n_items)):
        raise DataError("item_id must be dense 0..n_items-1", path=Path(data_dir) / ITEMS_FILE, field="item_id")
    samples = read_samples(data_dir)
    p = Path(data_dir) / SAMPLES_DIR
    check_item_ids(samples.column("target").to_numpy(), n_items, path=p, field="target")
    check_item_ids(samples.column("history").combine_chunks().flatten().to_numpy(), n_items, path=p, field="history")
    counts = {"samples": samples.num_rows, "items": n_items}
    for split in SPLITS:
        t = read_split(data_dir, split)
        sp = Path(data_dir) / f"{split}.parquet"
        check_item_ids(t.column("targets").combine_chunks().flatten().to_numpy(), n_items, path=sp, field="targets")
        check_item_ids(t.column("history").combine_chunks().flatten().to_numpy(), n_items, path=sp, field="history")
        counts[split] = t.num_rows
    return counts
