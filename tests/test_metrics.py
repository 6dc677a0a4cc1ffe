"""Ranking metrics on hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from uirl.metrics import mean_metrics, rank_of_target, ranking_metrics


def test_perfect_and_worst_ranking():
    best = ranking_metrics([0.9, 0.1, 0.2, 0.3])
    assert best == {"auc": 1.0, "mrr": 1.0, "ndcg@5": 1.0, "recall@5": 1.0, "ndcg@10": 1.0, "recall@10": 1.0}
    worst = ranking_metrics([-1.0, 0.1, 0.2, 0.3])
    assert worst["auc"] == 0.0 and worst["mrr"] == 0.25
    assert worst["ndcg@5"] == pytest.approx(1 / math.log2(5)) and worst["recall@5"] == 1.0


def test_rank_counts_ties_half():
    assert rank_of_target([1.0, 1.0, 1.0, 1.0]) == 2.5  # (C + 1) / 2: a constant model is at chance
    assert ranking_metrics([1.0, 1.0, 1.0, 1.0])["auc"] == 0.5
    assert rank_of_target([0.5, 0.9, 0.5, 0.1]) == 2.5
    assert rank_of_target([0.5, 0.9, 0.5, 0.1], target_index=1) == 1.0
    assert rank_of_target([0.5, 0.9, 0.5, 0.1], target_index=3) == 4.0


def test_ndcg_and_recall_cutoffs():
    scores = np.array([0.5] + [0.9] * 5 + [0.1] * 10)  # target at rank 6 of 16
    m = ranking_metrics(scores, ks=(5, 6, 10))
    assert m["recall@5"] == 0.0 and m["ndcg@5"] == 0.0
    assert m["recall@6"] == 1.0 and m["ndcg@6"] == pytest.approx(1 / math.log2(7))
    assert m["mrr"] == pytest.approx(1 / 6) and m["auc"] == pytest.approx(10 / 15)
    third = ranking_metrics([0.7, 0.8, 0.9, 0.1])
    assert third["ndcg@5"] == pytest.approx(0.5)  # rank 3: 1 / log2(4)


def test_mean_metrics_averages_per_user():
    avg = mean_metrics([ranking_metrics([1.0, 0.0]), ranking_metrics([0.0, 1.0])])
    assert avg["auc"] == 0.5 and avg["mrr"] == 0.75 and avg["recall@5"] == 1.0
    with pytest.raises(ValueError):
        mean_metrics([])
    with pytest.raises(ValueError):
        mean_metrics([{"auc": 1.0}, {"mrr": 1.0}])


@pytest.mark.parametrize("scores, target", [([1.0], 0), ([[1.0, 2.0]], 0), ([1.0, float("nan")], 0),
                                            ([1.0, float("inf")], 0), ([1.0, 2.0], 2), ([1.0, 2.0], -1)])
def test_invalid_input_raises(scores, target):
    with pytest.raises(ValueError):
        ranking_metrics(scores, target_index=target)


def test_full_catalogue_metrics_hand_computed():
    from uirl.metrics import full_catalogue_metrics

    # 8 items; target = item 2 (score 0.6). Items 0 (0.9) and 5 (0.8) score higher, but item 0 is
    # in the user's history (excluded), item 4 ties with the target (half a rank).
    scores = np.array([0.9, 0.1, 0.6, 0.2, 0.6, 0.8, 0.3, 0.0])
    m = full_catalogue_metrics(scores, 2, excluded=[0, 3], ks=(1, 2, 3))
    assert m["full/rank"] == 2.5  # 1 + item 5 + half of item 4
    assert m["full/recall@1"] == 0.0 and m["full/recall@2"] == 0.0 and m["full/recall@3"] == 1.0
    assert m["full/ndcg@3"] == pytest.approx(1 / math.log2(3.5))
    # Excluding the target itself has no effect; nothing excluded: item 0 counts too.
    assert full_catalogue_metrics(scores, 2, excluded=[0, 2], ks=(3,))["full/rank"] == 2.5
    assert full_catalogue_metrics(scores, 2, ks=(3,))["full/rank"] == 3.5
    with pytest.raises(ValueError):
        full_catalogue_metrics(scores, 2, excluded=[9])
