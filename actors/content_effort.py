"""ContentSeededEffortScorer: :class:`actors.effort.EffortScorer` whose per-sample randomness is keyed
by the sample's content, not by its row.

``sample_id`` is a row number of one day's folder; a backend that seeds per-sample randomness
with the id it is given (the text encoder's fixed negatives) would score the same sample
differently on another day, and a score cache keyed by content (:mod:`engine.score_cache`)
would hand back a value a fresh computation does not give. This scorer gives the backend
:func:`engine.samplekey.key_seeds` of each sample's key (user, history, target) in place of the
sample id, so its effort is a pure function of (content, LLM-side config), as the cache
assumes; the rows it returns still carry the real ``sample_id``. The input batches need the
``user_id`` column besides ``sample_id``, ``history`` and ``target``. For BIGRec, whose effort
ignores the ids, the scores are the same as :class:`EffortScorer`'s.
"""

from __future__ import annotations

import numpy as np

from actors.effort import EffortScorer
from engine.samplekey import key_seeds, sample_keys

INPUT_COLUMNS = ("sample_id", "user_id", "history", "target")


def content_seeds(batch: dict) -> np.ndarray:
    """The content-addressed stand-in ids of a batch's samples."""
    import pyarrow as pa

    hist = pa.array([np.asarray(h, dtype=np.int32) for h in batch["history"]], pa.list_(pa.int32()))
    users = pa.array([str(u) for u in batch["user_id"]], pa.string())
    return key_seeds(sample_keys(users, hist, np.asarray(batch["target"], dtype=np.int64)))


class ContentSeededEffortScorer(EffortScorer):
    """Same constructor as :class:`EffortScorer` (``u_ref`` included); ``__call__`` hands the
    backend content seeds in place of the sample ids and puts the real ids back on the rows."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
        seeded = {k: v for k, v in batch.items() if k != "user_id"}
        seeded["sample_id"] = content_seeds(batch)
        out = dict(super().__call__(seeded))  # rows in input order
        out["sample_id"] = ids
        return out
