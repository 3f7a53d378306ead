"""TIGER (Rajput et al., NeurIPS'23) as a dealrec backend: items are tuples of semantic-ID tokens
(:mod:`engine.semantic_ids`), a T5 encoder-decoder reads the history's tuples and generates the
next item's tuple; ranking is beam search constrained to catalogue tuples; every parameter trains
(the paper fully fine-tunes TIGER), so the effort score is the per-sample gradient norm over ALL
parameters (:func:`engine.effort.per_sample_grad_norms`: Linear, Embedding, T5LayerNorm and the
relative-position biases, one backward per micro-batch).

Layout:

- :mod:`engine.llm.tiger.config`  -- :class:`TigerConfig`
- :mod:`engine.llm.tiger.model`   -- token layout, T5 build/save, batches, losses
- :mod:`engine.llm.tiger.ranking` -- :class:`CodeTrie`, constrained :func:`beam_search`
- :mod:`engine.llm.tiger.backend` -- :class:`TigerBackend` (``--backend tiger``)
"""

from engine.llm.tiger.config import TigerConfig
from engine.llm.tiger.model import (EOS, PAD, TokenLayout, build_model, checkpoint_problem, encode,
                                    per_sample_loss, save_model, train_loss, user_tokens)
from engine.llm.tiger.ranking import CodeTrie, beam_search

__all__ = ["TigerConfig", "TokenLayout", "build_model", "save_model", "checkpoint_problem", "encode",
           "per_sample_loss", "train_loss", "user_tokens", "CodeTrie", "beam_search", "PAD", "EOS"]
