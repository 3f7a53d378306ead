"""Recall/NDCG@K against hand-computed values, including multi-target and duplicate titles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.grounding import expand_titles, index_titles
from engine.metrics import format_table, recall_ndcg

L2 = math.log2


def test_single_target_hit_positions():
    # one user, target at position 3
    m = recall_ndcg([[7, 8, 9, 10, 11]], [[9]], ks=[1, 3, 5])
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx(1 / L2(4))
    assert m["ndcg@5"] == pytest.approx(1 / L2(4))
    assert m["users"] == 1


def test_multi_target_recall_and_ideal_dcg():
    # targets {1, 2, 3}; hits at positions 1 and 4
    ranked = [[1, 9, 8, 3, 7, 6]]
    m = recall_ndcg(ranked, [[1, 2, 3]], ks=[2, 5])
    assert m["recall@2"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    idcg2 = 1 + 1 / L2(3)  # min(|T|=3, K=2) = 2 ideal positions
    assert m["ndcg@2"] == pytest.approx(1 / idcg2)
    idcg5 = 1 + 1 / L2(3) + 1 / L2(4)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / L2(5)) / idcg5)


def test_average_skips_users_without_targets_and_dedups_targets():
    ranked = [[1, 2], [3, 4], [5, 6]]
    targets = [[1, 1], [], [9]]  # user 2 has no targets: not in the average
    m = recall_ndcg(ranked, targets, ks=[2])
    assert m["users"] == 2
    assert m["recall@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["ndcg@2"] == pytest.approx((1.0 + 0.0) / 2)


def test_perfect_ranking_is_one():
    m = recall_ndcg([[4, 5, 6, 1]], [[6, 5, 4]], ks=[3, 4])
    assert m["recall@3"] == 1.0 and m["ndcg@3"] == pytest.approx(1.0)
    assert m["ndcg@4"] == pytest.approx(1.0)


def test_duplicate_title_targets_via_expansion():
    # items 0 and 2 share title "a"; item 1 "b"; item 3 "c".
    idx = index_titles(["a", "b", "a", "c"])
    assert idx.titles == ["a", "b", "c"]
    # title ranking b, a, c -> items 1, 0, 2, 3
    items = expand_titles(np.array([[1, 0, 2]]), idx, 4)
    assert items.tolist() == [[1, 0, 2, 3]]
    # both items of title "a" are targets: positions 2 and 3 both count
    m = recall_ndcg(items, [[0, 2]], ks=[2, 3])
    assert m["recall@2"] == pytest.approx(0.5)
    assert m["recall@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 / L2(3) + 1 / L2(4)) / (1 + 1 / L2(3)))
    assert 0.0 <= m["ndcg@3"] <= 1.0


def test_bad_arguments_reported_together():
    with pytest.raises(ConfigError) as e:
        recall_ndcg([[1]], [[1], [2]], ks=[0])
    assert len(e.value.problems) == 2


def test_format_table_lists_every_k():
    m = recall_ndcg([[1, 2, 3]], [[3]], ks=[1, 2, 3])
    s = format_table(m, ks=[1, 2, 3])
    assert len(s.splitlines()) == 5
