"""EffortScorer: a Ray Data callable class holding one LLM replica of any registered backend.

The actor only resolves its arguments (ObjectRefs, an items path) and calls the engine: the
backend (:func:`engine.llm.get_backend`) builds the pretrained model with a fresh trainable LoRA
(:meth:`~engine.llm.protocol.LLMBackend.build_model`) and scores each batch
(:meth:`~engine.llm.protocol.LLMBackend.effort`: per-sample LoRA gradient norms, LoRA dropout
off). Usage with :func:`actors.shards.score_shards` (or ``Dataset.map_batches``)::

    titles_ref = ray.put(titles)                      # broadcast once
    score_shards(files, out_dir, EffortScorer,
                 constructor_args=("bigrec", {"llm": llm_cfg.to_dict(), "prompt": "games"}, titles_ref),
                 # or ("textrec", {"config": TextRecConfig(model=...).to_dict()}, titles_ref)
                 constructor_kwargs={"micro_batch_size": 16},
                 output_columns=("sample_id", "effort"), batch_size=64, num_actors=n, num_cpus=1)

Input batches carry ``sample_id``, ``history`` (item ids, oldest first) and ``target``; output
rows are ``{"sample_id": int64, "effort": float64}``. Scores are those of the backend's engine
function (:func:`engine.llm.bigrec.effort.score_effort_batch`,
:func:`engine.llm.textrec.effort_scores`) on the same samples.

With ``u_ref`` (the LLM-side influence, :mod:`engine.influence.llm`): rows also carry
``llm_influence`` (float64), each sample's trainable-parameter gradient dotted with the one
broadcast vector u, which :func:`llm_valid_direction` computes once (one task, the pool's
resources) from the validation pairs::

    u = ray.get(ray.remote(num_cpus=1)(llm_valid_direction).remote("bigrec", options, titles_ref, pairs))
    score_shards(..., constructor_kwargs={"micro_batch_size": 16, "u_ref": ray.put(u)},
                 output_columns=("sample_id", "effort", "llm_influence"), ...)
"""

from __future__ import annotations

import os

import numpy as np
import ray

from engine.llm import get_backend


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
    """Builds the backend's LoRA model once (``__init__``) and scores batches (``__call__``).

    Args:
        backend_name: a key of :data:`engine.llm.BACKENDS` (``"bigrec"``, ``"textrec"``).
        backend_options: the backend's keyword options (bigrec: ``llm=`` LLMConfig dict,
            ``prompt=`` preset/dict; textrec: ``config=`` TextRecConfig dict); may be an ObjectRef.
        titles_ref_or_items_path: the titles list indexed by item id, an ObjectRef to it, or the
            path of an ``items.parquet`` (or of a prepared folder holding one).
        micro_batch_size: samples per forward/backward inside a batch.
        threads: torch threads of this replica (0: leave torch's default).
        u_ref: the LLM-side influence direction u (numpy, flat over the model's trainable
            parameters in order; or a ref to it): adds the ``llm_influence`` column. None: effort only.
    """

    def __init__(self, backend_name: str, backend_options: dict | None, titles_ref_or_items_path, *,
                 micro_batch_size: int = 16, threads: int = 0, u_ref=None):
        if isinstance(backend_options, ray.ObjectRef):
            backend_options = ray.get(backend_options)
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.backend = get_backend(backend_name, _resolve_titles(titles_ref_or_items_path), **(backend_options or {}))
        self.micro_batch_size = int(micro_batch_size)
        self.model = self.backend.build_model()
        self.u = None
        if u_ref is not None:  # once per actor: cast to the parameters' dtype and device
            import torch

            from engine.influence.llm import trainable_parameters

            u = ray.get(u_ref) if isinstance(u_ref, ray.ObjectRef) else u_ref
            p0 = trainable_parameters(self.model)[0]
            self.u = torch.from_numpy(np.array(u, copy=True)).to(device=p0.device, dtype=p0.dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
        scores = self.backend.effort(self.model, ids, batch["history"], np.asarray(batch["target"]),
                                     micro_batch=self.micro_batch_size)
        out = {"sample_id": ids, "effort": np.asarray(scores, dtype=np.float64)}
        if self.u is not None:
            from engine.influence.llm import llm_influence_scores

            out["llm_influence"] = llm_influence_scores(self.backend, self.model, ids, list(batch["history"]),
                                                        np.asarray(batch["target"]), self.u,
                                                        micro_batch=self.micro_batch_size)
        return out


def llm_valid_direction(backend_name: str, backend_options: dict | None, titles_ref_or_items_path, pairs: dict, *,
                        micro_batch_size: int = 16, threads: int = 0) -> np.ndarray:
    """u of the LLM-side influence: the mean trainable-parameter gradient of the validation loss
    (:func:`engine.influence.llm.valid_gradient`) at the model an :class:`EffortScorer` of the same
    arguments holds. Run it as one Ray task with the effort actors' resources.

    Args:
        pairs: :func:`engine.influence.llm.validation_pairs` (or a ref to it).

    Returns:
        float64 [m], flat over the model's trainable parameters in order.
    """
    from engine.influence.llm import valid_gradient

    if isinstance(pairs, ray.ObjectRef):
        pairs = ray.get(pairs)
    scorer = EffortScorer(backend_name, backend_options, titles_ref_or_items_path, micro_batch_size=micro_batch_size,
                          threads=threads)
    return valid_gradient(scorer.backend, scorer.model, pairs, micro_batch=scorer.micro_batch_size)
