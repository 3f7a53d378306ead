"""A simulated previous day of a prepared folder (#21 item 3), for data without timestamps.

``dealrec prepare --format simulate-yesterday --input TODAY --out YESTERDAY
[--new-user-share 0.05] [--changed-user-share 1.0] [--seed 0]`` writes the folder "yesterday" of the prepared folder
"today" (any format: the DEALRec release has no timestamps, so its days cannot be cut with
``--until``). The rule, applied to every user of today:

* a **held-back** user: a seeded share ``new_user_share`` of the users with a sample
  (exactly ``round(share * samples)`` of them, chosen by ``numpy.random.default_rng(seed)``
  over today's samples in ``sample_id`` order) is absent yesterday: no sample, no
  valid/test row. They are the users who appear only today.
* every other user loses the last item of its training sequence (the item that "happened
  today"): today's sample ``(history h_1..h_k, target t)`` becomes yesterday's sample
  ``(h_1..h_{k-1}, h_k)``, so that sample's target changes and its history is one shorter.
  With ``changed_user_share`` < 1 (default 1: every user), only that share of the other
  users, drawn after the held-back ones by the same generator, is shortened; the rest are
  yesterday exactly as today (the users who did nothing today: their samples are
  unchanged, which is what a score cache reuses).
  A user with a single training item (empty history) has no training item yesterday: no
  sample (counted in ``counts.dropped_users``, as the importers count users without a
  training item); its valid/test rows, if any, stay as cold rows.
* valid/test rows of the kept users lose that same item from their history (a valid
  history is the training sequence, a test history the training then the valid items);
  their targets are unchanged. Users without a sample today (cold rows) are unchanged.

What stays the same: ``items.parquet`` is copied byte for byte (same item ids, titles,
categories: the two folders are comparable), user ids are the same strings, and samples
keep today's user order; ``sample_id`` is again dense 0..m-1 (the id of a row, not of a
user: match days by ``user_id``, or by content with :mod:`engine.samplekey`). Between the
two folders, then: a shortened user's sample changed (new target, longer history today), a
held-back user's sample and a single-item user's sample are new today, and with the default
``changed_user_share=1`` nothing is unchanged (every user gained one item); a real day
changes only the users who interacted, which ``changed_user_share`` < 1 simulates.

meta.json records the rule, the share, the seed, the number of held-back users and today's
folder (path, source format, counts). Deterministic: the same input, share and seed give
identical files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from engine.data.schema import (
    DEFAULT_ROWS_PER_FILE,
    ITEMS_FILE,
    SAMPLES_SCHEMA,
    SPLITS,
    PreparedWriter,
    check_samples,
    read_items,
    read_meta,
    read_parquet_checked,
    read_split,
    sample_files,
)
from engine.data.segments import gather_lists
from engine.errors import DataError

__all__ = ["RULE", "simulate_yesterday"]

RULE = ("yesterday = every user's training sequence without its last item (samples: target = the old last "
        "history item, history one shorter; valid/test histories lose that item), minus a seeded share of the "
        "users with a sample (held back: absent yesterday, new today); with changed_user_share < 1 only that "
        "share of the other users is shortened, the rest are unchanged; same catalogue and user ids")


def _list_parts(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list<int32> column, offsets relative to ``values``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros(0, np.int32), np.zeros(1, np.int64)
    off = np.asarray(arr.offsets, dtype=np.int64)
    vals = arr.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
    return np.asarray(vals, dtype=np.int32), off - off[0]


def _drop_one(values: np.ndarray, offsets: np.ndarray, drop_at: np.ndarray) -> pa.ListArray:
    """Row i without its element at position ``drop_at[i]`` (-1: row kept whole)."""
    n = len(offsets) - 1
    lens = np.diff(offsets)
    keep = np.ones(values.size, bool)
    sel = drop_at >= 0
    keep[offsets[:-1][sel] + drop_at[sel]] = False
    new_lens = lens - sel.astype(np.int64)
    new_off = np.zeros(n + 1, np.int64)
    np.cumsum(new_lens, out=new_off[1:])
    return pa.ListArray.from_arrays(pa.array(new_off.astype(np.int32)), pa.array(values[keep], pa.int32()))


def simulate_yesterday(src: Path, tmp: Path, *, new_user_share: float, seed: int, changed_user_share: float = 1.0,
                       rows_per_file: int = 0, header: dict | None = None) -> dict:
    """Write yesterday's folder of the prepared folder ``src`` into ``tmp`` (see the module
    docstring); returns its meta.json content.

    Raises:
        DataError: ``src`` is not a consistent prepared folder (unreadable files, a user with
            two samples, a valid/test history that does not continue the user's training
            sequence), or yesterday would have no sample.
    """
    src = Path(src)
    src_meta = read_meta(src)
    items = read_items(src)
    n = check_samples(src, n_items=items.num_rows)
    files = sample_files(src)
    # pass 1: users and training lengths in sample_id order, the held-back draw
    users_l, ntrain_l, ids_l, tg_l = [], [], [], []
    for f in files:
        t = read_parquet_checked(f, SAMPLES_SCHEMA)
        ids_l.append(t.column("sample_id").to_numpy())
        tg_l.append(t.column("target").to_numpy())
        users_l.append(t.column("user_id").to_numpy(zero_copy_only=False).astype(object))
        ntrain_l.append(pc.list_value_length(t.column("history")).to_numpy(zero_copy_only=False).astype(np.int64) + 1)
    ids = np.concatenate(ids_l)
    order = np.argsort(ids, kind="stable")
    users = np.concatenate(users_l)[order]
    ntrain = np.concatenate(ntrain_l)[order]
    targets = np.concatenate(tg_l)[order]
    index = pd.Index(users)
    if not index.is_unique:
        dup = users[index.duplicated()][0]
        raise DataError("user has two samples; a prepared folder has one sample per user",
                        path=src / "samples", field="user_id", value=dup)
    rng = np.random.default_rng(seed)
    k = int(round(new_user_share * n))
    held = np.zeros(n, bool)
    if k:
        held[rng.choice(n, size=k, replace=False)] = True
    changed = ~held
    if changed_user_share < 1:  # the users who did not interact today stay as they are
        rest = np.flatnonzero(~held)
        changed = np.zeros(n, bool)
        changed[rest[np.sort(rng.choice(rest.size, size=int(round(changed_user_share * rest.size)),
                                        replace=False))]] = True

    writer = PreparedWriter(tmp, rows_per_file=rows_per_file or int(min(DEFAULT_ROWS_PER_FILE, max(256, -(-n // 8)))))
    shutil.copyfile(src / ITEMS_FILE, tmp / ITEMS_FILE)
    # pass 2: samples, in today's sample_id order (files hold consecutive ids in the importers' output)
    counts: dict = {"dropped_users": 0, "held_back_users": k, "changed_users": int(changed.sum()),
                    "unchanged_users": int((~held & ~changed).sum()),
                    "interactions": {"train": 0, "valid": 0, "test": 0}}
    file_min = [int(a.min()) if a.size else 0 for a in ids_l]
    for fi in np.argsort(file_min, kind="stable"):
        t = read_parquet_checked(files[fi], SAMPLES_SCHEMA).sort_by("sample_id")
        sid = t.column("sample_id").to_numpy()
        vals, off = _list_parts(t.column("history"))
        lens = np.diff(off)
        short = changed[sid]
        keep = ~held[sid] & ~(short & (lens == 0))
        counts["dropped_users"] += int((short & (lens == 0)).sum())
        if keep.any():
            kept_off, kept_len, kept_short = off[:-1][keep], lens[keep], short[keep]
            # shortened: history minus its last item, target = that item; unchanged: as today
            hist = gather_lists(vals, kept_off, kept_len - kept_short)
            y_target = np.where(kept_short, vals[np.maximum(kept_off + kept_len - 1, 0)] if vals.size else 0,
                                t.column("target").to_numpy()[keep])
            writer.add_samples(t.column("user_id").to_numpy(zero_copy_only=False)[keep], hist, y_target)
            counts["interactions"]["train"] += int((kept_len + ~kept_short).sum())
    # valid / test: held-back users removed, the kept users' last training item removed
    cold = {}
    for split in SPLITS:
        s = read_split(src, split)
        su = s.column("user_id").to_numpy(zero_copy_only=False).astype(object)
        pos = index.get_indexer(su)
        has = pos >= 0
        p0 = np.maximum(pos, 0)
        row_keep = ~(has & held[p0])
        vals, off = _list_parts(s.column("history"))
        lens = np.diff(off)
        drop_at = np.where(has & row_keep & changed[p0], ntrain[p0] - 1, -1)
        check = np.flatnonzero(drop_at >= 0)
        bad = drop_at[check] >= lens[check]
        ok = check[~bad]
        bad_rows = list(check[bad]) + list(ok[vals[off[:-1][ok] + drop_at[ok]] != targets[pos[ok]]])
        if bad_rows:
            raise DataError(f"the {split} history of this user does not continue its training sequence (history "
                            "then target), as the importers write it; simulate-yesterday cannot shorten it",
                            path=src / f"{split}.parquet", field="history", value=su[min(bad_rows)])
        rows = pa.array(np.flatnonzero(row_keep))
        tg = s.column("targets").combine_chunks().take(rows)
        writer.append_split(split, su[row_keep], _drop_one(vals, off, drop_at).take(rows), tg)
        counts["interactions"][split] = int(pc.sum(pc.list_value_length(tg)).as_py() or 0)
        # cold yesterday: no sample today, or a single training item (gone yesterday)
        cold[split] = int((row_keep & (~has | ((drop_at >= 0) & (ntrain[p0] == 1)))).sum())
    counts.update({
        "samples": 0,  # set by close
        "valid": writer.split_rows["valid"],
        "test": writer.split_rows["test"],
        "cold_valid": cold["valid"],
        "cold_test": cold["test"],
        "items": items.num_rows,
        "placeholder_titles": int(src_meta.get("counts", {}).get("placeholder_titles", 0)),
        "users_today": n,
    })
    meta = dict(header or {})
    meta.update({
        "counts": counts,
        "seed": seed,
        "simulation": {"kind": "yesterday", "rule": RULE, "new_user_share": new_user_share,
                       "changed_user_share": changed_user_share, "seed": seed,
                       "held_back_users": k, "today": {"path": str(src.resolve()),
                                                       "source_format": src_meta.get("source_format"),
                                                       "counts": src_meta.get("counts")}},
    })
    writer.close(meta)  # DataError when no sample is left
    return json.loads((tmp / "meta.json").read_text())
