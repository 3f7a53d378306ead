"""A score cache shared by runs (#21 item 1): effort (and ``llm_influence``) by sample key and
stage-config key, so that an unchanged sample is never scored twice by the LLM.

Layout::

    CACHE/<config_key>/config.json          the stage config the key was made from (checked on open)
    CACHE/<config_key>/part-<ns>-<pid>-<rand>.parquet
                                            one file per :meth:`ScoreCache.add`: key
                                            fixed_size_binary(16) (hi then lo, big-endian), one
                                            float64 column per score (``effort``, ...)

``config_key`` is a hash of everything the scores depend on besides the sample: the caller
passes the backend name and its config, the LLM config (model id, weights fingerprint, LoRA,
dtype), the prompt config, and the catalogue fingerprint (:func:`catalogue_key`: prompts are
built from titles, and sample keys hold item ids). Any change gives another folder, so a
changed LLM or prompt config never reuses a score; it sees an empty cache. The key also holds
:data:`engine.samplekey.KEY_VERSION` and :data:`CACHE_VERSION`.

Writes are atomic (a temporary sibling renamed into place, :func:`engine.rundir.atomic_write_with`),
so a reader sees whole part files only; a writer killed mid-write leaves at most a hidden
``.part-*.tmp-*`` file, which readers ignore (resume is clean; :meth:`ScoreCache.stray_files`
lists them). Several processes may add to one cache at once (every part file has its own
name); a process sees the others' rows after :meth:`ScoreCache.refresh`. Duplicates (a key
already cached, or twice in one batch) are not written again: the first value wins; a
duplicate with a different value is counted as a conflict (effort at a fixed LLM should be
bit-identical, so a conflict means the scorer is not deterministic). Non-finite scores are
refused, never cached.

The index is in memory, sorted by key (32 bytes a row with one score column): on this
machine, building a 1M-row cache by 100 adds of 10k took 2.1 CPU-s, opening it (100 part
files) 1.1 CPU-s, and looking up 1M keys 1.0 CPU-s. :meth:`ScoreCache.compact` merges the
part files of many small adds into one.

Usage::

    cache = ScoreCache(root, {"backend": "bigrec", "llm": ..., "prompt": ..., "catalogue": catalogue_key(data)})
    values, found = cache.lookup(keys)            # values["effort"][~found] is NaN
    cache.add(keys[~found], {"effort": fresh})   # then lookup finds them, in any later run
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import to_dict
from engine.data.schema import PARQUET_ERRORS, read_items
from engine.errors import ConfigError, DataError
from engine.rundir import atomic_write_bytes, atomic_write_with, make_dirs, output_errors, read_json
from engine.samplekey import KEY_DTYPE, KEY_VERSION

__all__ = ["CACHE_VERSION", "AddResult", "ScoreCache", "catalogue_key", "config_key", "keys_from_arrow",
           "keys_to_arrow"]

CACHE_VERSION = 1
CONFIG_FILE = "config.json"
KEY_COLUMN = "key"
_BE = np.dtype([("hi", ">u8"), ("lo", ">u8")])
_KEY_TYPE = pa.binary(16)


def _json_default(o: Any) -> Any:
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return to_dict(o)
    # Anything else (an object whose str holds a memory address, a tensor) would make the key
    # unstable or, worse, equal for different configs: refuse it.
    raise TypeError(f"{type(o).__name__} is not a plain config value")


def _canonical(config: Any) -> str:
    try:
        return json.dumps(to_dict(config), sort_keys=True, separators=(",", ":"), default=_json_default,
                          allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError([f"score cache config: {e}; pass only JSON-able values (str, numbers, lists, "
                           "dicts, config dataclasses)"], config="score cache") from None


def config_key(config: Any, *, stage: str = "effort") -> str:
    """The folder name of the scores of ``stage`` under ``config``: ``<stage>-<32 hex>``.

    ``config``: a JSON-able dict (or config dataclass) of everything the scores depend on
    besides the sample (see the module docstring). Key order does not matter; any value
    change does.
    """
    if not stage or not stage.replace("_", "").replace("-", "").isalnum():
        raise ConfigError([f"stage={stage!r}: letters, digits, '-' and '_' only"], config="score cache")
    blob = json.dumps({"stage": stage, "config": json.loads(_canonical(config)), "cache_version": CACHE_VERSION,
                       "sample_key_version": KEY_VERSION}, sort_keys=True, separators=(",", ":"))
    return f"{stage}-{hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()}"


def catalogue_key(items: pa.Table | str | os.PathLike) -> str:
    """Fingerprint of a catalogue (item ids, titles, categories): a prepared folder or its items Table."""
    t = items if isinstance(items, pa.Table) else read_items(items)
    h = hashlib.blake2b(digest_size=16, person=b"dealrec-catalog")
    for c in ("item_id", "title", "category"):
        col = t.column(c) if c in t.column_names else pa.nulls(t.num_rows, pa.string())
        h.update(c.encode() + b"\0" + json.dumps(col.to_pylist(), ensure_ascii=False).encode())
    return h.hexdigest()


def keys_to_arrow(keys: np.ndarray) -> pa.FixedSizeBinaryArray:
    """Keys as 16-byte values (hi then lo, big-endian: byte order = key order)."""
    k = np.asarray(keys, dtype=KEY_DTYPE).reshape(-1)
    be = np.empty(k.size, dtype=_BE)
    be["hi"], be["lo"] = k["hi"], k["lo"]
    return pa.FixedSizeBinaryArray.from_buffers(_KEY_TYPE, k.size, [None, pa.py_buffer(be.tobytes())])


def keys_from_arrow(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`keys_to_arrow` (a :data:`KEY_DTYPE` array)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], _KEY_TYPE)
    n = len(col)
    if n == 0:
        return np.empty(0, dtype=KEY_DTYPE)
    be = np.frombuffer(col.buffers()[1], dtype=_BE, count=n, offset=col.offset * 16)
    out = np.empty(n, dtype=KEY_DTYPE)
    out["hi"], out["lo"] = be["hi"], be["lo"]
    return out


@dataclasses.dataclass
class AddResult:
    """What :meth:`ScoreCache.add` did: rows written, keys skipped because they were cached
    already or came twice in the batch, and how many of those skipped had another value."""

    written: int
    already_cached: int
    repeated_in_batch: int
    conflicts: int


class ScoreCache:
    """The scores of one stage config under ``root`` (see the module docstring).

    Args:
        root: the cache folder (shared by runs; created on the first :meth:`add`).
        config: what the scores depend on besides the sample (:func:`config_key`).
        stage: the stage name (part of the key), e.g. ``"effort"``.
        columns: the score columns, fixed for a config (e.g. ``("effort", "llm_influence")``).

    Raises:
        DataError: a part file or config.json of this key is unreadable, has wrong columns, or
            config.json holds another config (named file).
    """

    def __init__(self, root: str | os.PathLike, config: Any, *, stage: str = "effort",
                 columns: Sequence[str] = ("effort",)):
        cols = tuple(columns)
        if not cols or len(set(cols)) != len(cols) or KEY_COLUMN in cols or not all(
                isinstance(c, str) and c for c in cols):
            raise ConfigError([f"columns={cols!r}: one or more distinct non-empty names, not {KEY_COLUMN!r}"],
                              config="score cache")
        self.root = Path(root)
        self.stage = stage
        self.columns = cols
        self.config = json.loads(_canonical(config))
        self.key = config_key(self.config, stage=stage)
        self.dir = self.root / self.key
        self._record = {"stage": stage, "config": self.config, "columns": list(cols),
                        "cache_version": CACHE_VERSION, "sample_key_version": KEY_VERSION}
        self._check_config_file()
        self._hi = np.empty(0, np.uint64)
        self._lo = np.empty(0, np.uint64)
        self._vals = np.empty((0, len(cols)), np.float64)
        self._loaded: set[str] = set()
        self.load_conflicts = 0
        self.refresh()

    # ---- reading -------------------------------------------------------------------------
    def _check_config_file(self) -> None:
        p = self.dir / CONFIG_FILE
        if not p.exists():
            return
        rec = read_json(p, hint="; delete the folder to drop these cached scores")
        for field in ("stage", "config", "columns"):
            if rec.get(field) != self._record[field]:
                raise DataError(f"the cache folder holds scores of another {field} "
                                f"({rec.get(field)!r} != {self._record[field]!r}); delete the folder to drop them",
                                path=p, field=field)

    def part_files(self) -> list[Path]:
        """The complete part files, in write order (names start with the write time)."""
        return sorted(self.dir.glob("part-*.parquet")) if self.dir.is_dir() else []

    def stray_files(self) -> list[Path]:
        """Temporary files of interrupted writes (ignored by readers; safe to delete once no
        writer runs)."""
        return sorted(p for p in self.dir.glob(".*.tmp-*")) if self.dir.is_dir() else []

    def _read_part(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        hint = "; delete the file to recompute its scores"
        try:
            t = pq.read_table(path)
        except PARQUET_ERRORS as e:
            raise DataError(f"not a readable Parquet file ({e}){hint}", path=path) from None
        for c in (KEY_COLUMN, *self.columns):
            if c not in t.column_names:
                raise DataError(f"missing column; found {t.column_names}{hint}", path=path, field=c)
        kcol = t.column(KEY_COLUMN)
        if kcol.type != _KEY_TYPE:
            raise DataError(f"column has type {kcol.type}, expected {_KEY_TYPE}{hint}", path=path, field=KEY_COLUMN)
        if kcol.null_count:
            raise DataError(f"null key{hint}", path=path, field=KEY_COLUMN)
        vals = np.empty((t.num_rows, len(self.columns)), np.float64)
        for j, c in enumerate(self.columns):
            col = t.column(c)
            if not (pa.types.is_floating(col.type) or pa.types.is_integer(col.type)) or col.null_count:
                raise DataError(f"column has type {col.type} with {col.null_count} null(s), expected float64 "
                                f"without nulls{hint}", path=path, field=c)
            vals[:, j] = col.to_numpy()
        keys = keys_from_arrow(kcol)
        return keys, vals

    def refresh(self) -> int:
        """Read part files not read yet (written by another process since); returns their count."""
        new = [p for p in self.part_files() if p.name not in self._loaded]
        if not new:
            return 0
        ks, vs = [], []
        for p in new:
            k, v = self._read_part(p)
            ks.append(k)
            vs.append(v)
            self._loaded.add(p.name)
        k = np.concatenate(ks)
        v = np.concatenate(vs)
        self.load_conflicts += self._merge(k["hi"], k["lo"], v)[2]
        return len(new)

    def _search(self, qh: np.ndarray, ql: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each query key: its position in the sorted index (where it is, or where it would
        be inserted to keep (hi, lo) order) and whether it is there."""
        pos = np.searchsorted(self._hi, qh, side="left")
        right = np.searchsorted(self._hi, qh, side="right")
        found = np.zeros(qh.size, bool)
        one = right - pos == 1
        found[one] = self._lo[pos[one]] == ql[one]
        pos[one] += (self._lo[pos[one]] < ql[one])  # not found: before or after the one with equal hi
        # several cached keys share this hi (~2**-64 per pair): they are sorted by lo
        for i in np.flatnonzero(right - pos > 1):
            j = pos[i] + int(np.searchsorted(self._lo[pos[i]:right[i]], ql[i]))
            pos[i], found[i] = j, bool(j < right[i] and self._lo[j] == ql[i])
        return pos, found

    def _merge(self, hi: np.ndarray, lo: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, int, int, int]:
        """Merge rows into the sorted in-memory index, first wins (cached rows, then row order);
        O(batch log batch + index) per call. Returns (the mask of rows that were new, how many
        were cached already, repeated in the batch, and conflicts: skipped with another value)."""
        order = np.lexsort((lo, hi))  # stable: earlier rows first among equal keys
        s_hi, s_lo = hi[order], lo[order]
        first = np.ones(order.size, bool)
        first[1:] = (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1])
        run_start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        rep = ~first
        conflicts = int(np.sum(~_same(vals[order[rep]], vals[order[run_start[rep]]]))) if rep.any() else 0
        cand = order[first]  # the first row of each distinct key, in key order
        pos, found = self._search(hi[cand], lo[cand])
        if found.any():
            conflicts += int(np.sum(~_same(vals[cand[found]], self._vals[pos[found]])))
        new_rows = cand[~found]
        new_mask = np.zeros(hi.size, bool)
        new_mask[new_rows] = True
        if new_rows.size:
            at = pos[~found]
            self._hi = np.insert(self._hi, at, hi[new_rows])
            self._lo = np.insert(self._lo, at, lo[new_rows])
            self._vals = np.insert(self._vals, at, vals[new_rows], axis=0)
        # repeats of a key that was cached count as already cached; repeats of a new key as repeated
        rep_cached = int(np.isin(order[run_start[rep]], cand[found]).sum()) if rep.any() else 0
        return new_mask, int(found.sum()) + rep_cached, int(rep.sum()) - rep_cached, conflicts

    def __len__(self) -> int:
        return int(self._hi.size)

    def lookup(self, keys: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The cached scores of ``keys``: ({column: float64 [n], NaN where missing}, found bool [n])."""
        q = np.asarray(keys, dtype=KEY_DTYPE).reshape(-1)
        pos, found = self._search(q["hi"], q["lo"])
        out = {}
        for j, c in enumerate(self.columns):
            v = np.full(q.size, np.nan)
            v[found] = self._vals[pos[found], j]
            out[c] = v
        return out, found

    def compact(self) -> int:
        """Rewrite the part files read so far as one file (atomically, then delete them); for a
        cache grown by many small adds. Safe beside writers: files written since are kept.
        Returns the number of files replaced."""
        self.refresh()
        old = [p for p in self.part_files() if p.name in self._loaded]
        if len(old) <= 1:
            return 0
        keys = np.empty(len(self), dtype=KEY_DTYPE)
        keys["hi"], keys["lo"] = self._hi, self._lo
        self._write_part(keys, self._vals)
        for p in old:
            p.unlink(missing_ok=True)
            self._loaded.discard(p.name)
        return len(old)

    # ---- writing -------------------------------------------------------------------------
    def _values_matrix(self, values: Any, n: int) -> np.ndarray:
        if isinstance(values, Mapping):
            missing = [c for c in self.columns if c not in values]
            extra = [c for c in values if c not in self.columns]
            if missing or extra:
                raise DataError(f"score columns {sorted(values)} do not match the cache's {list(self.columns)}",
                                field=(missing or extra)[0])
            cols = [np.asarray(values[c], dtype=np.float64).reshape(-1) for c in self.columns]
            m = np.stack(cols, axis=1) if cols else np.empty((n, 0))
        else:
            m = np.asarray(values, dtype=np.float64)
            if m.ndim == 1 and len(self.columns) == 1:
                m = m[:, None]
        if m.shape != (n, len(self.columns)):
            raise DataError(f"values have shape {m.shape}, expected ({n}, {len(self.columns)}) for columns "
                            f"{list(self.columns)}", field="values")
        bad = ~np.isfinite(m)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise DataError(f"non-finite score at row {int(i)}; not cached", field=self.columns[int(j)],
                            value=float(m[i, j]))
        return m

    def add(self, keys: np.ndarray, values: Any) -> AddResult:
        """Cache the scores of ``keys`` (one part file, written atomically); keys cached already
        (by this or any other run) and repeats within the batch are skipped, first wins.

        ``values``: {column: array [n]} (or an [n] array for a single column, [n, c] for c).

        Raises:
            DataError: values not matching keys / columns, or a non-finite score.
            OutputError: the cache folder cannot be written (names it).
        """
        k = np.asarray(keys, dtype=KEY_DTYPE).reshape(-1)
        vals = self._values_matrix(values, k.size)
        self.refresh()  # rows another process wrote since: they win, and are not written twice
        if k.size == 0:
            return AddResult(0, 0, 0, 0)
        hi0, lo0, v0 = self._hi, self._lo, self._vals
        new, already, repeated, conflicts = self._merge(k["hi"].copy(), k["lo"].copy(), vals)
        if not new.any():
            return AddResult(0, already, repeated, conflicts)
        try:
            self._write_part(k[new], vals[new])
        except BaseException:
            self._hi, self._lo, self._vals = hi0, lo0, v0  # nothing written: nothing cached
            raise
        return AddResult(int(new.sum()), already, repeated, conflicts)

    def _write_part(self, keys: np.ndarray, vals: np.ndarray) -> None:
        with output_errors(self.dir, option="score cache"):
            make_dirs(self.dir)
        cfg = self.dir / CONFIG_FILE
        if not cfg.exists():
            atomic_write_bytes(cfg, json.dumps(self._record, indent=2, sort_keys=True).encode(), option="score cache")
        table = pa.Table.from_arrays([keys_to_arrow(keys), *[pa.array(vals[:, j]) for j in range(vals.shape[1])]],
                                     names=[KEY_COLUMN, *self.columns])
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        atomic_write_with(self.dir / name, lambda tmp: pq.write_table(table, tmp), option="score cache")
        self._loaded.add(name)


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise bit-for-bit equality of two float matrices."""
    return np.all(a.view(np.uint64) == b.view(np.uint64), axis=1)
