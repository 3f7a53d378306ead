"""Selection: Algorithm 2 on hand-built strata, float edges, baselines, config validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import ConfigError, DataError
from engine.selection import (
    METHODS,
    SelectionConfig,
    combine_scores,
    minmax,
    select,
    stratified_select,
)


def _strata_scores(sizes: list[int], k: int) -> np.ndarray:
    """Scores with exactly sizes[g] samples in stratum g of K=len(sizes) strata over [0, k]."""
    assert len(sizes) == k
    parts = [np.full(m, g + 0.5) for g, m in enumerate(sizes)]
    s = np.concatenate(parts)
    # pin the range to [0, k] so each stratum is [g, g+1)
    return np.concatenate([s, [0.0, float(k)]])


# ---------------------------------------------------------------- Algorithm 2


def test_alg2_hand_built_group_sizes_budgets_and_order():
    # strata sizes 2, 30, 0, 10, 50 (+ the pinned 0.0 in stratum 0 and k in stratum 4)
    s = _strata_scores([2, 30, 0, 10, 50], 5)
    sel, grp, st = stratified_select(s, 20, 5, np.random.default_rng(0))
    assert st.size.tolist() == [3, 30, 0, 10, 51]
    # visit order: smallest non-empty first: 0 (3), 3 (10), 1 (30), 4 (51); empty stratum never visited
    assert st.order.tolist() == [0, 2, -1, 1, 3]
    # budgets: floor(20/4)=5 -> take all 3 (smaller than the average budget: taken whole);
    # floor(17/3)=5 -> 5; floor(12/2)=6 -> 6; floor(6/1)=6 -> 6
    assert st.budget.tolist() == [5, 6, 0, 5, 6]
    assert st.taken.tolist() == [3, 6, 0, 5, 6]
    assert sel.size == 20 == st.taken.sum()
    # every selected sample is in the stratum the stats say it was taken from
    assert np.bincount(grp[sel], minlength=5).tolist() == st.taken.tolist()
    # the whole small stratum was taken
    assert set(np.flatnonzero(grp == 0)) <= set(sel.tolist())
    assert np.all(np.diff(sel) > 0)


def test_alg2_matches_a_literal_transcription_of_the_paper():
    """Paper Alg. 2 with empty strata kept (visited first, taking 0): same counts."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        k = int(rng.integers(1, 12))
        n = int(rng.integers(1, 300))
        s = rng.choice(rng.random(int(rng.integers(1, 40))), size=n)  # heavy ties, empty strata
        b = int(rng.integers(0, n + 1))
        _, grp, st = stratified_select(s, b, k, 0)
        # literal paper: G includes empty groups, B = floor(r|D|/K) initially, argmin |G_k|
        groups = {g: int((grp == g).sum()) for g in range(k)}
        left, taken = b, {}
        budget = b // k
        while groups:
            g = min(groups, key=lambda x: (groups[x], x))
            taken[g] = min(budget, groups.pop(g))
            left -= taken[g]
            if groups:
                budget = left // len(groups)
        assert [taken[g] for g in range(k)] == st.taken.tolist()
        assert st.taken.sum() == b


@pytest.mark.parametrize("seed", range(30))
def test_alg2_exact_total_for_any_budget(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 2000))
    s = rng.standard_normal(n) ** 3  # skewed: many tiny strata, one huge
    k = int(rng.integers(1, 80))
    hp = float(rng.choice([0.0, 0.1, 0.37]))
    left = n - math.floor(hp * n)
    for b in {0, 1, left, int(rng.integers(0, left + 1))}:
        sel, grp, st = stratified_select(s, b, k, rng, hard_prune=hp)
        assert sel.size == b and np.unique(sel).size == b
        assert np.all(grp[sel] >= 0)
        assert np.all(st.taken <= st.size)


def test_alg2_budget_above_remaining_is_refused():
    with pytest.raises(ConfigError, match="budget=10"):
        stratified_select(np.arange(10.0), 10, 3, 0, hard_prune=0.1)


def test_constant_scores_go_to_one_stratum():
    sel, grp, st = stratified_select(np.ones(7), 3, 4, 0)
    assert grp.tolist() == [0] * 7 and st.size.tolist() == [7, 0, 0, 0] and sel.size == 3


