"""TextEffortScorer: a Ray Data callable class holding one text-encoder (MiniLM + LoRA) replica.

Effort of the text-encoder backend = per-sample LoRA gradient norm of its batch-independent loss
(:func:`engine.llm.textrec.effort_scores`: the target among fixed negatives drawn from the
sample id). Usage with :func:`actors.shards.score_shards`::

    titles_ref = ray.put(titles)
    score_shards(sample_files(data), out_dir, TextEffortScorer,
                 constructor_args=(TextRecConfig().to_dict(), titles_ref),
                 constructor_kwargs={"micro_batch_size": 16},
                 output_columns=("sample_id", "effort"), batch_size=64, num_actors=n, num_cpus=1)

Input batches carry ``sample_id``, ``history`` and ``target``; output rows are
``{"sample_id": int64, "effort": float64}``. Scores do not depend on the batch, the micro-batch,
the shard or the actor (up to float rounding from padding).
"""

from __future__ import annotations

import numpy as np
import ray

from actors.effort import _resolve_titles
from engine.llm.textrec import Catalogue, TextRecConfig, build_model, effort_scores


class TextEffortScorer:
    """Builds the encoder + LoRA once (``__init__``) and scores batches (``__call__``).

    Args:
        config_dict: :class:`engine.llm.textrec.TextRecConfig` or a dict of its fields (may be an
            ObjectRef).
        titles_ref: the titles list indexed by item id, an ObjectRef to it, or the path of an
            ``items.parquet`` (or of a prepared folder holding one).
        micro_batch_size: samples per forward/backward inside a batch.
        threads: torch threads of this replica (0: leave torch's default).
    """

    def __init__(self, config_dict, titles_ref, *, micro_batch_size: int = 16, threads: int = 0):
        import torch

        if isinstance(config_dict, ray.ObjectRef):
            config_dict = ray.get(config_dict)
        if threads:
            torch.set_num_threads(int(threads))
        self.cfg = TextRecConfig.from_dict(config_dict)
        self.catalogue = Catalogue.from_titles(_resolve_titles(titles_ref))
        self.micro_batch_size = int(micro_batch_size)
        self.model = build_model(self.cfg)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
        scores = effort_scores(self.model, self.catalogue,
                               {"sample_id": ids, "history": list(batch["history"]), "target": batch["target"]},
                               micro_batch=self.micro_batch_size)
        return {"sample_id": ids, "effort": scores.astype(np.float64)}
