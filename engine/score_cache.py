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

    def _merge(self, hi: np.ndarray, lo: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, int, int, int]:
        """Merge rows into the in-memory index, first wins (existing rows first, then row order).
        Returns (the mask of rows that were new, already cached, repeated in the batch, conflicts)."""
        n_old = self._hi.size
        all_hi = np.concatenate([self._hi, hi])
        all_lo = np.concatenate([self._lo, lo])
        order = np.lexsort((all_lo, all_hi))  # stable: earlier rows first among equals
        s_hi, s_lo = all_hi[order], all_lo[order]
        first = np.ones(order.size, bool)
        first[1:] = (s_hi[1:] != s_hi[:-1]) | (s_lo[1:] != s_lo[:-1])
        all_vals = np.concatenate([self._vals, vals])
        # each row's winner: the first row of its run of equal keys
        run_start = np.maximum.accumulate(np.where(first, np.arange(order.size), 0))
        winner = order[run_start]
        dup = ~first
        dup_rows = order[dup]
        conflicts = int(np.sum(~_same(all_vals[dup_rows], all_vals[winner[dup]]))) if dup_rows.size else 0
        new_mask = np.zeros(hi.size, bool)
        kept = order[first]
        new_mask[kept[kept >= n_old] - n_old] = True
        already = int(np.sum(winner[dup] < n_old))
        repeated = int(dup.sum()) - already
        self._hi, self._lo, self._vals = s_hi[first], s_lo[first], all_vals[kept]
        return new_mask, already, repeated, conflicts

    def __len__(self) -> int:
        return int(self._hi.size)

    def lookup(self, keys: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The cached scores of ``keys``: ({column: float64 [n], NaN where missing}, found bool [n])."""
        q = np.asarray(keys, dtype=KEY_DTYPE).reshape(-1)
        qh, ql = q["hi"], q["lo"]
        pos = np.searchsorted(self._hi, qh, side="left")
        found = np.zeros(q.size, bool)
        at = np.minimum(pos, max(self._hi.size - 1, 0))
        if self._hi.size:
            found = (self._hi[at] == qh) & (self._lo[at] == ql)
            # hi collisions (two cached keys with the same hi, ~2**-64 per pair): sorted by lo
            # within equal hi, so search the run of equal hi for the rest
            right = np.searchsorted(self._hi, qh, side="right")
            for i in np.flatnonzero(~found & (right - pos > 1)):
                j = pos[i] + int(np.searchsorted(self._lo[pos[i]:right[i]], ql[i]))
                if j < right[i] and self._lo[j] == ql[i]:
                    at[i], found[i] = j, True
        out = {}
        for j, c in enumerate(self.columns):
            v = np.full(q.size, np.nan)
            if self._hi.size:
                v[found] = self._vals[at[found], j]
            out[c] = v
        return out, found

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
