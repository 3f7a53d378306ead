"""The `dealrec` command line: dispatches subcommands to the job modules.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import DealrecError

SUBCOMMANDS = {
    "prepare": ("jobs.prepare", "convert raw data (DEALRec release, RecBole, Amazon JSON, synthetic) to canonical Parquet"),
    "prune": ("jobs.prune", "score every sample (influence + effort) and select the few-shot subset"),
    "finetune": ("jobs.finetune", "fine-tune the LoRA LLM on a selected subset (Ray Train + DeepSpeed)"),
    "evaluate": ("jobs.evaluate", "generate, ground to items and compute Recall/NDCG@K"),
    "tune": ("jobs.tune", "Ray Tune over lambda and K on cached scores"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dealrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # job not built in this checkout
            raise
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except DealrecError as e:
        print(f"dealrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
