import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from feature_store.segments import behavioural_columns, segment_summary, segment_users

CATEGORIES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def _blobs(per_group=60, seed=0):
    """3 groups of users: group g likes categories 2g and 2g+1; other features are shared noise."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for g in range(3):
        for i in range(per_group):
            affinity = rng.uniform(0.0, 0.05, len(CATEGORIES))
            affinity[2 * g: 2 * g + 2] += rng.uniform(0.35, 0.45, 2)
            affinity /= affinity.sum()
            devices = rng.dirichlet([5, 5, 5, 5])
            row = {"user_id": f"g{g}-u{i}", "events_30d": 10 * (g + 1) + int(rng.integers(0, 3)), "age": 30.0}
            row |= {f"cat_{c}": a for c, a in zip(CATEGORIES, affinity)}
            row |= {f"share_{d}": s for d, s in zip(("mobile", "desktop", "tablet", "tv"), devices)}
            rows.append(row)
            truth.append(g)
    frame = pd.DataFrame(rows)
    order = rng.permutation(len(frame))
    return frame.iloc[order].reset_index(drop=True), np.array(truth)[order]


def test_behavioural_columns_are_cat_and_share():
    profiles, _ = _blobs(per_group=3)
    cols = behavioural_columns(profiles)
    assert "events_30d" not in cols and "age" not in cols
    assert len(cols) == len(CATEGORIES) + 4


def test_recovers_three_groups_and_picks_k3():
    profiles, truth = _blobs()
    seg = segment_users(profiles, k_min=2, k_max=6, seed=0)
    assert seg.k == 3
    assert set(seg.candidates) == {2, 3, 4, 5, 6}
    assert max(seg.candidates, key=seg.candidates.get) == 3
    assert seg.method in ("kmeans", "gmm")
    assert list(seg.labels.index) == profiles["user_id"].tolist()
    assert adjusted_rand_score(truth, seg.labels.to_numpy()) >= 0.9
    assert seg.score > 0.3


def test_is_deterministic_for_a_seed():
    profiles, _ = _blobs(per_group=20)
    a = segment_users(profiles, k_max=4, seed=3)
    b = segment_users(profiles, k_max=4, seed=3)
    pd.testing.assert_series_equal(a.labels, b.labels)
    assert a.candidates == b.candidates


def test_summary_names_each_groups_top_categories():
    profiles, truth = _blobs()
    seg = segment_users(profiles, k_min=3, k_max=3)
    summary = segment_summary(profiles, seg)
    assert summary["size"].sum() == len(profiles)
    assert summary["segment"].tolist() == [0, 1, 2]
    tops = {frozenset(t[:2]) for t in summary["top_categories"]}
    assert tops == {frozenset(CATEGORIES[2 * g: 2 * g + 2]) for g in range(3)}
    assert all(len(t) == 3 for t in summary["top_categories"])
    by_top = {frozenset(t[:2]): m for t, m in zip(summary["top_categories"], summary["mean_events_30d"])}
    assert by_top[frozenset(["Action", "Comedy"])] == pytest.approx(11.0, abs=1.0)
    assert by_top[frozenset(["Romance", "Sci-Fi"])] == pytest.approx(31.0, abs=1.0)


def test_rejects_bad_input():
    profiles, _ = _blobs(per_group=3)
    with pytest.raises(ValueError, match="cannot form 2 segments"):
        segment_users(profiles.head(2))
    with pytest.raises(ValueError, match="no behavioural columns"):
        segment_users(profiles[["user_id", "events_30d"]])
    with pytest.raises(ValueError, match="k_min"):
        segment_users(profiles, k_min=4, k_max=3)
