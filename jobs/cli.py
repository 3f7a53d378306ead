"""The `dealrec` command line: dispatches subcommands to the job modules.

Each job module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Every way of
starting a job (``dealrec <name>``, ``python jobs/<name>.py``, ``jobs.prune.main``) runs it
through :func:`run_job`, the one place where user-facing errors are printed: a
:class:`~engine.errors.DealrecError` (also one raised inside a Ray task and re-raised
wrapped) and an ``OSError`` that escaped every job's own checks become one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from engine.errors import DealrecError, os_reason

SUBCOMMANDS = {
    "prepare": ("jobs.prepare", "convert raw data (DEALRec release, RecBole, Amazon JSON, synthetic) to canonical Parquet"),
    "prune": ("jobs.prune", "score every sample (influence + effort) and select the few-shot subset"),
    "finetune": ("jobs.finetune", "fine-tune the LoRA LLM on a selected subset (Ray Train + DeepSpeed)"),
    "evaluate": ("jobs.evaluate", "rank the valid/test users through an LLM backend (--backend) and compute Recall/NDCG@K"),
    "tune": ("jobs.tune", "Ray Tune over lambda and K on cached scores"),
    "train-surrogate": ("jobs.surrogate_train", "train the surrogate recommender alone (on the driver or Ray Train)"),
    "semantic-ids": ("jobs.semantic_ids", "TIGER semantic IDs of the items (MiniLM embeddings, residual k-means)"),
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
    return run_job(f"dealrec {name}", mod.run, args)


def user_error(exc: BaseException) -> DealrecError | None:
    """The :class:`DealrecError` to show the user for ``exc``, or None (a bug: let it raise).

    A DealrecError itself; one that Ray re-raised wrapped (``RayTaskError`` and Ray Train's
    errors keep it as ``cause`` / ``__cause__``); an ``OSError`` naming a file (read-only,
    no space, not a folder, permission denied), as a DealrecError naming that file: the
    jobs check their paths before any work, so this is the safety net, not the rule.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DealrecError):
            return e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
    if isinstance(exc, OSError) and exc.filename is not None:
        return DealrecError(f"cannot use {str(exc.filename)!r}: {os_reason(exc)}")
    return None


def run_job(prog: str, run, args: argparse.Namespace) -> int:
    """``run(args)``, with every user-facing error printed as ``PROG: error: MESSAGE`` (exit 2)."""
    try:
        return int(run(args) or 0)
    except Exception as e:  # noqa: BLE001 - sorted by user_error; anything else re-raises
        err = user_error(e)
        if err is None:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def run_script(add_arguments, run, doc: str | None, argv: list[str] | None = None) -> int:
    """``python jobs/<name>.py ...``: the job's parser and run, errors printed as one message (exit 2)."""
    prog = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_job(prog, run, args)


if __name__ == "__main__":
    sys.exit(main())
