import math

import pytest

from training.metrics import catalog_coverage, evaluate, hit_rate_at_k, map_at_k, ndcg_at_k, precision_at_k, recall_at_k

RECS = ["a", "b", "c", "d"]
REL = {"b", "d", "z"}


def test_precision_and_recall():
    assert precision_at_k(RECS, REL, 4) == pytest.approx(2 / 4)
    assert precision_at_k(RECS[:2], REL, 4) == pytest.approx(1 / 4)  # divides by k, not list length
    assert recall_at_k(RECS, REL, 4) == pytest.approx(2 / 3)
    assert recall_at_k(RECS, set(), 4) == 0.0


def test_ndcg_by_hand():
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RECS, REL, 4) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(["b", "d"], {"b", "d"}, 10) == pytest.approx(1.0)


def test_map_normalized_by_min_k_and_relevant():
    # hits at ranks 2 and 4: (1/2 + 2/4) / min(4, 3)
    assert map_at_k(RECS, REL, 4) == pytest.approx((0.5 + 0.5) / 3)
    assert map_at_k(["b"], {"b", "x", "y"}, 1) == pytest.approx(1.0)


def test_hit_rate_and_evaluate_skip_users_without_relevant_items():
    assert hit_rate_at_k(RECS, {"d"}, 3) == 0.0
    assert hit_rate_at_k(RECS, {"d"}, 4) == 1.0
    result = evaluate({"u1": RECS, "u2": ["q"]}, {"u1": REL, "u2": {"b"}, "u3": set()}, 4)
    assert result["users"] == 2
    assert result["hit@4"] == pytest.approx(0.5)
    assert result["precision@4"] == pytest.approx((2 / 4 + 0) / 2)


def test_catalog_coverage():
    assert catalog_coverage({"u1": ["a", "b"], "u2": ["b", "c"]}, 10, 2) == pytest.approx(0.3)


def test_beyond_accuracy_by_hand():
    import numpy as np

    from training.metrics import (
        exposure_entropy,
        exposure_gini,
        intra_list_diversity,
        mean_popularity_percentile,
        novelty,
    )

    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([1.0, 0.0])}
    assert intra_list_diversity({"u": ["a", "b"]}, vectors, 2) == pytest.approx(1.0)
    assert intra_list_diversity({"u": ["a", "c"]}, vectors, 2) == pytest.approx(0.0)
    pop = {"a": 0.5, "b": 0.25, "c": 0.125, "d": 0.0625}
    assert novelty({"u": ["a", "b"]}, pop, 2) == pytest.approx((1 + 2) / 2)
    assert mean_popularity_percentile({"u": ["a"]}, pop, 1) == pytest.approx(0.75)  # 3 of 4 items less popular
    assert mean_popularity_percentile({"u": ["d"]}, pop, 1) == pytest.approx(0.0)
    even = {"u1": ["a", "b"], "u2": ["c", "d"]}
    assert exposure_entropy(even, 4, 2) == pytest.approx(1.0)
    assert exposure_gini(even, 4, 2) == pytest.approx(0.0)
    same = {"u1": ["a"], "u2": ["a"]}
    assert exposure_entropy(same, 4, 1) == pytest.approx(0.0)
    assert exposure_gini(same, 4, 1) == pytest.approx(0.75)  # one of four items takes all: (n-1)/n


def test_evaluate_by_segment_reports_each_segment_and_the_gap():
    from training.metrics import evaluate_by_segment

    recs = {"a": ["x", "y"], "b": ["y", "x"], "c": ["z", "x"], "d": ["x"]}
    relevant = {"a": {"x"}, "b": {"x"}, "c": {"z"}, "d": {"x"}}
    result = evaluate_by_segment(recs, relevant, {"a": "s1", "b": "s1", "c": "s2"}, 2, n_items=3)
    # s1: a hits at rank 1 (ndcg 1), b at rank 2 (1/log2(3)); s2: c at rank 1. d has no segment.
    assert set(result["segments"]) == {"s1", "s2"}
    assert result["segments"]["s1"]["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert result["segments"]["s2"]["ndcg@2"] == pytest.approx(1.0) and result["segments"]["s1"]["users"] == 2
    assert result["gap"]["ndcg@2"] == pytest.approx(1 - (1 + 1 / math.log2(3)) / 2)
    assert result["segments"]["s2"]["coverage@2"] == pytest.approx(2 / 3)


def test_long_tail_mask_and_share_by_hand():
    import numpy as np

    from training.metrics import long_tail_mask, long_tail_share

    # counts 50, 30, 10, 5, 5 (total 100): the head is the shortest prefix holding ≥ 80 % = {a, b}
    counts = np.array([50.0, 30.0, 10.0, 5.0, 5.0])
    assert long_tail_mask(counts).tolist() == [False, False, True, True, True]
    assert long_tail_mask(counts / 50).tolist() == [False, False, True, True, True]  # scale-free
    assert long_tail_mask(counts, 0.9).tolist() == [False, False, False, True, True]
    assert long_tail_mask(np.array([0.0, 10.0, 0.0])).tolist() == [True, False, True]  # unseen items are tail
    assert long_tail_mask(np.zeros(3)).all()
    with pytest.raises(ValueError, match="head_share"):
        long_tail_mask(counts, 0.0)
    pop = dict(zip("abcde", counts))
    # 4 slots in the top-2s: c and x (not in training) are tail, a and b head -> 2 / 4
    assert long_tail_share({"u1": ["a", "c", "d"], "u2": ["b", "x"]}, pop, 2) == pytest.approx(0.5)
    assert long_tail_share({"u1": ["a"]}, pop, 1) == 0.0
    assert long_tail_share({}, pop, 10) == 0.0


def test_exposure_gini_of_uneven_exposure_by_hand():
    from training.metrics import exposure_gini

    # exposure counts over 4 items: 3, 1, 0, 0 -> sorted 0, 0, 1, 3; G = 2·Σ i·x_i / (n·Σx) − (n+1)/n
    recs = {"u1": ["a", "b"], "u2": ["a"], "u3": ["a"]}
    assert exposure_gini(recs, 4, 2) == pytest.approx(2 * (3 * 1 + 4 * 3) / (4 * 4) - 5 / 4)
