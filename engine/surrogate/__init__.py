"""Surrogate sequential recommenders (SASRec, BERT4Rec) for the influence score.

The surrogate is a small recommender trained on all n samples; its per-sample loss is
what influence functions differentiate (docs/method.md#influence).

Token layout (shared by every surrogate): token 0 = padding, token 1 = BOS for SASRec
(= [MASK] for BERT4Rec), token ``item_id + 2`` = item ``item_id`` (item ids are the dense
0..n_items-1 of the canonical items table). Item embeddings are tied with the output
layer: ``logits = h @ E[2:].T``, so the output has exactly ``n_items`` columns.

Batches (:func:`make_batches`) hold, per sample, the FULL training sequence
``s = history + [target]`` (last ``max_len`` items), left-padded:

- ``labels[b]`` = ``s[-max_len:]`` (item ids, -1 at padding),
- ``seq[b]``    = ``([BOS] + s[:-1])[-max_len:]`` as tokens, so that the output at every
  position t predicts ``labels[t]`` (next-item prediction at every position, SASRec
  standard; the BOS lets the first item be predicted too, so users with a single
  training item still contribute a loss, unlike the authors' code),
- ``target`` = the sample's target (the last label), ``sample_id``.

The output at the last position of ``seq`` is the next-item prediction after the history,
so one batch serves training, influence, EL2N and ranking.

Per-sample loss (what influence, GraNd and the training objective use; deterministic):

    L_s(theta) = mean over the valid positions t of s of  CE(softmax(logits_t), labels_t)

i.e. full-softmax cross-entropy over all items, averaged over the positions of the
sample's own training sequence (eval mode, no dropout, no sampled negatives). SASRec is
trained on exactly the objective that influence differentiates, except for dropout:

    J(theta) = (1/n) sum_s L_s(theta) + (weight_decay / 2) * ||theta||^2

(Adam's coupled L2 ``weight_decay``, applied to every parameter). So
``influence_scores(..., damping=cfg.weight_decay)`` uses H = Hessian of J and g_bar =
gradient of the mean loss R = (1/n) sum L_s, which is not 0 at the trained point
(weight decay + early stopping). BERT4Rec trains on random cloze masks; its per-sample
influence loss uses a mask pattern fixed by (sample_id, position), always including the
target, so it is deterministic but only approximates its training objective.

``loss='sampled'`` (large catalogues: cost per position ~ K instead of n_items): the softmax of
every position of sample s runs over its label and K negatives fixed by (seed, sample_id)
(:func:`_fixed_negatives`; a negative equal to the label is masked), so L_s stays deterministic
and batch-independent. Training draws fresh negatives every step, so J is then the expectation
of that objective over negative draws, and influence differentiates one fixed draw of it (the
same approximation as BERT4Rec's fixed masks). Ranking and evaluation always use every item.

Positions are counted from the right (the last item has position 0), exactly SASRec's
left-padding-to-max_len convention; hence a sample's output does not depend on how
much padding its batch has, and scores are independent of batch composition.

Layout (one module per stage):

- :mod:`engine.surrogate.config`   -- :class:`SurrogateConfig` (typed, validated as a whole)
- :mod:`engine.surrogate.batching` -- token layout, :func:`make_batches`, padding to fixed shapes
- :mod:`engine.surrogate.models`   -- SASRec, BERT4Rec, :func:`build_surrogate`, :data:`surrogate_loss`
- :mod:`engine.surrogate.evaluate` -- full-ranking Recall/NDCG (:func:`evaluate_ranking`)
- :mod:`engine.surrogate.train`    -- :func:`train_surrogate` (local, data-parallel, streamed)
- :mod:`engine.surrogate.io`       -- payloads for ``ray.put``, save/load of a trained surrogate

Every name below is importable from ``engine.surrogate`` (the path used before the split).
"""

from engine.surrogate.batching import (
    BOS,
    ITEM_OFFSET,
    MASK,
    PAD,
    encode_samples,
    length_bucket,
    make_batches,
    pad_batch,
    pad_to_bucket,
)
from engine.surrogate.config import DISTRIBUTED, LOSSES, MODELS, SurrogateConfig
from engine.surrogate.models import (
    BERT4Rec,
    SASRec,
    Surrogate,
    _fixed_negatives,
    _sasrec_loss_on_logits,
    _sasrec_position_logits,
    build_surrogate,
    surrogate_loss,
)
from engine.surrogate.evaluate import EVAL_PAIRS, evaluate_ranking
from engine.surrogate.train import _TrainStep, train_surrogate
from engine.surrogate.io import (
    load_surrogate,
    save_surrogate,
    surrogate_from_payload,
    surrogate_payload,
    surrogate_to_payload,
)

__all__ = [
    "BERT4Rec",
    "SASRec",
    "Surrogate",
    "SurrogateConfig",
    "build_surrogate",
    "evaluate_ranking",
    "load_surrogate",
    "make_batches",
    "save_surrogate",
    "surrogate_from_payload",
    "surrogate_loss",
    "surrogate_payload",
    "surrogate_to_payload",
    "train_surrogate",
]