def _assert_one_group_each(s: np.ndarray, k: int) -> None:
    _, grp, st = stratified_select(s, 0, k, 0)
    assert grp.shape == s.shape
    assert np.all((grp >= 0) & (grp < k)), "a sample fell outside every stratum"
    assert st.size.sum() == s.size
    assert grp[np.argmax(s)] == (k - 1 if s.max() > s.min() else 0)
    assert grp[np.argmin(s)] == 0
    # strata are contiguous score ranges: sorting by score never decreases the stratum
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(grp[order]) >= 0)


def test_float_edges_every_sample_in_exactly_one_stratum_random():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 400))
        s = rng.random(n) * 10 ** rng.uniform(-8, 8) + rng.uniform(-1e3, 1e3)
        _assert_one_group_each(s, int(rng.integers(1, 100)))


@pytest.mark.parametrize(
    "s",
    [
        np.array([0.1, 0.2, 0.3, 0.7, 1.0 + 1e-16, 0.3 + 0.6]),
        np.array([1.0, np.nextafter(1.0, 2.0)]),  # width underflows to < 1 ulp
        np.array([1.0, np.nextafter(1.0, 2.0), np.nextafter(np.nextafter(1.0, 2.0), 2.0)]),
        np.array([0.0, 5e-324, 1e-323]),  # subnormals
        np.array([-1.7e308, 0.0, 1.7e308]),  # range overflows float64
        np.array([1e16, 1e16 + 2, 1e16 + 4, 1e16 + 6]),
        np.linspace(0.0, 1.0, 50 * 7 + 1),  # many samples exactly on edges
        np.array([0.0, 0.1, 0.2, 0.30000000000000004, 1.0 / 3, 2.0 / 3, 1.0]),
    ],
)
@pytest.mark.parametrize("k", [1, 3, 7, 49, 50, 75])
def test_float_edges_adversarial(s, k):
    _assert_one_group_each(s, k)


def test_float_edge_of_the_authors_code_is_gone():
    """Scores where lo + ((hi-lo)/K)*K < hi: the authors' loop drops the top sample."""
    rng = np.random.default_rng(1)
    found = 0
    for _ in range(2000):
        s = rng.random(20)
        lo, hi = s.min(), s.max()
        k = 50
        if lo + ((hi - lo) / k) * k < hi:
            found += 1
            _assert_one_group_each(s, k)
    assert found > 0  # the adversarial case really occurs in random data


def test_hard_prune_count_and_which():
    s = np.array([5.0, 9.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])
    sel, grp, st = stratified_select(s, 3, 2, 0, hard_prune=0.3)
    assert st.n_hard_pruned == 3
    assert sorted(np.flatnonzero(grp == -1).tolist()) == [1, 3, 7]  # 9, 9, 8
    assert st.hard_prune_threshold == 8.0
    assert not set(sel.tolist()) & {1, 3, 7}
    # floor(0.29 * 100) = 29, not 28 (the decimal the user wrote)
    _, grp, st = stratified_select(np.arange(100.0), 1, 5, 0, hard_prune=0.29)
    assert st.n_hard_pruned == 29 and (grp == -1).sum() == 29
    # ties: the lower position is pruned first
    _, grp, _ = stratified_select(np.ones(10), 1, 2, 0, hard_prune=0.2)
    assert np.flatnonzero(grp == -1).tolist() == [0, 1]
    # strata are built over the remaining range: the second highest 7.0 is the new max
    _, grp, _ = stratified_select(s, 1, 2, 0, hard_prune=0.3)
    assert grp[5] == 1


# ---------------------------------------------------------------- determinism


def _scores(n=500, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "influence": rng.standard_normal(n),
        "effort": rng.gamma(2.0, size=n),
        "grand": rng.random(n),
        "el2n": rng.random(n),
    }


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_selection(method):
    sc = _scores()
    cfg = SelectionConfig(method=method, ratio=0.1, groups=10, seed=7)
    a, b = select(method, sc, cfg), select(method, sc, cfg)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.groups, b.groups)
    assert a.indices.size == 50 and np.unique(a.indices).size == 50
    assert a.groups.shape == (500,)


@pytest.mark.parametrize("method", ["random", "dealrec", "ccs", "influence-only", "effort-only"])
def test_different_seeds_differ(method):
    sc = _scores()
    a = select(method, sc, SelectionConfig(method=method, ratio=0.1, groups=10, seed=1))
    b = select(method, sc, SelectionConfig(method=method, ratio=0.1, groups=10, seed=2))
    assert not np.array_equal(a.indices, b.indices)


