"""Ray Data callable classes holding the surrogate and the broadcast iHVP vector.

Usage::

    sur_ref = ray.put(engine.surrogate.surrogate_payload(model_or_saved_folder))   # once
    v_ref = ray.put(v)                                                              # once
    ds.map_batches(
        SurrogateScorer,
        fn_constructor_args=(sur_ref, v_ref),
        fn_constructor_kwargs={"n_train": n, "batch_size": 256},
        compute=ray.data.ActorPoolStrategy(size=k),
        batch_size=256, num_cpus=0.5,
    )

Input batches carry ``sample_id``, ``history`` (object array of int arrays, oldest first) and
``target``; output rows are ``{"sample_id": int64, "influence", "grand", "el2n": float64}``
(the columns named by ``what``) in input order. ``ObjectRef`` constructor arguments
arrive unresolved and are ``ray.get`` once in ``__init__``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray

from engine.influence import DirectionalDerivatives, score_surrogate_batch
from engine.surrogate import surrogate_from_payload, surrogate_loss

WHAT = ("influence", "grand", "el2n")


def _get(x):
    return ray.get(x) if isinstance(x, ray.ObjectRef) else x


class SurrogateScorer:
    """One surrogate replica; scores batches with influence and/or the GraNd / EL2N baselines.

    Args:
        surrogate_ref: ``engine.surrogate.surrogate_payload(...)`` (a plain dict), or a ref to it.
        v_ref: the iHVP solution v (numpy [m]) or a ref to it; may be None without "influence".
        n_train: number of training samples n (influence = (1/n) grad L_s . v).
        what: columns to compute, any of ("influence", "grand", "el2n").
        batch_size: samples per engine batch inside one Ray batch.
        max_len: sequence window (None = the surrogate's).
        method: "jvp" (default) or "fd" for the directional derivatives.
        compile: compile the "jvp" pass with ``torch.compile`` once per actor (see
            ``engine.influence.DirectionalDerivatives``).
        num_threads: torch intra-op threads (None = leave torch's default).
    """

    def __init__(self, surrogate_ref, v_ref=None, *, n_train: int | None = None,
                 what: Sequence[str] = WHAT, batch_size: int = 256, max_len: int | None = None,
                 method: str = "jvp", compile: bool = False, num_threads: int | None = None):
        what = tuple(what)
        bad = [w for w in what if w not in WHAT]
        if bad or not what:
            raise ValueError(f"what={what!r}: expected a non-empty subset of {WHAT}")
        if "influence" in what and (v_ref is None or n_train is None or int(n_train) < 1):
            raise ValueError("influence needs v_ref and n_train >= 1 (influence = (1/n) grad L_s . v)")
        if num_threads:
            import torch

            torch.set_num_threads(int(num_threads))
        self.model = surrogate_from_payload(_get(surrogate_ref))
        # once per actor: v split into per-parameter tangents (no O(m) copies per batch), the
        # forward-mode pass compiled when asked
        self.directional = None
        if "influence" in what:
            self.directional = DirectionalDerivatives(self.model, surrogate_loss, np.asarray(_get(v_ref)),
                                                      method=method, compile=compile)
        self.n_train = None if n_train is None else int(n_train)
        self.what, self.batch_size = what, int(batch_size)
        self.max_len = int(max_len or self.model.cfg.max_len)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return score_surrogate_batch(self.model, batch, directional=self.directional, n_train=self.n_train,
                                     what=self.what, batch_size=self.batch_size, max_len=self.max_len)


class InfluenceScorer(SurrogateScorer):
    """Influence only: ``{"sample_id", "influence"}`` per sample (see :class:`SurrogateScorer`)."""

    def __init__(self, surrogate_ref, v_ref, *, n_train: int, batch_size: int = 256, max_len: int | None = None,
                 method: str = "jvp", compile: bool = False, num_threads: int | None = None):
        super().__init__(surrogate_ref, v_ref, n_train=n_train, what=("influence",), batch_size=batch_size,
                         max_len=max_len, method=method, compile=compile, num_threads=num_threads)
