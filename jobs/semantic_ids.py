"""Build the TIGER semantic IDs of a prepared data set (:mod:`engine.semantic_ids`).

Runs on the driver (no Ray): MiniLM embeddings of every item's title (+ category), residual
k-means into ``--levels`` x ``--codes`` codes, plus a de-duplication token. Writes
``semantic_ids.parquet`` (item_id, codes) and ``semantic_ids.json`` (config, codebook
utilisation per level, collisions) into ``--out``; ``--backend tiger`` reads that folder.

Commands::

    dealrec prepare --format dealrec-release --input ../shared/data/games --out data/games
    dealrec semantic-ids --data data/games --out data/games/semantic_ids            # TIGER's 3 x 256
    # tiny local variant (seconds)
    dealrec prepare --format synthetic --users 200 --items 50 --out /tmp/dealrec-tiny
    dealrec semantic-ids --data /tmp/dealrec-tiny --out /tmp/dealrec-tiny/sid --levels 2 --codes 8
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # make `engine` / `jobs` importable when run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses

from engine.semantic_ids import SemanticIdConfig

_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(SemanticIdConfig)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dealrec semantic-ids`` options (help texts from :class:`SemanticIdConfig`)."""
    parser.add_argument("--data", required=True, help="prepared data folder (items.parquet)")
    parser.add_argument("--out", required=True, help="output folder (semantic_ids.parquet + semantic_ids.json)")
    parser.add_argument("--levels", type=int, default=3, help=_HELP["levels"])
    parser.add_argument("--codes", type=int, default=256, help=_HELP["codes"])
    parser.add_argument("--no-category", action="store_true", help="embed the title only")
    parser.add_argument("--encoder", default=None, help=_HELP["encoder"])
    parser.add_argument("--n-init", type=int, default=3, help=_HELP["n_init"])
    parser.add_argument("--max-iter", type=int, default=100, help=_HELP["max_iter"])
    parser.add_argument("--seed", type=int, default=0, help=_HELP["seed"])


def config_from_args(args: argparse.Namespace) -> SemanticIdConfig:
    kw = dict(levels=args.levels, codes=args.codes, use_category=not args.no_category, n_init=args.n_init,
              max_iter=args.max_iter, seed=args.seed)
    if args.encoder:
        kw["encoder"] = args.encoder
    return SemanticIdConfig(**kw)


def format_report(rep: dict, out) -> str:
    lines = [f"semantic ids: {rep['n_items']:,} items -> {out} in {rep['seconds']:.1f}s "
             f"(level sizes {rep['level_sizes']}, category {'used' if rep['used_category'] else 'not used'})"]
    for u in rep["utilisation"]:
        lines.append(f"  level {u['level']}: {u['used']}/{u['size']} codes used ({100 * u['utilisation']:.1f}%), "
                     f"perplexity {u['perplexity']:.1f}, max {u['max_items_per_code']} items per code")
    c = rep["collisions"]
    lines.append(f"  collisions: {c['colliding_items']:,} items in {c['colliding_groups']:,} groups share their "
                 f"content codes (largest {c['max_group']}); all {rep['unique_tuples']:,} tuples unique after "
                 f"the de-duplication token")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Validate, check the output before any work, build, write, print the report."""
    from engine.rundir import check_writable
    from engine.semantic_ids import build_for_data, write_semantic_ids

    cfg = config_from_args(args)
    check_writable(args.out, option="--out")
    sids = build_for_data(args.data, cfg)
    write_semantic_ids(args.out, sids)
    print(format_report(sids.report, args.out))
    return 0


if __name__ == "__main__":
    from jobs.cli import run_script

    sys.exit(run_script(add_arguments, run, __doc__))
