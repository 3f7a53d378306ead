"""EffortScorer: a Ray Data callable class holding one LoRA LLM replica.

Usage::

    titles_ref = ray.put(titles)                      # broadcast once
    ds.map_batches(
        EffortScorer,
        fn_constructor_args=(llm_cfg.to_dict(), "games", titles_ref),
        fn_constructor_kwargs={"micro_batch_size": 16},
        compute=ray.data.ActorPoolStrategy(size=n),
        batch_size=256, num_cpus=1, num_gpus=1 if gpus else 0,
    )

Input batches carry ``sample_id``, ``history`` (item ids, oldest first) and ``target``; output
rows are ``{"sample_id": int64, "effort": float64}`` in any order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import ray

from engine.llm.bigrec.effort import score_effort_batch
from engine.llm.bigrec.model import LLMConfig, load_llm
from engine.llm.bigrec.prompts import PromptConfig, get_prompt_config


def _resolve_titles(arg) -> list[str]:
    if isinstance(arg, ray.ObjectRef):
        arg = ray.get(arg)
    if isinstance(arg, (str, os.PathLike)):
        from engine.data.schema import ITEMS_FILE, ITEMS_SCHEMA, read_parquet_checked

        path = str(arg)
        if os.path.isdir(path):
            path = os.path.join(path, ITEMS_FILE)
        table = read_parquet_checked(path, ITEMS_SCHEMA).sort_by("item_id")
        ids = table.column("item_id").to_numpy()
        titles = [""] * (int(ids.max()) + 1 if len(ids) else 0)
        for i, t in zip(ids, table.column("title").to_pylist()):
            titles[int(i)] = t
        return titles
    return [str(t) for t in arg]


class EffortScorer:
    """Builds the LLM replica once (``__init__``) and scores batches (``__call__``).

    Args:
        llm_cfg: LLMConfig or a dict of its fields (may be an ObjectRef).
        prompt_cfg: PromptConfig, a dict of its fields, or a preset name (may be an ObjectRef).
        titles_ref_or_items_path: the titles list indexed by item id, an ObjectRef to it, or the
            path of an ``items.parquet`` (or of a prepared folder holding one).
        micro_batch_size: samples per forward/backward inside a batch.
    """

    def __init__(self, llm_cfg: dict | LLMConfig, prompt_cfg: str | dict | PromptConfig,
                 titles_ref_or_items_path, *, micro_batch_size: int = 16):
        if isinstance(llm_cfg, ray.ObjectRef):
            llm_cfg = ray.get(llm_cfg)
        if isinstance(prompt_cfg, ray.ObjectRef):
            prompt_cfg = ray.get(prompt_cfg)
        self.llm_cfg = LLMConfig.from_dict(llm_cfg)
        self.prompt_cfg = get_prompt_config(prompt_cfg)
        self.titles = _resolve_titles(titles_ref_or_items_path)
        self.micro_batch_size = int(micro_batch_size)
        self.model, self.tokenizer = load_llm(self.llm_cfg, titles=self.titles, trainable=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
        histories: Sequence = batch["history"]
        scores = score_effort_batch(self.model, self.tokenizer, self.titles, histories,
                                    np.asarray(batch["target"]), self.prompt_cfg, self.micro_batch_size)
        return {"sample_id": ids, "effort": scores.astype(np.float64)}
