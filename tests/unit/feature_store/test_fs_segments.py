import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from feature_store.segments import (
    METHODS,
    behavioural_columns,
    dbscan_params,
    knee_index,
    segment_users,
    segmentation_features,
)

CATEGORIES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One OpenMP/BLAS thread: on a shared 2-core box, busy-waiting threads slow t-SNE and K-Means 30x."""
    with threadpool_limits(1):
        yield


def _blobs(per_group=60, seed=0):
    """3 groups of users: group g likes categories 2g and 2g+1; other features are shared noise."""
    rng = np.random.default_rng(seed)
    rows, truth = [], []
    for g in range(3):
        for i in range(per_group):
            affinity = rng.uniform(0.0, 0.05, len(CATEGORIES))
            affinity[2 * g : 2 * g + 2] += rng.uniform(0.35, 0.45, 2)
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


def test_behavioural_columns_are_cat_share_and_activity():
    profiles, _ = _blobs(per_group=3)
    cols = behavioural_columns(profiles)
    assert "events_30d" not in cols and "age" not in cols
    assert len(cols) == len(CATEGORIES) + 4
    with_activity = profiles.assign(decayed_activity=np.arange(len(profiles), dtype=float))
    assert behavioural_columns(with_activity)[-1] == "decayed_activity"


def test_features_are_standardized_with_log_activity_and_drop_constants():
    profiles, _ = _blobs(per_group=5)
    profiles = profiles.assign(decayed_activity=np.exp(np.arange(len(profiles), dtype=float)) - 1, share_tv=0.0)
    x, names = segmentation_features(profiles)
    assert "share_tv" not in names and names[-1] == "log1p(decayed_activity)"
    assert x.shape == (len(profiles), len(names))
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x.std(axis=0), 1.0)
    # log1p makes the exponential activity linear in the row number, hence evenly spaced.
    assert np.allclose(np.diff(x[:, -1]), np.diff(x[:, -1])[0])


def test_recovers_three_groups_and_picks_k3():
    profiles, truth = _blobs()
    seg = segment_users(profiles, k_min=2, k_max=6, seed=0)
    assert seg.k == 3
    assert set(seg.candidates) == {2, 3, 4, 5, 6}
    assert max(seg.candidates, key=seg.candidates.get) == 3
    assert seg.method in METHODS
    assert list(seg.labels.index) == profiles["user_id"].tolist()
    assert adjusted_rand_score(truth, seg.labels.to_numpy()) >= 0.9
    assert seg.score > 0.3
    assert set(seg.methods) == set(METHODS) == set(seg.method_labels)
    assert seg.score == max(r.silhouette for r in seg.methods.values())
    gmm = seg.methods["gmm"]
    assert set(gmm.bic_by_k) == {2, 3, 4, 5, 6} and gmm.k == min(gmm.bic_by_k, key=gmm.bic_by_k.get)
    assert set(seg.methods["agglomerative"].silhouette_by_k) == {2, 3, 4, 5, 6}
    for name, labels in seg.method_labels.items():
        assert adjusted_rand_score(truth, labels.to_numpy()) >= 0.9, name
    assert seg.sample_size == len(profiles)


def test_to_dict_is_json_ready_with_every_candidate():
    import json

    profiles, _ = _blobs(per_group=20)
    seg = segment_users(profiles, k_min=2, k_max=4)
    record = json.loads(json.dumps(seg.to_dict()))
    assert record["method"] == seg.method and record["k"] == seg.k
    assert sum(record["sizes"]) == len(profiles)
    assert set(record["methods"]["kmeans"]["silhouette_by_k"]) == {"2", "3", "4"}
    assert set(record["methods"]["gmm"]["bic_by_k"]) == {"2", "3", "4"}
    assert 0.0 <= record["methods"]["dbscan"]["noise_share"] <= 1.0
    assert record["methods"]["dbscan"]["params"]["eps"] > 0


def test_is_deterministic_for_a_seed():
    profiles, _ = _blobs(per_group=20)
    a = segment_users(profiles, k_max=4, seed=3)
    b = segment_users(profiles, k_max=4, seed=3)
    pd.testing.assert_series_equal(a.labels, b.labels)
    assert a.candidates == b.candidates
    assert a.to_dict() == b.to_dict()


def _gaussian_blobs(centres, per_blob=100, dim=6, scale=0.3, seed=0):
    """Profiles whose ``cat_*`` columns are isotropic Gaussian blobs around ``centres`` (rows)."""
    rng = np.random.default_rng(seed)
    x = np.vstack([c + rng.normal(0.0, scale, (per_blob, dim)) for c in centres])
    truth = np.repeat(np.arange(len(centres)), per_blob)
    frame = pd.DataFrame(x, columns=[f"cat_{j}" for j in range(dim)])
    return frame.assign(user_id=[f"u{i}" for i in range(len(frame))]), truth


CENTRES = 5.0 * np.eye(6)[:3]


def test_dbscan_and_ward_recover_well_separated_blobs():
    profiles, truth = _gaussian_blobs(CENTRES)
    seg = segment_users(profiles, k_min=2, k_max=6)
    dbscan, ward = seg.methods["dbscan"], seg.methods["agglomerative"]
    assert dbscan.k == 3 and ward.k == 3
    assert max(ward.silhouette_by_k, key=ward.silhouette_by_k.get) == 3
    assert seg.components == 2  # three centres span a plane
    assert dbscan.params["min_samples"] == 4  # 2 * dimension
    assert dbscan.noise_share < 0.1
    for name in ("dbscan", "agglomerative", "kmeans"):
        assert adjusted_rand_score(truth, seg.method_labels[name].to_numpy()) == pytest.approx(1.0), name
    assert seg.k == 3


def test_dbscan_assigns_noise_to_the_nearest_centroid():
    profiles, truth = _gaussian_blobs(CENTRES)
    # Three lone users, each far out but closest to one blob.
    outliers = pd.DataFrame(1.8 * CENTRES + np.array([0, 0, 0, 3.0, -3.0, 3.0]), columns=profiles.columns[:-1])
    profiles = pd.concat([profiles, outliers.assign(user_id=["o0", "o1", "o2"])], ignore_index=True)
    seg = segment_users(profiles, k_min=2, k_max=5)
    dbscan = seg.methods["dbscan"]
    assert dbscan.k == 3
    assert dbscan.noise_share >= 3 / len(profiles)
    labels = seg.method_labels["dbscan"]
    for j in range(3):
        blob = labels.iloc[np.flatnonzero(truth == j)]
        assert blob.nunique() == 1 and labels[f"o{j}"] == blob.iloc[0]


def test_knee_of_a_hockey_stick_and_none_for_a_line():
    curve = np.concatenate([np.linspace(0.0, 1.0, 90), np.linspace(1.5, 10.0, 10)])
    assert knee_index(curve) == 89
    assert knee_index(np.linspace(0.0, 1.0, 50)) is None
    assert knee_index(np.ones(10)) is None


def test_dbscan_eps_falls_back_to_a_quantile_without_knee():
    # A regular 50-gon: every point's k-distance is the same chord, so the curve is flat.
    angle = 2 * np.pi * np.arange(50) / 50
    params = dbscan_params(np.column_stack([np.cos(angle), np.sin(angle)]))
    assert params["eps_rule"].startswith("quantile") and params["min_samples"] == 4
    assert params["eps"] == pytest.approx(2 * np.sin(2 * np.pi / 50))  # two steps round the polygon


def test_a_tiny_outlying_cluster_is_not_kept_as_a_segment():
    profiles, truth = _gaussian_blobs(CENTRES)
    # Three users close together, off the first blob: 3 < 1% of 303 users (rounded up, 4).
    trio = CENTRES[0] + np.array([0, 0, 0, 3.0, 3.0, 0]) + np.random.default_rng(1).normal(0.0, 0.1, (3, 6))
    trio = pd.DataFrame(trio, columns=profiles.columns[:-1]).assign(user_id=["t0", "t1", "t2"])
    seg = segment_users(pd.concat([profiles, trio], ignore_index=True), k_min=2, k_max=5)
    kmeans = seg.methods["kmeans"]
    assert max(kmeans.silhouette_by_k, key=kmeans.silhouette_by_k.get) == 4  # the trio split off scores best
    assert kmeans.k == 3 and kmeans.eligible and seg.k == 3
    assert all(r.k == 3 for r in seg.methods.values())
    assert adjusted_rand_score(truth, seg.labels.to_numpy()[:-3]) == pytest.approx(1.0)


def test_principal_components_keep_the_signal_dimensions_only():
    from feature_store.segments import principal_components

    rng = np.random.default_rng(0)
    n = 1000
    signal = rng.choice([-2.0, 2.0], size=(n, 2)) + rng.normal(0.0, 0.3, (n, 2))  # four corners of a square
    x = np.hstack([signal, signal @ rng.normal(size=(2, 3)), rng.normal(size=(n, 8))])  # 3 mixed, 8 noise columns
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    scores = principal_components(x)
    assert scores.shape == (n, 2)
    assert principal_components(rng.normal(size=(n, 5))).shape == (n, 2)  # pure noise: the minimum of two
