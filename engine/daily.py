"""Every day again (#21 item 2): what an update prune (``dealrec prune --update RUN0``) reuses.

Pure functions (numpy / arrow, no Ray) behind :mod:`jobs.prune_update`:

* :func:`file_keys` / :func:`user_hashes`: the content key (:mod:`engine.samplekey`) and a 64-bit
  user hash of every sample of one samples file. Every prune writes them to
  ``RUN/sample_keys.parquet`` (:func:`write_sample_keys`), which is how the next day tells its
  samples apart.
* :func:`diff_days`: each sample of today as ``unchanged`` (its key was a sample of RUN0: same
  user, history and target), ``changed`` (its user had a sample in RUN0, with another history
  or target: a new target, a longer history) or ``new`` (a user without a sample in RUN0).
* :class:`UpdateConfig` and :func:`update_rows`: the surrogate's warm start trains on every new
  and changed sample plus a seeded replay of ``replay`` times as many unchanged ones, for
  ``epochs`` passes over that mix (:func:`update_steps` optimizer steps).
* :func:`architecture_problems`: a RUN0 whose surrogate has another architecture cannot be
  warm-started (the parameters do not fit): every differing field, named.
* :class:`KeyIndex`: score rows by key, in memory (RUN0's influence reused by key).
* :func:`effort_cache_config`: everything an effort score depends on besides the sample (backend,
  LLM or encoder with a fingerprint of its weights, LoRA, prompt, catalogue), the config key of
  :class:`engine.score_cache.ScoreCache`: a changed LLM or prompt config is another key, so its
  scores are never reused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import ConfigError, DataError, check
from engine.samplekey import KEY_DTYPE, sample_keys

__all__ = ["ARCHITECTURE_FIELDS", "DayDiff", "KeyIndex", "SAMPLE_KEYS_FILE", "STATUS", "UpdateConfig",
           "architecture_problems", "diff_days", "effort_cache_config", "file_keys", "read_sample_keys",
           "update_rows", "update_steps", "user_hashes", "write_sample_keys"]

#: Written into every prune run folder: sample_id, user_hash (uint64), key (16 bytes).
SAMPLE_KEYS_FILE = "sample_keys.parquet"
#: The status codes of :func:`diff_days`.
STATUS = {"unchanged": 0, "changed": 1, "new": 2}
#: The surrogate fields that shape its parameters: a warm start needs them equal (and n_items).
ARCHITECTURE_FIELDS = ("model", "hidden", "n_blocks", "n_heads", "max_len")
INFLUENCE_MODES = ("all", "changed")


@dataclass
class UpdateConfig:
    """How ``dealrec prune --update RUN0`` updates RUN0's surrogate-side results (validated)."""

    epochs: float = field(default=1.0, metadata={
        "help": "passes of the surrogate's warm start over the update set (every new and changed sample plus "
                "the replay); the steps are ceil(epochs * update set / batch size)"})
    replay: float = field(default=1.0, metadata={
        "help": "unchanged samples replayed in the warm start, as a multiple of the new + changed ones "
                "(seeded; capped at the unchanged count), so that the surrogate does not drift towards today"})
    influence: str = field(default="all", metadata={
        "help": "'all': influence recomputed for every sample on the updated surrogate and v (cheap); 'changed': "
                "surrogate and v frozen at RUN0's, only new and changed samples scored, unchanged ones reuse RUN0's "
                "influence by key (rescaled by n0/n)"})
    cold_check: bool = field(default=False, metadata={
        "help": "also solve the iHVP from zero on the same operator, to report the CG iterations the warm start "
                "saved (doubles the iHVP cost; without it RUN0's own iteration count is the cold reference)"})

    def __post_init__(self) -> None:
        p: list[str] = []
        check(p, isinstance(self.epochs, (int, float)) and not isinstance(self.epochs, bool)
              and math.isfinite(self.epochs) and self.epochs > 0, f"epochs={self.epochs!r}: must be > 0")
        check(p, isinstance(self.replay, (int, float)) and not isinstance(self.replay, bool)
              and math.isfinite(self.replay) and self.replay >= 0, f"replay={self.replay!r}: must be >= 0")
        check(p, self.influence in INFLUENCE_MODES, f"influence={self.influence!r}: expected one of {INFLUENCE_MODES}")
        check(p, isinstance(self.cold_check, bool), f"cold_check={self.cold_check!r}: must be true or false")
        if p:
            raise ConfigError(p, config="UpdateConfig")


# ---- keys of a day ----------------------------------------------------------------------
def user_hashes(user_ids: Any) -> np.ndarray:
    """A 64-bit hash (uint64) of each user id string (the key of (user, [], 0), salted)."""
    users = user_ids if isinstance(user_ids, (pa.Array, pa.ChunkedArray)) else pa.array(list(user_ids), pa.string())
    n = len(users)
    empty = pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32()))
    return sample_keys(users, empty, np.zeros(n, np.int32), salt="user")["hi"].copy()


