"""EffortScorer actor pool: same effort per sample_id for any pool size and batch size,
equal to the engine's direct computation."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

TITLES = [f"Game {i} {w}" for i, w in enumerate(["Quest", "Racer", "Arena", "Legends", "Puzzle", "Saga"] * 6)]
N = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from engine.llm.bigrec.effort import score_effort_batch
    from engine.llm.bigrec.model import LLMConfig, load_llm
    from engine.llm.bigrec.prompts import get_prompt_config

    cache = tmp_path_factory.getbasetemp() / "dealrec-cache"
    cfg = LLMConfig(cache_dir=str(cache), init_lora_weights=False, seed=2)
    rng = np.random.default_rng(0)
    hist = [rng.integers(0, len(TITLES), rng.integers(0, 10)).astype(np.int32) for _ in range(N)]
    tgt = rng.integers(0, len(TITLES), N).astype(np.int32)
    model, tok = load_llm(cfg, titles=TITLES)  # builds the cached base once, before the actors start
    direct = score_effort_batch(model, tok, TITLES, hist, tgt, get_prompt_config("games"), micro_batch_size=8)
    return cfg, hist, tgt, direct


@pytest.mark.parametrize("pool,batch_size", [(1, 7), (2, 16)])
def test_pool_and_batch_size_do_not_change_scores(ray_cluster, setup, pool, batch_size):
    ray = ray_cluster
    from actors.effort import EffortScorer

    cfg, hist, tgt, direct = setup
    rows = [{"sample_id": i, "history": hist[i], "target": int(tgt[i])} for i in range(N)]
    ds = ray.data.from_items(rows, override_num_blocks=4)
    out = ds.map_batches(
        EffortScorer,
        fn_constructor_args=(cfg.to_dict(), "games", ray.put(TITLES)),
        fn_constructor_kwargs={"micro_batch_size": 3},
        compute=ray.data.ActorPoolStrategy(size=pool),
        batch_size=batch_size,
        num_cpus=1,
    ).to_pandas()
    out = out.sort_values("sample_id")
    assert out["sample_id"].tolist() == list(range(N))
    assert "double" in str(out["effort"].dtype) or out["effort"].dtype == np.float64
    np.testing.assert_allclose(np.asarray(out["effort"], dtype=np.float64), direct, rtol=1e-4)
