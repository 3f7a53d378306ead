"""SurrogateScorer / InfluenceScorer on a Ray Data actor pool give the engine's scores,
for any pool size and batch size (compared by sample_id; order and blocks not asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actors.influence import InfluenceScorer, SurrogateScorer
from engine.influence import score_surrogate_batch, trainable_params
from engine.surrogate import SurrogateConfig, build_surrogate, surrogate_payload

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

N, N_ITEMS = 90, 25


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    rows = [{"sample_id": i, "user_id": str(i), "history": rng.integers(0, N_ITEMS, rng.integers(0, 9)).tolist(),
             "target": int(rng.integers(0, N_ITEMS))} for i in range(N)]
    model = build_surrogate(N_ITEMS, SurrogateConfig(hidden=8, n_blocks=1, max_len=6))
    m = sum(p.numel() for p in trainable_params(model).values())
    v = torch.randn(m, generator=torch.Generator().manual_seed(1)).numpy()
    batch = {"sample_id": np.arange(N), "target": np.array([r["target"] for r in rows]),
             "history": np.array([np.array(r["history"], dtype=np.int32) for r in rows], dtype=object)}
    ref = score_surrogate_batch(model, batch, v=v, n_train=N, batch_size=32)
    return rows, model, v, ref


@pytest.mark.parametrize("pool,batch_size,cls", [(1, 16, SurrogateScorer), (2, 16, InfluenceScorer),
                                                  (1, 40, InfluenceScorer), (2, 40, SurrogateScorer)])
def test_pool_matches_engine(ray_cluster, setup, pool, batch_size, cls):
    ray = ray_cluster
    rows, model, v, ref = setup
    sur_ref, v_ref = ray.put(surrogate_payload(model)), ray.put(v)
    ds = ray.data.from_items(rows, override_num_blocks=4)
    out = ds.map_batches(
        cls, fn_constructor_args=(sur_ref, v_ref),
        fn_constructor_kwargs={"n_train": N, "batch_size": 7, "num_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=pool), batch_size=batch_size, num_cpus=0.5,
    ).to_pandas().sort_values("sample_id")
    cols = ("influence", "grand", "el2n") if cls is SurrogateScorer else ("influence",)
    assert set(out.columns) == {"sample_id", *cols}
    assert out["sample_id"].tolist() == list(range(N))
    for col in cols:
        np.testing.assert_allclose(out[col].to_numpy(), ref[col], rtol=1e-4, atol=1e-6 * np.abs(ref[col]).max())
