"""Importers: raw recommendation data -> the canonical Parquet folder of :mod:`engine.data.layout`.

``prepare(PrepareConfig(format=..., input=..., out=...))`` reads one of four sources (or a
prepared folder, for a simulated previous day) and
writes ``samples/``, ``items.parquet``, ``valid.parquet``, ``test.parquet`` and ``meta.json``
into ``out`` atomically (a failure leaves nothing at ``out``):

``dealrec-release``
    The layout the DEALRec authors ship (``../shared/data/games``), splits taken as given:
    :mod:`engine.data.importers.release`.
``recbole``
    RecBole atomic files (``*.inter``, ``*.item``): :mod:`engine.data.importers.recbole`.
``amazon``
    Raw Amazon review and metadata JSON lines, optionally gzip-compressed:
    :mod:`engine.data.importers.amazon`.
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

Days from real data (``--until``, recbole and amazon only; :func:`parse_until`) and the
temporal split with its rating filter (``--min-rating``, ``--split``, ``--split-ratio``): see
:mod:`engine.data.importers.interactions`. The catalogue of a cut-off is that of the whole
input, so cut-offs of one input share item ids.

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
belong together. The Games release's own ``"title_{recid}"`` placeholders are kept and
counted (:mod:`engine.data.importers.release`).

Bad input raises :class:`engine.errors.DataError` naming the file, field or line number,
and the value: empty files, missing columns/keys, non-integer tokens, unknown item ids,
duplicate users, unreadable JSON, non-plain pickles (:class:`UnsafePickleError`).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import engine
from engine.data.importers.amazon import import_amazon
from engine.data.importers.common import auto_rows_per_file, placeholder_title
from engine.data.importers.interactions import InteractionRules
from engine.data.importers.recbole import import_recbole
from engine.data.importers.release import import_release
from engine.data.synthetic import generate_synthetic
from engine.data.writer import atomic_dir
from engine.errors import ConfigError, check
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
            meta = import_release(Path(cfg.input), tmp, rows_per_file=cfg.rows_per_file,  # type: ignore[arg-type]
                                  header=_meta_header(cfg))
        elif cfg.format == "recbole":
            meta = import_recbole(Path(cfg.input), tmp, rules=_rules(cfg), header=_meta_header(cfg))  # type: ignore[arg-type]
        elif cfg.format == "amazon":
            meta = import_amazon(Path(cfg.input), cfg.meta, tmp, rules=_rules(cfg),  # type: ignore[arg-type]
                                 header=_meta_header(cfg))
        elif cfg.format == "simulate-yesterday":
            from engine.data.simulate import simulate_yesterday

            meta = simulate_yesterday(Path(cfg.input), tmp, new_user_share=float(cfg.new_user_share),
                                      changed_user_share=float(cfg.changed_user_share), seed=cfg.seed,
                                      rows_per_file=cfg.rows_per_file, header=_meta_header(cfg))
        else:
            preset, users, items, ipu = cfg.synthetic_sizes()
            meta = generate_synthetic(
                tmp, users=users, items=items, interactions_per_user=ipu, seed=cfg.seed, preset=preset,
                split_ratio=cfg.split_ratio, rows_per_file=cfg.rows_per_file or auto_rows_per_file(users),
            )
            meta.update(_meta_header(cfg))
            meta["seed"] = cfg.seed
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return {"out": str(Path(cfg.out).resolve()), "seconds": round(time.perf_counter() - t0, 3), **meta}


def _rules(cfg: PrepareConfig) -> InteractionRules:
    """The options of a recbole/amazon import (defaults applied by ``__post_init__``)."""
    return InteractionRules(
        min_rating=cfg.min_rating, split=cfg.split, split_ratio=cfg.split_ratio,  # type: ignore[arg-type]
        rows_per_file=cfg.rows_per_file, until=cfg.until,
        until_cut=parse_until(cfg.until) if cfg.until is not None else None,
    )


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