# ---------------------------------------------------------------- baselines


def test_greedy_takes_exactly_the_top_b_of_the_combined_score():
    inf = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    eff = np.array([10.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    # lam=1: combined = [1.0, .2, .4, .6, .8, 1.0]; tie 0 vs 5 -> lower position first
    r = select("greedy", {"influence": inf, "effort": eff}, SelectionConfig(budget=3, lam=1.0))
    assert r.indices.tolist() == [0, 4, 5]
    assert r.stats is None and np.all(r.groups == -1)
    r = select("greedy", {"influence": inf, "effort": eff}, SelectionConfig(budget=2, lam=1.0))
    assert r.indices.tolist() == [0, 5]
    r = select("greedy", {"influence": inf, "effort": eff}, SelectionConfig(budget=3, lam=0.0))
    assert r.indices.tolist() == [3, 4, 5]


@pytest.mark.parametrize("method", ["grand", "el2n"])
def test_grand_el2n_keep_the_highest(method):
    v = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    r = select(method, {method: v}, SelectionConfig(budget=2, hard_prune=0.1))
    assert r.indices.tolist() == [1, 4]  # no hard prune for top-k methods
    assert np.array_equal(r.score, v)


def test_random_is_uniform_and_needs_no_scores():
    r = select("random", {}, SelectionConfig(budget=5), n=20)
    assert r.indices.size == 5 and r.score is None and r.stats is None
    counts = np.zeros(10)
    for seed in range(2000):
        counts[select("random", {}, SelectionConfig(budget=3, seed=seed), n=10).indices] += 1
    assert counts.min() > 0.8 * 600 and counts.max() < 1.2 * 600
    with pytest.raises(ConfigError, match="pass n="):
        select("random", {}, SelectionConfig(budget=5))


def test_ccs_prunes_the_hardest_then_stratifies_el2n():
    # 20 samples: EL2N 0..19; beta = 0.1 -> the 2 hardest (19, 18) pruned; K=3 over [0, 17]
    el2n = np.arange(20.0)[::-1].copy()
    r = select("ccs", {"el2n": el2n}, SelectionConfig(budget=6, groups=3, hard_prune=0.1))
    assert np.flatnonzero(r.groups == -1).tolist() == [0, 1]
    assert not set(r.indices.tolist()) & {0, 1}
    assert r.stats.size.tolist() == [6, 6, 6]  # [0,5.67) [5.67,11.33) [11.33,17]
    assert r.stats.taken.tolist() == [2, 2, 2]
    assert np.array_equal(r.score, el2n)
    # CCS ignores influence / effort entirely
    r2 = select("ccs", {"el2n": el2n, "influence": np.zeros(20)}, SelectionConfig(budget=6, groups=3))
    assert np.array_equal(r.indices, r2.indices)


def test_dealrec_equals_alg2_on_the_combined_score():
    sc = _scores()
    cfg = SelectionConfig(ratio=0.05, lam=0.5, groups=20, seed=3)
    r = select("dealrec", sc, cfg)
    sel, grp, st = stratified_select(combine_scores(sc["influence"], sc["effort"], 0.5), 25, 20,
                                     np.random.default_rng(3), hard_prune=0.1)
    assert np.array_equal(r.indices, sel) and np.array_equal(r.groups, grp)
    assert r.stats.n_hard_pruned == 50 and (r.groups == -1).sum() == 50
    # the ablations stratify one normalised term
    ri = select("influence-only", sc, cfg)
    sel_i, _, _ = stratified_select(minmax(sc["influence"]), 25, 20, np.random.default_rng(3), hard_prune=0.1)
    assert np.array_equal(ri.indices, sel_i)
    re_ = select("effort-only", {"effort": sc["effort"]}, cfg)
    sel_e, _, _ = stratified_select(minmax(sc["effort"]), 25, 20, np.random.default_rng(3), hard_prune=0.1)
    assert np.array_equal(re_.indices, sel_e)


def test_missing_score_arrays_are_named():
    with pytest.raises(DataError, match=r"\['influence', 'effort'\]"):
        select("dealrec", {"grand": np.ones(5)}, SelectionConfig(budget=2))
    with pytest.raises(DataError, match="el2n"):
        select("ccs", {"influence": np.ones(5)}, SelectionConfig(budget=2))


def test_bad_score_arrays():
    with pytest.raises(DataError, match="lengths"):
        select("dealrec", {"influence": np.ones(5), "effort": np.ones(4)}, SelectionConfig(budget=2))
    with pytest.raises(DataError, match="'effort'"):
        select("dealrec", {"influence": np.ones(5), "effort": np.array([1, 2, np.nan, 4, 5])},
               SelectionConfig(budget=2))


def test_method_argument_overrides_the_config():
    sc = _scores()
    r = select("el2n", sc, SelectionConfig(method="dealrec", budget=3))
    assert r.method == "el2n" and r.indices.tolist() == sorted(np.argsort(-sc["el2n"])[:3].tolist())


# ---------------------------------------------------------------- config


def test_config_lists_every_problem_at_once():
    cfg = SelectionConfig(method="dealrek", budget=5, ratio=0.2, lam=-1.0, groups=0, hard_prune=1.0)
    with pytest.raises(ConfigError) as e:
        cfg.validate(3)
    msgs = e.value.problems
    assert len(msgs) == 6
    for needle in ("method='dealrek'", "exactly one of budget / ratio", "budget=5 exceeds",
                   "lam=-1.0", "groups=0", "hard_prune=1.0"):
        assert any(needle in m for m in msgs), needle


def test_config_budget_vs_hard_prune_reported_with_other_problems():
    with pytest.raises(ConfigError) as e:
        SelectionConfig(budget=95, groups=0).validate(100)
    assert len(e.value.problems) == 2
    assert any("left after hard_prune" in m for m in e.value.problems)
    SelectionConfig(budget=95, hard_prune=0.0).validate(100)
    SelectionConfig(method="greedy", budget=95).validate(100)  # greedy does not hard-prune
    with pytest.raises(ConfigError, match="left after hard_prune"):
        SelectionConfig(ratio=1.0).validate(100)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({}, "exactly one of budget / ratio"),
        ({"ratio": 0.0}, "ratio=0.0"),
        ({"ratio": 1.5}, "ratio=1.5"),
        ({"budget": 0}, "budget=0"),
        ({"budget": 2.5}, "budget=2.5"),
        ({"budget": 3, "hard_prune": -0.1}, "hard_prune=-0.1"),
        ({"budget": 3, "lam": float("nan")}, "lam=nan"),
    ],
)
def test_config_single_problems(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        SelectionConfig(**kw).validate(10)


def test_resolve_budget():
    assert SelectionConfig(ratio=0.29).resolve_budget(100) == 29
    assert SelectionConfig(ratio=0.01).resolve_budget(50) == 1  # at least one
    assert SelectionConfig(ratio=0.02).resolve_budget(49156) == 983
    assert SelectionConfig(budget=7).resolve_budget(100) == 7


def test_config_fields_have_help():
    import dataclasses

    for f in dataclasses.fields(SelectionConfig):
        assert f.metadata.get("help"), f.name


# ---------------------------------------------------------------- minmax / combine


def test_minmax_edge_cases():
    assert minmax(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert minmax(np.array([3.0, 3.0])).tolist() == [0.0, 0.0]
    assert minmax(np.array([])).size == 0
    out = minmax(np.array([-1.7e308, 1.7e308]))
    assert out.tolist() == [0.0, 1.0]
    with pytest.raises(DataError, match="'influence'"):
        minmax(np.array([1.0, np.inf]), field="influence")
    with pytest.raises(DataError, match="NaN"):
        minmax(np.array([np.nan, 1.0]))


def test_combine_scores():
    c = combine_scores(np.array([0.0, 10.0, 5.0]), np.array([4.0, 2.0, 3.0]), 0.3)
    assert np.allclose(c, [0.3, 1.0, 0.65])
    assert np.allclose(combine_scores(np.ones(3), np.array([1.0, 2.0, 3.0]), 2.0), [0.0, 1.0, 2.0])
    with pytest.raises(ConfigError, match="lam"):
        combine_scores(np.ones(3), np.ones(3), -0.5)
    with pytest.raises(DataError, match="effort"):
        combine_scores(np.ones(3), np.ones(2), 0.5)
