"""What the ``recbole`` and ``amazon`` importers share: an interaction table (user, item, rating,
timestamp) cut at ``--until``, filtered by rating, split by time and indexed into a prepared folder
(:func:`from_interactions`), under the options of :class:`InteractionRules`.

Days from real data (``--until``, recbole and amazon only): interactions after the cut-off
are dropped before anything else (rating filter, split, id indexing), so the folder is the
data set as of that date. ``--until YYYY-MM-DD`` keeps every interaction up to the end of
that day, UTC (``timestamp < `` the next midnight, in unix seconds); ``--until T`` (a
number) keeps ``timestamp <= T``, compared with the file's timestamps as they are (unix
seconds for MovieLens and Amazon). The catalogue (item ids, titles) is that of the whole
input after the rating filter, not only of the items seen by the cut-off: two cut-offs of
one input (and the input prepared without ``--until``) then share item ids, so their
samples are comparable (:mod:`engine.samplekey`); items with no interaction by the cut-off
are counted in ``counts.items_unseen_until``. meta.json records ``until`` (the value, the
rule applied, the last kept timestamp) and ``counts.interactions_after_until``. A cut-off
before every interaction, a malformed value, or ``--until`` with a format without
timestamps is a :class:`engine.errors.ConfigError` naming ``until`` and the value.

Splitting (recbole, amazon) follows the paper: interactions with a rating below
``min_rating`` (default 4; 0 keeps all) are dropped, all remaining interactions are
sorted by timestamp (ties keep file order; the sort is stable) and cut by position into
the first 80% (train), next 10% (valid), last 10% (test) — a *global* temporal split,
so most users have no valid/test items and users who only appear late have no
training item. ``split="user"`` instead cuts every user's own time-ordered sequence
(RecBole's grouped ratio split): train = the first ``n - floor(0.1 n) - floor(0.1 n)``.
MovieLens-100K (943 users) under this protocol gives 753 samples: 942 users keep a
rating >= 4, and 189 of them only rate in the last 20% of the timeline (751 samples
with ``min_rating=0``). All 943 users get a sample only with ``split="user",
min_rating=0`` (942 with the rating filter); see tests/unit/test_data_realdata.py.
Item ids are re-indexed 0-based in sorted raw-id order (numerically when every raw id
is an integer, else lexicographically), over the items that occur in the kept
interactions; users are ordered the same way. Sorted raw ids make the ids independent
of the split and of the rating threshold's effect on time order.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.data.importers.common import auto_rows_per_file, fill_titles, finish
from engine.data.segments import write_user_segments
from engine.data.writer import PreparedWriter
from engine.errors import ConfigError, DataError

__all__ = ["InteractionRules", "from_interactions", "raw_order"]


@dataclass(frozen=True)
class InteractionRules:
    """The options of a :class:`engine.data.prepare.PrepareConfig` that shape a folder made from
    interactions (its defaults applied; see there for each)."""

    min_rating: float
    split: str
    split_ratio: tuple[float, float, float]
    rows_per_file: int = 0
    #: the ``--until`` value as given (recorded in meta.json), or None
    until: str | None = None
    #: ``engine.data.prepare.parse_until(until)``, (bound, inclusive, the rule in words); None: no cut
    until_cut: tuple[float, bool, str] | None = None


def _fmt_time(t: float) -> str:
    """A timestamp for messages: the number and, where it is plausible unix seconds, the UTC time."""
    try:
        if 0 <= t < 4e9:
            when = _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"{t:.0f} ({when})"
    except (OverflowError, OSError, ValueError):
        pass
    return f"{t:g}"


def raw_order(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique raw ids in sorted order (numeric when all are integers) and each row's 0-based code."""
    uniq, codes = np.unique(raw.astype(str), return_inverse=True)
    try:
        as_int = np.array([int(x) for x in uniq], dtype=np.int64)
    except ValueError:
        return uniq, codes
    order = np.argsort(as_int, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return uniq[order], rank[codes]


def from_interactions(
    tmp: Path,
    *,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray | None,
    times: np.ndarray,
    titles: dict[str, str],
    categories: dict[str, str | None] | None,
    source: Path,
    rules: InteractionRules,
    header: dict,
    extra: dict | None = None,
) -> dict:
    """Cut at --until, filter by rating, split by time (global or per user), index ids and write the folder."""
    n_raw = len(users)
    in_time = np.ones(n_raw, bool)
    until = None
    if rules.until_cut is not None:
        bound, inclusive, rule = rules.until_cut
        in_time = times <= bound if inclusive else times < bound
        if not in_time.any():
            raise ConfigError([f"until={rules.until!r}: before every interaction of {str(source)!r} (the first is at "
                               f"{_fmt_time(float(times.min()))}; keeping {rule}); nothing would be prepared, "
                               "choose a later cut-off"], config="PrepareConfig")
        until = {"value": rules.until, "rule": rule, "bound": bound, "inclusive": inclusive,
                 "catalogue": "items of the whole input after the rating filter (cut-offs of one input share ids)"}
    n_users_raw = len(np.unique(users[in_time].astype(str))) if n_raw else 0
    rated = np.ones(n_raw, bool) if ratings is None or rules.min_rating <= 0 else ratings >= rules.min_rating
    if not rated.any():
        raise DataError(f"no interactions left after dropping ratings below {rules.min_rating} "
                        f"({n_raw} read); lower --min-rating", path=source, field="rating")
    # The catalogue: every rated item of the input, whatever the cut-off (see the module docstring).
    item_raw, item_code = raw_order(items[rated])
    keep = in_time[rated]
    users, item_code, times = users[rated][keep], item_code[keep], times[rated][keep]
    if len(users) == 0:
        raise ConfigError([f"until={rules.until!r}: no interaction rated >= {rules.min_rating} of {str(source)!r} "
                           f"is on or before it ({until['rule']}); choose a later cut-off or lower --min-rating"],
                          config="PrepareConfig")
    if until is not None:
        until["last_kept_timestamp"] = float(times.max())
    order = np.argsort(times, kind="stable")  # ties keep file order
    users, item_code = users[order], item_code[order]
    n = len(users)
    user_raw, user_code = raw_order(users)
    # Group by user, keeping time order inside each user (stable sort on time-sorted rows).
    by_user = np.argsort(user_code, kind="stable")
    pos = np.arange(n, dtype=np.int64)[by_user]  # global time rank of each grouped row
    g_user, g_item = user_code[by_user], item_code[by_user].astype(np.int32)
    n_per_user = np.bincount(g_user, minlength=len(user_raw)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_per_user)[:-1]])
    r_tr, r_va, _ = rules.split_ratio
    if rules.split == "global":
        cut1, cut2 = int(n * r_tr), int(n * (r_tr + r_va))
        label = (pos >= cut1).astype(np.int64) + (pos >= cut2)
        n_tr = np.bincount(g_user, weights=label == 0, minlength=len(user_raw)).astype(np.int64)
        n_va = np.bincount(g_user, weights=label == 1, minlength=len(user_raw)).astype(np.int64)
        n_te = n_per_user - n_tr - n_va
    else:
        r_te = rules.split_ratio[2]
        n_te = np.floor(n_per_user * r_te + 1e-9).astype(np.int64)
        n_va = np.floor(n_per_user * r_va + 1e-9).astype(np.int64)
        n_tr = n_per_user - n_va - n_te
    writer = PreparedWriter(tmp, rows_per_file=rules.rows_per_file or auto_rows_per_file(int((n_tr > 0).sum())))
    counts = write_user_segments(writer, user_raw.astype(object), g_item, starts, n_tr, n_va, n_te)
    counts["users_total"] = len(user_raw)
    counts["users_filtered_out"] = n_users_raw - len(user_raw)
    counts["interactions_read"] = n_raw
    counts["interactions_kept"] = n
    if until is not None:
        counts["interactions_after_until"] = int(n_raw - in_time.sum())
        counts["items_unseen_until"] = int(len(item_raw) - np.unique(item_code).size)
        extra = {**(extra or {}), "until": until}
    title_by_id = {i: titles.get(r) for i, r in enumerate(item_raw) if titles.get(r) is not None}
    title_list, filled = fill_titles(len(item_raw), title_by_id)  # type: ignore[arg-type]
    counts["placeholder_titles"] = filled
    cats = [categories.get(r) for r in item_raw] if categories is not None else None
    return finish(tmp, writer, counts, title_list, cats, header, extra)
