"""The `dealrec` command line: dispatches subcommands to the job modules.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from engine.errors import DealrecError

SUBCOMMANDS = {
    "prepare": ("jobs.prepare", "convert raw data (DEALRec release, RecBole, Amazon JSON, synthetic) to canonical Parquet"),
    "prune": ("jobs.prune", "score every sample (influence + effort) and select the few-shot subset"),
    "finetune": ("jobs.finetune", "fine-tune the LoRA LLM on a selected subset (Ray Train + DeepSpeed)"),
    "evaluate": ("jobs.evaluate", "generate, ground to items and compute Recall/NDCG@K"),
    "tune": ("jobs.tune", "Ray Tune over lambda and K on cached scores"),
    "train-surrogate": ("jobs.surrogate_train", "train the surrogate recommender alone (on the driver or Ray Train)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dealrec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _job_parser(name: str) -> tuple[argparse.ArgumentParser, object]:
    """The parser of one subcommand; only that job's module is imported (a broken or
    heavy job never breaks another subcommand)."""
    module, help_text = SUBCOMMANDS[name]
    mod = importlib.import_module(module)
    p = argparse.ArgumentParser(prog=f"dealrec {name}", description=(mod.__doc__ or help_text).strip().splitlines()[0])
    mod.add_arguments(p)
    return p, mod


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv)  # prints usage / the error and exits
        return 2
    name = argv[0]
    parser, mod = _job_parser(name)
    args = parser.parse_args(argv[1:])
    try:
        return int(mod.run(args) or 0)
    except DealrecError as e:
        print(f"dealrec {name}: error: {e}", file=sys.stderr)
        return 2


def run_script(add_arguments, run, doc: str | None, argv: list[str] | None = None) -> int:
    """``python jobs/<name>.py ...``: the job's parser and run, errors printed as one message (exit 2)."""
    prog = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(run(args) or 0)
    except DealrecError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