def file_keys(table: pa.Table) -> dict[str, np.ndarray]:
    """``{"sample_id", "user_hash", "key"}`` of the rows of one samples table, in row order."""
    return {"sample_id": table.column("sample_id").to_numpy().astype(np.int64),
            "user_hash": user_hashes(table.column("user_id")),
            "key": sample_keys(table.column("user_id"), table.column("history"), table.column("target"))}


def write_sample_keys(path: str | os.PathLike, parts: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Write the keys of every file (:func:`file_keys`) as one table, atomically."""
    from engine.rundir import atomic_write_with
    from engine.score_cache import keys_to_arrow

    ids = np.concatenate([p["sample_id"] for p in parts]) if parts else np.zeros(0, np.int64)
    uh = np.concatenate([p["user_hash"] for p in parts]) if parts else np.zeros(0, np.uint64)
    keys = np.concatenate([p["key"] for p in parts]) if parts else np.zeros(0, KEY_DTYPE)
    order = np.argsort(ids, kind="stable")
    table = pa.table({"sample_id": pa.array(ids[order]), "user_hash": pa.array(uh[order]),
                      "key": keys_to_arrow(keys[order])})
    atomic_write_with(Path(path), lambda tmp: pq.write_table(table, tmp), option="--out")


def read_sample_keys(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The table of :func:`write_sample_keys` as arrays (sorted by sample_id).

    Raises:
        DataError: unreadable or without the expected columns (names the file).
    """
    from engine.data.schema import PARQUET_ERRORS
    from engine.score_cache import keys_from_arrow

    try:
        t = pq.read_table(path)
    except PARQUET_ERRORS as e:
        raise DataError(f"not a readable Parquet file ({e}); delete it to recompute it", path=path) from None
    for c in ("sample_id", "user_hash", "key"):
        if c not in t.column_names:
            raise DataError(f"missing column; found {t.column_names}", path=path, field=c)
    return {"sample_id": t.column("sample_id").to_numpy(), "user_hash": t.column("user_hash").to_numpy(),
            "key": keys_from_arrow(t.column("key"))}


# ---- what changed -----------------------------------------------------------------------
@dataclass
class DayDiff:
    """Today's samples against RUN0's: ``status[i]`` for today's row i (:data:`STATUS`)."""

    status: np.ndarray
    removed: int  # RUN0 samples whose user has no sample today

    def counts(self) -> dict[str, int]:
        out = {name: int((self.status == code).sum()) for name, code in STATUS.items()}
        out["total"] = int(self.status.size)
        out["removed"] = int(self.removed)
        return out


def diff_days(old_keys: np.ndarray, old_users: np.ndarray, new_keys: np.ndarray, new_users: np.ndarray) -> DayDiff:
    """Classify today's samples (``new_keys``, ``new_users``, any order) against RUN0's."""
    old_k = np.asarray(old_keys, dtype=KEY_DTYPE)
    new_k = np.asarray(new_keys, dtype=KEY_DTYPE)
    same = np.isin(new_k, old_k)
    seen = np.isin(np.asarray(new_users, np.uint64), np.asarray(old_users, np.uint64))
    status = np.where(same, STATUS["unchanged"], np.where(seen, STATUS["changed"], STATUS["new"])).astype(np.int8)
    removed = int((~np.isin(np.asarray(old_users, np.uint64), np.asarray(new_users, np.uint64))).sum())
    return DayDiff(status=status, removed=removed)


def update_rows(status: np.ndarray, replay: float, seed: int) -> tuple[np.ndarray, dict[str, int]]:
    """Row positions (sorted) of the warm start's training set: every new and changed row plus a
    seeded ``replay`` x as many unchanged rows (at most all of them); and their counts."""
    status = np.asarray(status)
    fresh = np.flatnonzero(status != STATUS["unchanged"])
    rest = np.flatnonzero(status == STATUS["unchanged"])
    k = min(rest.size, int(round(replay * fresh.size)))
    pick = np.sort(np.random.default_rng([int(seed), 0x5EED]).choice(rest.size, size=k, replace=False)) if k else []
    rows = np.sort(np.concatenate([fresh, rest[np.asarray(pick, dtype=np.int64)]])).astype(np.int64)
    return rows, {"new_and_changed": int(fresh.size), "replayed_unchanged": int(k), "total": int(rows.size)}


def update_steps(n_rows: int, epochs: float, batch_size: int) -> int:
    """Optimizer steps of the warm start: ceil(epochs * n_rows / batch_size) (0 when nothing changed)."""
    return int(math.ceil(epochs * n_rows / batch_size)) if n_rows else 0


def architecture_problems(old: Mapping[str, Any], new: Mapping[str, Any], *, old_items: int, new_items: int,
                          where: str) -> list[str]:
    """One message per surrogate field that differs between RUN0 (``old``) and this run."""
    p = [f"surrogate.{f}: {where} was trained with {f}={old.get(f)!r}, this run asks for {f}={new.get(f)!r}; "
         f"a warm start needs the same surrogate architecture ({', '.join(ARCHITECTURE_FIELDS)}): run with "
         f"--surrogate {old.get('model')} and the same sizes, or prune afresh without --update"
         for f in ARCHITECTURE_FIELDS if old.get(f) != new.get(f)]
    if old_items != new_items:
        p.append(f"n_items: {where}'s surrogate has {old_items} items, this data {new_items}")
    return p


class KeyIndex:
    """Score rows by sample key, in memory: ``lookup(keys) -> ({column: values, NaN if absent}, found)``."""

    def __init__(self, keys: np.ndarray, values: Mapping[str, np.ndarray]):
        k = np.asarray(keys, dtype=KEY_DTYPE)
        order = np.argsort(k, order=("hi", "lo"), kind="stable")
        self._keys = k[order]
        self._vals = {c: np.asarray(v, np.float64)[order] for c, v in values.items()}
        self.columns = tuple(values)

    def __len__(self) -> int:
        return int(self._keys.size)

    def lookup(self, keys: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        q = np.asarray(keys, dtype=KEY_DTYPE)
        if not self._keys.size:
            return {c: np.full(q.size, np.nan) for c in self.columns}, np.zeros(q.size, bool)
        pos = np.searchsorted(self._keys, q)
        pc = np.minimum(pos, self._keys.size - 1)
        found = (pos < self._keys.size) & (self._keys[pc] == q)
        out = {}
        for c, v in self._vals.items():
            o = np.full(q.size, np.nan)
            o[found] = v[pc[found]]
            out[c] = o
        return out, found

    def add(self, keys: np.ndarray, values: Mapping[str, np.ndarray]):
        """Add rows whose key is absent (first wins); returns the number added."""
        k = np.asarray(keys, dtype=KEY_DTYPE)
        _, found = self.lookup(k)
        new = ~found
        if new.any():
            merged = KeyIndex(np.concatenate([self._keys, k[new]]),
                              {c: np.concatenate([self._vals[c], np.asarray(values[c], np.float64)[new]])
                               for c in self.columns})
            self._keys, self._vals = merged._keys, merged._vals
        return int(new.sum())


# ---- the effort cache's config ------------------------------------------------------------
def _weights_fingerprint(path: str | None) -> str | None:
    """sha256 of a local model / adapter folder (:func:`engine.rundir.tree_digest`); a name that is
    not a local path (a Hub id) is returned as it is."""
    from engine.rundir import tree_digest

    if path is None:
        return None
    return tree_digest(path) if Path(path).exists() else f"id:{path}"


def effort_cache_config(backend: str, options: Mapping[str, Any], *, catalogue: str, base: str | None = None,
                        device_kind: str = "cpu") -> dict[str, Any]:
    """The config an effort score depends on besides the sample (the cache's config key).

    Args:
        backend: ``"bigrec"`` or ``"textrec"``.
        options: the backend's options (``PruneJobConfig.backend_options``).
        catalogue: :func:`engine.score_cache.catalogue_key` of the items.
        base: bigrec: the resolved base model folder (:func:`engine.llm.bigrec.model.resolve_base`).
        device_kind: ``"cpu"`` or ``"gpu"`` (another dtype under ``dtype='auto'``, other rounding).

    Where scores do not depend on it, a field is left out: the cache folder of the tiny LLM
    (``cache_dir``; its base is fingerprinted instead), the device index. The weights of a local
    model, encoder or adapter are fingerprinted by content (sha256 of the folder), so a model
    retrained in place is another key.
    """
    opts = {k: v for k, v in dict(options).items()}
    if backend == "bigrec":
        llm = {k: v for k, v in dict(opts.get("llm", {})).items() if k not in ("cache_dir", "device")}
        model = str(llm.get("model"))
        if model == "tiny":  # built from the tiny_* fields, the seed and the catalogue's titles
            llm["base"] = f"tiny:{Path(base).name}" if base else "tiny"
        else:
            llm["base"] = _weights_fingerprint(base or model)
        llm["adapter"] = _weights_fingerprint(llm.get("adapter"))
        cfg = {"llm": llm, "prompt": opts.get("prompt")}
    elif backend == "textrec":
        tc = {k: v for k, v in dict(opts.get("config", {})).items() if k not in ("device",)}
        tc["model"] = _weights_fingerprint(tc.get("model"))
        cfg = {"config": tc, "negatives_seeded_by": "sample_key"}
    else:
        cfg = {"options": opts}
    from engine.effort.batching import BATCHING_KEY

    # the micro-batching decides float rounding (engine.effort.batching): another one is another key
    return {"backend": backend, **cfg, "catalogue": catalogue, "device_kind": device_kind, "batching": BATCHING_KEY}
