"""LLM backends, registered by name: each lives in its own package and satisfies
:class:`engine.llm.protocol.LLMBackend`.

* ``bigrec`` (:mod:`engine.llm.bigrec`): BIGRec, item titles in an Alpaca prompt, LoRA on a
  causal LM; ranks by generating a title and grounding it to the catalogue.
* ``textrec`` (:mod:`engine.llm.textrec`): a pretrained sentence encoder (all-MiniLM-L6-v2,
  offline) + LoRA, user and item texts in one tower, ranking by cosine.
* ``tiger`` (:mod:`engine.llm.tiger`): a T5 encoder-decoder over semantic-ID tokens, every
  parameter trained (``full_finetune``), ranking by beam search constrained to catalogue tuples.

Adding a backend is one package with a ``backend.py`` and one line in :data:`BACKENDS`. The
registry holds import paths, so importing :mod:`engine.llm` loads no model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from engine.errors import ConfigError
from engine.llm.protocol import LLMBackend

__all__ = ["LLMBackend", "BACKENDS", "get_backend", "backend_class"]

#: backend name -> "module:Class" of its implementation
BACKENDS: dict[str, str] = {
    "bigrec": "engine.llm.bigrec.backend:BigRecBackend",
    "textrec": "engine.llm.textrec.backend:TextEncoderBackend",
    "tiger": "engine.llm.tiger.backend:TigerBackend",
}


def backend_class(name: str):
    """The class registered as ``name``.

    Raises:
        ConfigError: unknown name.
    """
    if name not in BACKENDS:
        raise ConfigError([f"backend={name!r}: expected one of {sorted(BACKENDS)}"], config="backend")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, titles: Sequence[str], **options) -> LLMBackend:
    """Build a backend by name.

    Args:
        name: a key of :data:`BACKENDS`.
        titles: title of every item id.
        **options: the backend's keyword options (``llm=``, ``prompt=`` for bigrec; ``config=`` for
            textrec; ``config=``, ``semantic_ids=`` for tiger).

    Returns:
        An object satisfying :class:`LLMBackend`.

    Raises:
        ConfigError: unknown name, or invalid options for that backend.
    """
    cls = backend_class(name)
    try:
        return cls(titles, **options)
    except TypeError as e:
        raise ConfigError([f"backend {name!r}: {e}"], config="backend") from None
