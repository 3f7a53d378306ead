"""Convert raw recommendation data to dealrec's canonical Parquet folder (samples, items, valid, test).

Runs on the driver only (no Ray needed); the output is what every other job reads.

Commands::

    # the DEALRec release layout (Amazon Video Games as the authors prepared it)
    dealrec prepare --format dealrec-release --input ../shared/data/games --out data/games
    # RecBole atomic files, paper protocol: ratings >= 4, global 8:1:1 temporal split
    dealrec prepare --format recbole --input ../shared/data/movielens-100k --out data/ml100k
    # raw Amazon review + metadata JSON lines (gzip ok)
    dealrec prepare --format amazon --input reviews_Books.json.gz --meta meta_Books.json.gz --out data/books
    # synthetic: tiny demo set (1,500 users, 400 items), or Book scale, seeded
    dealrec prepare --format synthetic --out data/demo
    dealrec prepare --format synthetic --preset book --seed 0 --out data/synth-book

    # two days of real data: the same input as of two cut-offs (same catalogue and user ids)
    dealrec prepare --format recbole --input ../shared/data/movielens-100k --until 1998-03-01 --out data/ml-d0
    dealrec prepare --format recbole --input ../shared/data/movielens-100k --until 1998-03-08 --out data/ml-d1
    # no timestamps (the DEALRec release): a simulated yesterday of a prepared folder, seeded
    dealrec prepare --format simulate-yesterday --input data/games --new-user-share 0.05 --seed 0 --out data/games-d0

    # tiny local variant (seconds)
    python -m jobs.cli prepare --format synthetic --users 200 --items 50 --out /tmp/dealrec-tiny

Exit status 2 with a message naming the file, field and value on bad input; nothing
is left in --out then.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from engine.data.prepare import FORMATS, PRESETS, PrepareConfig, prepare

_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(PrepareConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dealrec prepare`` options (help texts come from :class:`PrepareConfig`)."""
    parser.add_argument("--format", required=True, choices=FORMATS, help=_HELP["format"])
    parser.add_argument("--input", default=None, help=_HELP["input"])
    parser.add_argument("--out", required=True, help=_HELP["out"])
    parser.add_argument("--overwrite", action="store_true", help=_HELP["overwrite"])
    parser.add_argument("--meta", default=None, help=_HELP["meta"])
    # None = not given: a format that ignores an option refuses it instead of recording it
    parser.add_argument("--min-rating", type=float, default=None, help=_HELP["min_rating"])
    parser.add_argument("--split", default=None, choices=("global", "user"), help=_HELP["split"])
    parser.add_argument("--split-ratio", type=float, nargs=3, default=None,
                        metavar=("TRAIN", "VALID", "TEST"), help=_HELP["split_ratio"])
    parser.add_argument("--rows-per-file", type=int, default=0, help=_HELP["rows_per_file"])
    parser.add_argument("--preset", default=None, choices=tuple(PRESETS), help=_HELP["preset"])
    parser.add_argument("--users", type=int, default=None, help=_HELP["users"])
    parser.add_argument("--items", type=int, default=None, help=_HELP["items"])
    parser.add_argument("--interactions-per-user", type=float, default=None, help=_HELP["interactions_per_user"])
    parser.add_argument("--seed", type=int, default=0, help=_HELP["seed"])
    parser.add_argument("--until", default=None, metavar="YYYY-MM-DD|UNIX_TS", help=_HELP["until"])
    parser.add_argument("--new-user-share", type=float, default=None, help=_HELP["new_user_share"])
    parser.add_argument("--changed-user-share", type=float, default=None, help=_HELP["changed_user_share"])


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """Build (and validate) the config from parsed arguments. Raises ConfigError listing every problem."""
    return PrepareConfig(
        format=args.format, input=args.input, out=args.out, overwrite=args.overwrite, meta=args.meta,
        min_rating=args.min_rating, split=args.split, split_ratio=tuple(args.split_ratio) if args.split_ratio else None,
        rows_per_file=args.rows_per_file, preset=args.preset, users=args.users, items=args.items,
        interactions_per_user=args.interactions_per_user, seed=args.seed, until=args.until,
        new_user_share=args.new_user_share, changed_user_share=args.changed_user_share,
    )


def format_summary(summary: dict) -> str:
    """Human-readable lines for a :func:`engine.data.prepare.prepare` summary."""
    c = summary["counts"]
    inter = c.get("interactions", {})
    lines = [
        f"prepared {summary['source_format']} -> {summary['out']} in {summary['seconds']:.1f}s",
        f"  samples {c['samples']:,}   items {c['items']:,}   valid users {c['valid']:,}   test users {c['test']:,}",
        "  interactions  train {:,}  valid {:,}  test {:,}".format(
            inter.get("train", 0), inter.get("valid", 0), inter.get("test", 0)),
        f"  dropped users (no training item) {c.get('dropped_users', 0):,}"
        f"   cold valid/test rows {c.get('cold_valid', 0):,}/{c.get('cold_test', 0):,}",
        f"  placeholder titles {c.get('placeholder_titles', 0):,}",
    ]
    if "interactions_read" in c:
        lines.append(f"  interactions read {c['interactions_read']:,}, kept {c['interactions_kept']:,} "
                     f"(min_rating {summary['config']['min_rating']}); users with none kept "
                     f"{c.get('users_filtered_out', 0):,}")
    if "until" in summary:
        u = summary["until"]
        lines.append(f"  until {u['value']}: kept {u['rule']}; dropped {c.get('interactions_after_until', 0):,} later "
                     f"interactions; catalogue items not seen yet {c.get('items_unseen_until', 0):,}")
    if "simulation" in summary:
        sim = summary["simulation"]
        lines.append(f"  simulated yesterday of {sim['today']['path']}: {sim['held_back_users']:,} users held back "
                     f"(share {sim['new_user_share']}); last training item removed for "
                     f"{c.get('changed_users', 0):,} users, {c.get('unchanged_users', 0):,} unchanged")
    if summary.get("seed") is not None:
        lines.append(f"  seed {summary['seed']}")
    return "\n".join(lines)


def empty_split_warnings(summary: dict) -> list[str]:
    """A warning per split with no user (a dataset whose valid or test period holds nobody)."""
    c = summary["counts"]
    why = {"valid": "prune's surrogate trains without early stopping and finetune/tune have nothing to validate on",
           "test": "`dealrec evaluate --split test` has no user to evaluate"}
    return [f"WARNING: the {s} split of {summary['out']} has no user: {why[s]}" for s in ("valid", "test")
            if not c.get(s)]


def run(args: argparse.Namespace) -> int:
    """Validate the whole config, import, print the summary. Returns 0 (errors raise DealrecError -> exit 2)."""
    summary = prepare(config_from_args(args))
    print(format_summary(summary))
    for w in empty_split_warnings(summary):
        print(w, file=sys.stderr)
    return 0
