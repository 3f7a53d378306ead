"""Importers: raw recommendation data -> the canonical Parquet folder of :mod:`engine.data.schema`.

``prepare(PrepareConfig(format=..., input=..., out=...))`` reads one of four sources (or a
prepared folder, for a simulated previous day) and
writes ``samples/``, ``items.parquet``, ``valid.parquet``, ``test.parquet`` and ``meta.json``
into ``out`` atomically (a failure leaves nothing at ``out``):

``dealrec-release``
    The layout the DEALRec authors ship (``../shared/data/games``):
    ``sequential_{train,valid,test}.txt`` (``user_seqid item_seqid ...``, ids 1-based, one
    line per user, time order), ``title_maps.npy`` (``seqid2title``: '1'-based str ->
    title) and optionally ``category_map.npy`` (``seqid2category``: lists of str, joined
    with ``" > "``). The ``.npy`` maps are read with the restricted unpickler of
    :mod:`engine.data.safe_pickle`. Item ids become ``seqid - 1``; the catalogue is
    ``0..N-1`` with ``N`` = the largest id of the title map; ``user_id`` is the user's
    seqid as written in the file. The splits are taken as given.
``recbole``
    RecBole atomic files: ``*.inter`` (tab-separated, typed header, fields ``user_id``,
    ``item_id``, ``timestamp`` and optionally ``rating``) and ``*.item`` (``item_id`` and a
    title field: ``movie_title``/``title``/``item_title``/``name``; optional
    ``release_year`` is appended as ``"Title (1995)"`` to tell remakes apart, and a
    ``class``/``genre``/``categories``/``category`` field becomes the category, tokens
    joined with ``", "``). ``--input`` is the folder or the ``.inter`` file.
``amazon``
    Raw Amazon review JSON lines (``reviewerID``, ``asin``, ``overall``,
    ``unixReviewTime``) and metadata JSON lines (``asin``, ``title``, optional
    ``categories`` (2014: list of category paths, the first is used) or ``category``
    (2018: one path)), optionally gzip-compressed; Python-literal lines of the 2014 dumps
    are accepted (read with ``ast.literal_eval``, which runs no code). ``--input`` is the
    reviews file with ``--meta`` the metadata file, or a folder holding one ``meta*`` file
    and one other ``*.json*`` file.
``synthetic``
    The seeded generator of :mod:`engine.data.synthetic` (demo size by default, Book
    scale with ``--preset book``).
``simulate-yesterday``
    A simulated previous day of a prepared folder (``--input PREPARED``), for data without
    timestamps (the DEALRec release): see :mod:`engine.data.simulate`. Every user's training
    sequence loses its last item (that sample's target becomes the old last history item,
    its history one shorter), and a seeded share ``--new-user-share`` (default 0.05) of the
    users with a sample is held back (they appear only today); ``--changed-user-share``
    (default 1) < 1 shortens only that share of the others (the rest are unchanged, like
    users who did nothing today). Same catalogue, same user ids.

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

Samples (docs/method.md#samples): one per user with >= 1 training item; history = the
training items except the last (empty for a single training item), target = the last.
Users with no training item cannot form a sample; they are dropped and counted
(``dropped_users``), never given an invented target. Valid/test rows: history = all
training items (plus the valid items for test), targets = the user's items in that
period; users with none are absent. A user with valid/test items but no training items
keeps a valid/test row with an empty history, counted as ``cold_valid``/``cold_test``.

Missing titles: titles are stripped of surrounding whitespace (342 Games titles start
with a space). An item of the catalogue with no title (absent from the title map or
metadata, or blank) gets the placeholder ``"<item {item_id}>"`` (0-based id) and is
counted in ``placeholder_titles`` in meta.json and the summary. We fill rather than fail
because real metadata dumps routinely miss a few titles and one gap should not block a
run; the count makes the gap visible. An item id *outside* the catalogue (e.g. an id in
``sequential_valid.txt`` beyond the title map) is an error: it means the files do not
belong together. The Games release itself names 19 title-less items ``"title_{recid}"``;
those are kept as given (the authors' prompts used them) and counted in
``release_placeholder_titles``.

Bad input raises :class:`engine.errors.DataError` naming the file, field or line number,
and the value: empty files, missing columns/keys, non-integer tokens, unknown item ids,
duplicate users, unreadable JSON, non-plain pickles (:class:`UnsafePickleError`).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import datetime as _dt
import gzip
import io
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import engine
from engine.data.safe_pickle import load_npy_object
from engine.data.schema import DEFAULT_ROWS_PER_FILE, PreparedWriter, atomic_dir
from engine.data.segments import write_user_segments
from engine.data.synthetic import generate_synthetic
from engine.errors import ConfigError, DataError, check
from engine.rundir import writable_problem

__all__ = ["FORMATS", "PRESETS", "PrepareConfig", "parse_until", "prepare", "placeholder_title"]

FORMATS = ("dealrec-release", "recbole", "amazon", "synthetic", "simulate-yesterday")
SPLIT_MODES = ("global", "user")
#: The formats read from rated, timestamped interactions: they take --min-rating and --split.
RATED_FORMATS = ("recbole", "amazon")
DEFAULT_SPLIT_RATIO = (0.8, 0.1, 0.1)
#: The formats whose input carries timestamps: they take --until.
TIMESTAMPED_FORMATS = RATED_FORMATS
#: Formats that come split (or derive from a split folder): they refuse --split-ratio.
PRESPLIT_FORMATS = ("dealrec-release", "simulate-yesterday")
DEFAULT_NEW_USER_SHARE = 0.05
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_NUMBER_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
#: Synthetic size presets: users, items, mean interactions per user.
PRESETS: dict[str, dict[str, float]] = {
    # Small enough that the whole demo pipeline with a tiny LLM runs in minutes on 2 cores.
    "demo": {"users": 1500, "items": 400, "interactions_per_user": 8.0},
    # Amazon Books as prepared by DEALRec: 88,263 users, 86,272 items, 5,303,707 interactions.
    "book": {"users": 88263, "items": 86272, "interactions_per_user": 5303707 / 88263},
}


def parse_until(value: object) -> tuple[float, bool, str]:
    """A ``--until`` value -> (bound, inclusive, the rule in words).

    ``YYYY-MM-DD``: the end of that day, UTC: keep ``timestamp < bound`` (bound = the next
    midnight in unix seconds). A number (unix timestamp, int/float or its text): keep
    ``timestamp <= bound``.

    Raises:
        ValueError: neither form (the message says why, without the field name).
    """
    if isinstance(value, bool):
        raise ValueError("expected a date YYYY-MM-DD or a unix timestamp, not a boolean")
    if isinstance(value, (int, float)):
        v = float(value)
    else:
        text = str(value).strip()
        if _DATE_RE.fullmatch(text):
            try:
                day = _dt.date.fromisoformat(text)
            except ValueError as e:
                raise ValueError(f"not a valid date ({e})") from None
            end = _dt.datetime.combine(day + _dt.timedelta(days=1), _dt.time(), tzinfo=_dt.timezone.utc)
            bound = end.timestamp()
            return bound, False, (f"timestamp < {bound:.0f} (the end of {text} UTC, "
                                  f"{end.strftime('%Y-%m-%dT%H:%M:%SZ')})")
        if not _NUMBER_RE.fullmatch(text):
            raise ValueError("expected a date YYYY-MM-DD (the end of that day, UTC) or a unix timestamp in seconds")
        v = float(text)
    if not math.isfinite(v):
        raise ValueError("the timestamp must be a finite number")
    return v, True, f"timestamp <= {v:g}"


def _fmt_time(t: float) -> str:
    """A timestamp for messages: the number and, where it is plausible unix seconds, the UTC time."""
    try:
        if 0 <= t < 4e9:
            when = _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            return f"{t:.0f} ({when})"
    except (OverflowError, OSError, ValueError):
        pass
    return f"{t:g}"


def placeholder_title(item_id: int) -> str:
    """The title given to a catalogue item that has none (see the module docstring)."""
    return f"<item {item_id}>"


@dataclass
class PrepareConfig:
    """What to import and where to write it. Every problem is reported at once (ConfigError)."""

    format: str = field(metadata={"help": f"input format, one of {FORMATS}"})
    out: str = field(metadata={"help": "output folder (written atomically)"})
    input: str | None = field(
        default=None,
        metadata={"help": "input folder or file (not used by synthetic): the release folder, the RecBole "
                          "folder or .inter file, the Amazon reviews file or a folder with reviews + meta"},
    )
    meta: str | None = field(
        default=None, metadata={"help": "amazon: metadata JSON lines file (asin, title, categories)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty output folder"})
    min_rating: float | None = field(
        default=None,
        metadata={"help": "recbole/amazon: drop interactions rated below this (default and paper: 4); 0 keeps "
                          "all. Ignored where the input has no ratings"},
    )
    split: str | None = field(
        default=None,
        metadata={"help": "recbole/amazon: 'global' (default) = 8:1:1 by global timestamp (paper); "
                          "'user' = 8:1:1 of each user's own sequence (RecBole grouped split)"},
    )
    split_ratio: tuple[float, float, float] | None = field(
        default=None,
        metadata={"help": "recbole/amazon/synthetic: train/valid/test fractions, summing to 1, each > 0 "
                          f"(default {DEFAULT_SPLIT_RATIO}); the dealrec-release layout has its own split"},
    )
    rows_per_file: int = field(
        default=0, metadata={"help": "samples per Parquet part file; 0 = about 1/8 of the samples, 256..8192"}
    )
    preset: str | None = field(
        default=None, metadata={"help": f"synthetic: size preset, one of {tuple(PRESETS)} (default demo)"}
    )
    users: int | None = field(default=None, metadata={"help": "synthetic: number of users (overrides the preset)"})
    items: int | None = field(default=None, metadata={"help": "synthetic: number of items (overrides the preset)"})
    interactions_per_user: float | None = field(
        default=None, metadata={"help": "synthetic: mean interactions per user (overrides the preset)"}
    )
    seed: int = field(default=0, metadata={"help": "synthetic, simulate-yesterday: random seed; the same seed gives "
                                                   "identical files"})
    until: str | None = field(
        default=None,
        metadata={"help": "recbole/amazon: prepare the data as of this cut-off: a date YYYY-MM-DD (keeps "
                          "interactions up to the end of that day, UTC) or a unix timestamp (keeps timestamp <= "
                          "it); later interactions are dropped before filtering and splitting, the catalogue "
                          "stays that of the whole input"},
    )
    new_user_share: float | None = field(
        default=None,
        metadata={"help": "simulate-yesterday: share of the users with a sample held back (absent yesterday, "
                          f"new today), chosen with --seed (default {DEFAULT_NEW_USER_SHARE})"},
    )
    changed_user_share: float | None = field(
        default=None,
        metadata={"help": "simulate-yesterday: share of the other users whose last training item is removed "
                          "(default 1: every user; below 1 the rest stay unchanged, as users idle today)"},
    )

    def __post_init__(self) -> None:
        if self.split_ratio is not None:
            self.split_ratio = tuple(float(r) for r in self.split_ratio)  # type: ignore[assignment]
        self.validate()
        # The defaults of the options this format uses; None stays None where a format ignores one
        # (an option given to a format that ignores it was refused above, not silently recorded).
        if self.format not in PRESPLIT_FORMATS and self.split_ratio is None:
            self.split_ratio = DEFAULT_SPLIT_RATIO
        if self.format == "simulate-yesterday":
            self.new_user_share = DEFAULT_NEW_USER_SHARE if self.new_user_share is None else self.new_user_share
            self.changed_user_share = 1.0 if self.changed_user_share is None else self.changed_user_share
        if self.format in RATED_FORMATS:
            self.split = self.split or "global"
            self.min_rating = 4.0 if self.min_rating is None else self.min_rating

    def validate(self) -> None:
        """Check every field; raise one ConfigError listing all problems."""
        p: list[str] = []
        check(p, self.format in FORMATS, f"format={self.format!r}: expected one of {FORMATS}")
        synthetic = self.format == "synthetic"
        if synthetic:
            check(p, self.input is None, f"input={self.input!r}: the synthetic format reads no input; drop --input")
        else:
            if not self.input:
                p.append(f"input is required for format {self.format!r}: pass --input PATH")
            elif not Path(self.input).exists():
                p.append(f"input={self.input!r}: no such file or folder")
            if self.preset is not None or self.users is not None or self.items is not None \
                    or self.interactions_per_user is not None:
                p.append("--preset/--users/--items/--interactions-per-user only apply to --format synthetic")
        if self.meta is not None:
            check(p, self.format == "amazon", f"meta={self.meta!r}: --meta only applies to --format amazon")
            check(p, Path(self.meta).is_file(), f"meta={self.meta!r}: no such file")
        if not self.out:
            p.append("out is required: pass --out DIR")
        else:
            out = Path(self.out)
            if out.is_dir() and any(out.iterdir()) and not self.overwrite:
                p.append(f"out={self.out!r} exists and is not empty; pass --overwrite to replace it")
            else:  # read-only, inside a regular file, a mount point to replace: found before any work
                why = writable_problem(out, option="--out", replace=out.exists())
                if why:
                    p.append(why)
            if self.input and Path(self.input).exists() and out.resolve() == Path(self.input).resolve():
                p.append(f"out={self.out!r} is the input folder; choose another folder")
        if self.format in FORMATS and self.format not in RATED_FORMATS:
            for name, flag in (("min_rating", "--min-rating"), ("split", "--split")):
                check(p, getattr(self, name) is None,
                      f"{name}={getattr(self, name)!r}: {flag} only applies to --format recbole or amazon; drop it")
        check(p, self.format != "dealrec-release" or self.split_ratio is None,
              f"split_ratio={self.split_ratio!r}: the dealrec-release layout comes split (sequential_valid.txt, "
              "sequential_test.txt) and is taken as given; drop --split-ratio")
        check(p, self.format != "simulate-yesterday" or self.split_ratio is None,
              f"split_ratio={self.split_ratio!r}: simulate-yesterday keeps the split of its --input folder; "
              "drop --split-ratio")
        if self.until is not None:
            if self.format in FORMATS and self.format not in TIMESTAMPED_FORMATS:
                why = {"dealrec-release": "the dealrec-release layout has no timestamps; simulate a previous day "
                                          "with --format simulate-yesterday --input PREPARED",
                       "synthetic": "synthetic data has no timestamps",
                       "simulate-yesterday": "a prepared folder has no timestamps; prepare the raw data with "
                                             "--until instead"}[self.format]
                p.append(f"until={self.until!r}: --until only applies to the timestamped formats "
                         f"{' and '.join(TIMESTAMPED_FORMATS)}; {why}")
            else:
                try:
                    parse_until(self.until)
                except ValueError as e:
                    p.append(f"until={self.until!r}: {e}")
        if self.format == "simulate-yesterday":
            if self.input and Path(self.input).is_dir() and not (Path(self.input) / "meta.json").is_file():
                p.append(f"input={self.input!r}: not a prepared dealrec folder (no meta.json); prepare it first, "
                         "e.g. `dealrec prepare --format dealrec-release --input ../shared/data/games --out DIR`")
            elif self.input and Path(self.input).exists() and not Path(self.input).is_dir():
                p.append(f"input={self.input!r}: simulate-yesterday reads a prepared folder, not a file")
        else:
            for name in ("new_user_share", "changed_user_share"):
                check(p, getattr(self, name) is None, f"{name}={getattr(self, name)!r}: --{name.replace('_', '-')} "
                                                      "only applies to --format simulate-yesterday")
        for name, hi_ok in (("new_user_share", False), ("changed_user_share", True)):
            v = getattr(self, name)
            check(p, v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   and 0 <= v and (v <= 1 if hi_ok else v < 1)),
                  f"{name}={v!r}: must be a number in [0, {'1]' if hi_ok else '1)'}")
        check(p, self.min_rating is None or (math.isfinite(self.min_rating) and self.min_rating >= 0),
              f"min_rating={self.min_rating!r}: must be a number >= 0 (0 keeps every rating)")
        check(p, self.split is None or self.split in SPLIT_MODES,
              f"split={self.split!r}: expected one of {SPLIT_MODES}")
        r = self.split_ratio
        # An empty valid or test split would be prepared without a word and fail (or, worse, mislead)
        # later: the surrogate early-stops and finetune/tune validate on 'valid', evaluate reads 'test'.
        check(p, r is None or (len(r) == 3 and all(math.isfinite(x) and x > 0 for x in r) and abs(sum(r) - 1) < 1e-6),
              f"split_ratio={r!r}: expected three fractions > 0 summing to 1 (train, valid, test; e.g. "
              "0.8 0.1 0.1): prune's surrogate early-stops and finetune/tune validate on the valid split, "
              "evaluate reads the test split, so neither may be empty")
        check(p, self.rows_per_file >= 0, f"rows_per_file={self.rows_per_file!r}: must be >= 0 (0 = auto)")
        check(p, self.preset is None or self.preset in PRESETS,
              f"preset={self.preset!r}: expected one of {tuple(PRESETS)}")
        check(p, self.users is None or self.users >= 1, f"users={self.users!r}: must be >= 1")
        check(p, self.items is None or self.items >= 2, f"items={self.items!r}: must be >= 2")
        check(p, self.interactions_per_user is None or (math.isfinite(self.interactions_per_user)
                                                        and self.interactions_per_user >= 1),
              f"interactions_per_user={self.interactions_per_user!r}: must be >= 1")
        check(p, isinstance(self.seed, int) and self.seed >= 0, f"seed={self.seed!r}: must be an integer >= 0")
        if p:
            raise ConfigError(p, config="PrepareConfig")

    def synthetic_sizes(self) -> tuple[str, int, int, float]:
        """(preset, users, items, interactions_per_user) after applying the preset and overrides."""
        preset = self.preset or "demo"
        base = PRESETS[preset]
        users = self.users if self.users is not None else int(base["users"])
        items = self.items if self.items is not None else int(base["items"])
        ipu = self.interactions_per_user if self.interactions_per_user is not None \
            else float(base["interactions_per_user"])
        return preset, users, items, ipu

    def to_meta(self) -> dict:
        """The config as stored in meta.json (without out/overwrite, which do not shape the content)."""
        d = dataclasses.asdict(self)
        d.pop("out")
        d.pop("overwrite")
        # recorded only where used, so that the meta.json of every other folder stays as it was
        for k in ("until", "new_user_share", "changed_user_share"):
            if d[k] is None:
                d.pop(k)
        d["split_ratio"] = None if self.split_ratio is None else list(self.split_ratio)
        return d


def prepare(cfg: PrepareConfig) -> dict:
    """Import ``cfg.input`` (or generate synthetic data) into the canonical folder ``cfg.out``.

    Args:
        cfg: a validated :class:`PrepareConfig`.

    Returns:
        A summary dict: ``out`` (the folder), ``seconds``, and the content of meta.json
        (``source_format``, ``input``, ``config``, ``counts``, ``seed``, ``dealrec_version``).

    Raises:
        DataError: malformed input (file, field/line and value in the message); nothing
            is left at ``cfg.out``.
        ConfigError: an invalid config (raised by the config itself).
    """
    t0 = time.perf_counter()
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        if cfg.format == "dealrec-release":
            meta = _import_release(cfg, tmp)
        elif cfg.format == "recbole":
            meta = _import_recbole(cfg, tmp)
        elif cfg.format == "amazon":
            meta = _import_amazon(cfg, tmp)
        elif cfg.format == "simulate-yesterday":
            from engine.data.simulate import simulate_yesterday

            meta = simulate_yesterday(Path(cfg.input), tmp, new_user_share=float(cfg.new_user_share),
                                      changed_user_share=float(cfg.changed_user_share), seed=cfg.seed,
                                      rows_per_file=cfg.rows_per_file, header=_meta_header(cfg))
        else:
            preset, users, items, ipu = cfg.synthetic_sizes()
            meta = generate_synthetic(
                tmp, users=users, items=items, interactions_per_user=ipu, seed=cfg.seed, preset=preset,
                split_ratio=cfg.split_ratio, rows_per_file=cfg.rows_per_file or _auto_rows_per_file(users),
            )
            meta.update(_meta_header(cfg))
            meta["seed"] = cfg.seed
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return {"out": str(Path(cfg.out).resolve()), "seconds": round(time.perf_counter() - t0, 3), **meta}


# ----------------------------------------------------------------------------- shared pieces


def _auto_rows_per_file(n: int) -> int:
    # Several part files even for small sets, so Ray Data reads several blocks.
    return int(min(DEFAULT_ROWS_PER_FILE, max(256, math.ceil(n / 8))))


def _meta_header(cfg: PrepareConfig) -> dict:
    return {
        "source_format": cfg.format,
        "input": str(Path(cfg.input).resolve()) if cfg.input else None,
        "config": cfg.to_meta(),
        "seed": None,
        "dealrec_version": engine.__version__,
        "policies": {
            "missing_title": "placeholder '<item {item_id}>' (0-based id), counted in counts.placeholder_titles",
            "empty_training_sequence": "user dropped (no sample), counted in counts.dropped_users",
        },
    }


def _fill_titles(n_items: int, titles: dict[int, str]) -> tuple[list[str], int]:
    out, filled = [], 0
    for i in range(n_items):
        t = titles.get(i)
        t = t.strip() if isinstance(t, str) else ""
        if not t:
            t, filled = placeholder_title(i), filled + 1
        out.append(t)
    return out, filled


def _finish(cfg: PrepareConfig, tmp: Path, writer: PreparedWriter, counts: dict, titles: list[str],
            categories: list[str | None] | None, extra: dict | None = None) -> dict:
    writer.write_items(np.arange(len(titles), dtype=np.int32), titles, categories)
    meta = _meta_header(cfg)
    counts["items"] = len(titles)
    meta["counts"] = counts
    if extra:
        meta.update(extra)
    writer.close(meta)  # raises DataError when no user has a training item
    return json.loads((tmp / "meta.json").read_text())


# ----------------------------------------------------------------------------- dealrec-release


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


def _import_release(cfg: PrepareConfig, tmp: Path) -> dict:
    root = Path(cfg.input)  # type: ignore[arg-type]
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
    writer = PreparedWriter(tmp, rows_per_file=cfg.rows_per_file or _auto_rows_per_file(int((n_tr > 0).sum())))
    counts = write_user_segments(writer, np.array(users, dtype=object), flat, starts, n_tr, n_va, n_te)
    counts["users_total"] = len(users)
    titles, filled = _fill_titles(n_items, titles_raw)  # type: ignore[arg-type]
    counts["placeholder_titles"] = filled
    # The authors' preparation names title-less items "title_{recid}" (19 of Games' 17,332). Kept as
    # given, so prompts match theirs, but counted so the gap is visible.
    counts["release_placeholder_titles"] = sum(1 for t in titles if _RELEASE_PLACEHOLDER.match(t))
    return _finish(cfg, tmp, writer, counts, titles, categories)


# ----------------------------------------------------------------------------- interaction tables


def _raw_order(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def _from_interactions(
    cfg: PrepareConfig,
    tmp: Path,
    *,
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray | None,
    times: np.ndarray,
    titles: dict[str, str],
    categories: dict[str, str | None] | None,
    source: Path,
    extra: dict | None = None,
) -> dict:
    """Cut at --until, filter by rating, split by time (global or per user), index ids and write the folder."""
    n_raw = len(users)
    in_time = np.ones(n_raw, bool)
    until = None
    if cfg.until is not None:
        bound, inclusive, rule = parse_until(cfg.until)
        in_time = times <= bound if inclusive else times < bound
        if not in_time.any():
            raise ConfigError([f"until={cfg.until!r}: before every interaction of {str(source)!r} (the first is at "
                               f"{_fmt_time(float(times.min()))}; keeping {rule}); nothing would be prepared, "
                               "choose a later cut-off"], config="PrepareConfig")
        until = {"value": cfg.until, "rule": rule, "bound": bound, "inclusive": inclusive,
                 "catalogue": "items of the whole input after the rating filter (cut-offs of one input share ids)"}
    n_users_raw = len(np.unique(users[in_time].astype(str))) if n_raw else 0
    rated = np.ones(n_raw, bool) if ratings is None or cfg.min_rating <= 0 else ratings >= cfg.min_rating
    if not rated.any():
        raise DataError(f"no interactions left after dropping ratings below {cfg.min_rating} "
                        f"({n_raw} read); lower --min-rating", path=source, field="rating")
    # The catalogue: every rated item of the input, whatever the cut-off (see the module docstring).
    item_raw, item_code = _raw_order(items[rated])
    keep = in_time[rated]
    users, item_code, times = users[rated][keep], item_code[keep], times[rated][keep]
    if len(users) == 0:
        raise ConfigError([f"until={cfg.until!r}: no interaction rated >= {cfg.min_rating} of {str(source)!r} "
                           f"is on or before it ({until['rule']}); choose a later cut-off or lower --min-rating"],
                          config="PrepareConfig")
    if until is not None:
        until["last_kept_timestamp"] = float(times.max())
    order = np.argsort(times, kind="stable")  # ties keep file order
    users, item_code = users[order], item_code[order]
    n = len(users)
    user_raw, user_code = _raw_order(users)
    # Group by user, keeping time order inside each user (stable sort on time-sorted rows).
    by_user = np.argsort(user_code, kind="stable")
    pos = np.arange(n, dtype=np.int64)[by_user]  # global time rank of each grouped row
    g_user, g_item = user_code[by_user], item_code[by_user].astype(np.int32)
    n_per_user = np.bincount(g_user, minlength=len(user_raw)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(n_per_user)[:-1]])
    r_tr, r_va, _ = cfg.split_ratio
    if cfg.split == "global":
        cut1, cut2 = int(n * r_tr), int(n * (r_tr + r_va))
        label = (pos >= cut1).astype(np.int64) + (pos >= cut2)
        n_tr = np.bincount(g_user, weights=label == 0, minlength=len(user_raw)).astype(np.int64)
        n_va = np.bincount(g_user, weights=label == 1, minlength=len(user_raw)).astype(np.int64)
        n_te = n_per_user - n_tr - n_va
    else:
        r_te = cfg.split_ratio[2]
        n_te = np.floor(n_per_user * r_te + 1e-9).astype(np.int64)
        n_va = np.floor(n_per_user * r_va + 1e-9).astype(np.int64)
        n_tr = n_per_user - n_va - n_te
    writer = PreparedWriter(tmp, rows_per_file=cfg.rows_per_file or _auto_rows_per_file(int((n_tr > 0).sum())))
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
    title_list, filled = _fill_titles(len(item_raw), title_by_id)  # type: ignore[arg-type]
    counts["placeholder_titles"] = filled
    cats = [categories.get(r) for r in item_raw] if categories is not None else None
    return _finish(cfg, tmp, writer, counts, title_list, cats, extra)


# ----------------------------------------------------------------------------- recbole


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


def _import_recbole(cfg: PrepareConfig, tmp: Path) -> dict:
    src = Path(cfg.input)  # type: ignore[arg-type]
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
    return _from_interactions(
        cfg, tmp, users=df["user_id"].to_numpy(dtype=object), items=df["item_id"].to_numpy(dtype=object),
        ratings=ratings, times=times, titles=titles, categories=categories, source=inter,
        extra={"files": {"inter": str(inter.resolve()),
                         "item": str(item_path.resolve()) if item_path.is_file() else None}},
    )


# ----------------------------------------------------------------------------- amazon


def _open_text(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _json_lines(path: Path):
    """Yield (line number, dict) for each non-blank line: JSON, or a Python literal (2014 dumps)."""
    try:
        with _open_text(path) as f:
            any_line = False
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                any_line = True
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    try:
                        rec = ast.literal_eval(line.strip())
                    except (ValueError, SyntaxError, MemoryError, RecursionError):
                        raise DataError("line is neither JSON nor a Python literal", path=path,
                                        field=f"line {lineno}", value=line.strip()[:80]) from None
                if not isinstance(rec, dict):
                    raise DataError("each line must be a JSON object", path=path, field=f"line {lineno}",
                                    value=line.strip()[:80])
                yield lineno, rec
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read ({type(e).__name__}: {e})", path=path) from None
    if not any_line:
        raise DataError("empty file: expected one JSON object per line", path=path)


def _amazon_files(cfg: PrepareConfig) -> tuple[Path, Path]:
    src = Path(cfg.input)  # type: ignore[arg-type]
    if src.is_file():
        if cfg.meta is None:
            raise DataError("amazon: pass the metadata file with --meta (or --input a folder holding "
                            "the reviews file and a meta* file)", path=src, field="meta")
        return src, Path(cfg.meta)
    files = sorted(p for p in src.iterdir() if p.is_file() and ".json" in p.name)
    metas = [p for p in files if p.name.startswith("meta")]
    reviews = [p for p in files if not p.name.startswith("meta")]
    meta = [Path(cfg.meta)] if cfg.meta else metas
    if len(reviews) != 1 or len(meta) != 1:
        raise DataError("amazon: the folder must hold exactly one reviews *.json[l][.gz] file and one "
                        f"meta*.json[l][.gz] file; found reviews={[p.name for p in reviews]}, "
                        f"meta={[p.name for p in meta]}", path=src, field="files")
    return reviews[0], meta[0]


def _import_amazon(cfg: PrepareConfig, tmp: Path) -> dict:
    rpath, mpath = _amazon_files(cfg)
    users: list[str] = []
    items: list[str] = []
    ratings: list[float] = []
    times: list[float] = []
    for lineno, rec in _json_lines(rpath):
        for key in ("reviewerID", "asin", "overall", "unixReviewTime"):
            if key not in rec:
                raise DataError("missing key", path=rpath, field=f"{key} (line {lineno})",
                                value=sorted(rec)[:8])
        u, a = rec["reviewerID"], rec["asin"]
        if not isinstance(u, str) or not u or not isinstance(a, str) or not a:
            raise DataError("reviewerID and asin must be non-empty strings", path=rpath,
                            field=f"reviewerID/asin (line {lineno})", value=(u, a))
        try:
            r, t = float(rec["overall"]), float(rec["unixReviewTime"])
            if not (math.isfinite(r) and math.isfinite(t)):
                raise ValueError
        except (TypeError, ValueError):
            raise DataError("overall and unixReviewTime must be numbers", path=rpath,
                            field=f"overall/unixReviewTime (line {lineno})",
                            value=(rec["overall"], rec["unixReviewTime"])) from None
        users.append(u)
        items.append(a)
        ratings.append(r)
        times.append(t)
    titles: dict[str, str] = {}
    categories: dict[str, str | None] = {}
    for lineno, rec in _json_lines(mpath):
        a = rec.get("asin")
        if not isinstance(a, str) or not a:
            raise DataError("missing or empty asin", path=mpath, field=f"asin (line {lineno})", value=a)
        t = rec.get("title")
        if isinstance(t, str) and t.strip():
            titles[a] = t.strip()
        cats = rec.get("categories", rec.get("category"))
        if isinstance(cats, list) and cats and isinstance(cats[0], list):
            cats = cats[0]  # 2014 dumps: a list of category paths; the first is the main one
        if isinstance(cats, list) and all(isinstance(c, str) for c in cats):
            categories[a] = " > ".join(c.strip() for c in cats if c.strip()) or None
    return _from_interactions(
        cfg, tmp, users=np.array(users, dtype=object), items=np.array(items, dtype=object),
        ratings=np.array(ratings), times=np.array(times), titles=titles, categories=categories, source=rpath,
        extra={"files": {"reviews": str(rpath.resolve()), "meta": str(mpath.resolve())}},
    )

