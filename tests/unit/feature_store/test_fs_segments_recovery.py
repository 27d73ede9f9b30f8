"""Segmentation recovers the latent taste groups of the synthetic generator, and the
segment stage writes its pictures and reports."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from core.datasets.synthetic import generate
from feature_store.profiles import build_user_profiles
from feature_store.segments import METHODS, plot_segments, segment_users

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One OpenMP/BLAS thread: on a shared 2-core box, busy-waiting threads slow t-SNE and K-Means 30x."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Profiles of a 20k-event, 4-group synthetic dataset and its ground-truth groups."""
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, events=20_000, groups=4, seed=0, progress=False)
    interactions = pd.read_parquet(root / "interactions")
    if "confidence" not in interactions.columns:
        interactions["confidence"] = 1.0
    items = pd.read_parquet(root / "items.parquet")
    users = pd.read_parquet(root / "users.parquet")
    profiles = build_user_profiles(
        interactions, items, users, as_of=interactions["timestamp"].max(), half_life_days=14.0
    )
    truth = pd.read_parquet(root / "ground_truth" / "users.parquet")
    return profiles, truth.set_index(truth["user_id"].astype(str))["group"]


@pytest.fixture(scope="module")
def segmentation(synthetic):
    profiles, _ = synthetic
    return segment_users(profiles, k_min=2, k_max=8, seed=0)


def _ari(truth: pd.Series, labels: pd.Series) -> float:
    common = truth.index.intersection(labels.index)
    assert len(common) == len(truth)  # every ground-truth user is segmented
    return adjusted_rand_score(truth[common].to_numpy(), labels[common].to_numpy())


def test_recovers_the_latent_groups(synthetic, segmentation):
    _, truth = synthetic
    ari = {m: round(_ari(truth, labels), 3) for m, labels in segmentation.method_labels.items()}
    print(f"chosen={segmentation.method} k={segmentation.k} ARI by method: {ari}")
    assert segmentation.k == 4
    assert _ari(truth, segmentation.labels) >= 0.8
    assert segmentation.methods["kmeans"].k == 4
    assert ari["kmeans"] >= 0.8 and ari["agglomerative"] >= 0.8


def test_pictures_are_valid_pngs(synthetic, segmentation, tmp_path):
    import matplotlib.image

    profiles, _ = synthetic
    paths = plot_segments(profiles, segmentation, tmp_path)
    assert [p.name for p in paths] == ["segments_tsne.png", "segments_umap.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 1024
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_plot_rejects_users_without_a_segment(synthetic, segmentation, tmp_path):
    profiles, _ = synthetic
    stranger = profiles.head(1).assign(user_id="nobody")
    with pytest.raises(ValueError, match="has no segment"):
        plot_segments(pd.concat([profiles, stranger]), segmentation, tmp_path)


def test_segment_stage_writes_reports_and_pictures(settings, synthetic, monkeypatch):
    from core.run_context import RunContext
    from feature_store import stage
    from feature_store.offline import write_offline_snapshot

    profiles, _ = synthetic
    run = RunContext.create(settings, "segments-stage-test")
    write_offline_snapshot(profiles, run.features_dir / "offline", pd.Timestamp("2026-01-31", tz="UTC"))
    written = {}

    class FakeStore:
        def materialize(self, frame, version):
            written["frame"], written["version"] = frame, version
            return len(frame)

        def close(self):
            written["closed"] = True

    monkeypatch.setattr(stage, "online_store", lambda s: FakeStore())
    result = stage.segment(settings, run)

    out = run.features_dir / "segments"
    for name in ("segments.parquet", "summary.csv", "summary.md", "segments_tsne.png", "segments_umap.png"):
        assert (out / name).is_file(), name
    record = json.loads((run.root / "segments.json").read_text())
    assert record == json.loads(json.dumps(result))
    assert record["method"] in METHODS and record["k"] >= 2
    assert set(record["methods"]) == set(METHODS)
    assert (
        len(record["methods"]["kmeans"]["silhouette_by_k"])
        == settings.segmentation.k_max - settings.segmentation.k_min + 1
    )
    assert record["methods"]["gmm"]["bic_by_k"]
    assert sum(record["sizes"]) == len(profiles)
    summary = pd.read_csv(out / "summary.csv")
    assert summary["size"].sum() == len(profiles) and len(summary) == record["k"]
    markdown = (out / "summary.md").read_text()
    assert f"{record['method']}, k={record['k']}" in markdown and "| dbscan |" in markdown
    assert written["closed"] and written["frame"]["segment"].notna().all()
    labels = pd.read_parquet(out / "segments.parquet")
    assert np.array_equal(np.sort(labels["segment"].unique()), np.arange(record["k"]))
