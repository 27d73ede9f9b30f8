"""Serving extras added to a bundle at publish time from the run's segmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from fixtures_serving import PAIRS, tiny_bundle

from core.run_context import RunContext
from serving.publish import add_serving_extras
from serving.segments import SegmentProfiles
from training.bundle import load_bundle
from training.models import InteractionMatrix, popularity


def _run_with_segments(root: Path) -> RunContext:
    run = RunContext.open(root) if root.exists() else RunContext(run_id="r1", root=root)
    train = pd.DataFrame(PAIRS, columns=["user_id", "item_id"]).assign(
        confidence=1.0, timestamp=pd.Timestamp("2024-01-01", tz="UTC")
    )
    for name, frame in (("train", train), ("test", train.head(2))):
        (run.split_dir / name).mkdir(parents=True)
        frame.to_parquet(run.split_dir / name / "part-0.parquet")
    (run.features_dir / "segments").mkdir(parents=True)
    pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4", "u5"], "segment": [0, 0, 1, 0, 1]}).to_parquet(
        run.features_dir / "segments" / "segments.parquet"
    )
    (run.clean_dir / "users").mkdir(parents=True)
    pd.DataFrame(
        {"user_id": ["u1", "u2", "u3", "u4", "u5"], "age": [20, 22, 60, 25, 70], "gender": ["F", "F", "M", "F", "M"]}
    ).to_parquet(run.clean_dir / "users" / "part-0.parquet")
    (run.clean_dir / "interactions").mkdir(parents=True)
    train.assign(device=["mobile"] * 10 + ["tv"] * 4).to_parquet(run.clean_dir / "interactions" / "part-0.parquet")
    return run


def test_segment_files_match_the_run(tmp_path: Path) -> None:
    bundle_dir = tiny_bundle(tmp_path / "bundle")
    assert add_serving_extras(bundle_dir, RunContext(run_id="empty", root=tmp_path / "empty")) == []
    run = _run_with_segments(tmp_path / "run")
    written = add_serving_extras(bundle_dir, run)
    assert written == ["serving/segment_popularity.npy", "serving/segments.json"]
    bundle = load_bundle(bundle_dir)  # the training loader ignores the extra folder
    profiles = SegmentProfiles.load(bundle_dir, bundle.n_items)
    assert profiles.labels == ["0", "1"] and profiles.sizes.tolist() == [3, 2]
    data = InteractionMatrix.from_frame(pd.DataFrame(PAIRS, columns=["user_id", "item_id"]), item_ids=bundle.item_ids)
    rows = [data.user_index[u] for u in ("u3", "u5")]
    np.testing.assert_allclose(profiles.popularity[1], popularity(data.matrix[rows]))
    spec = json.loads((bundle_dir / "serving" / "segments.json").read_text())
    assert spec["numeric"]["age"]["mean"] == [np.mean([20, 22, 25]), 65.0]
    # Laplace-smoothed device shares of each segment's events: segment 0 (u1, u2, u4) had
    # 7 mobile events and 1 tv event (u4's second), segment 1 (u3, u5) 3 and 3.
    device = spec["categorical"]["device"]
    assert device["values"] == ["mobile", "tv"]
    assert device["shares"] == [[(7 + 1) / (8 + 2), (1 + 1) / (8 + 2)], [(3 + 1) / (6 + 2), (3 + 1) / (6 + 2)]]
    assert profiles.nearest({"device": "tv"})[0] == 1 and profiles.nearest({"age": 21, "gender": "F"})[0] == 0


def test_publish_stores_the_ann_indexes_serving_then_reads(tmp_path: Path, caplog) -> None:
    """The float and INT8 indexes are written at publish; serving reads the one whose key
    (vectors + candidate count) matches, answers as with a freshly built index, and rebuilds
    when the key differs or the stored file is damaged."""
    from fixtures_serving import hybrid_bundle

    from core.settings import ServingSettings
    from serving.recommender import RecommendationRequest, ServedModel

    bundle_dir = hybrid_bundle(tmp_path / "bundle", segments=False)
    serving = ServingSettings(candidates=10)
    written = add_serving_extras(bundle_dir, RunContext(run_id="empty", root=tmp_path / "empty"), serving)
    stored = sorted({Path(f).parent for f in written})
    assert len(stored) == 2 and all(d.parts[0] == "ann" for d in stored)  # float and INT8 vectors differ
    assert sorted(Path(f).name for f in written) == ["index.faiss", "index.faiss", "index.json", "index.json"]
    bundle = load_bundle(bundle_dir)
    fresh = ServedModel(bundle, None, serving)
    assert fresh.ann_origin == "built"
    for quantized in (False, True):
        model = ServedModel(bundle, bundle_dir, serving.model_copy(update={"quantized": quantized}))
        assert model.ann_origin == "stored" and model.describe()["ann_origin"] == "stored"
    model = ServedModel(bundle, bundle_dir, serving)
    assert model.index.describe() == fresh.index.describe()
    for user in ("u0", "u1", "u7"):
        query = model.space.query(model.scorer.prepare(bundle.row(user, np.empty(0, np.int32)), user))
        assert model.index.search(query, 10).tolist() == fresh.index.search(query, 10).tolist()
        request = RecommendationRequest(user, 5)
        assert model.recommend(request, []) == fresh.recommend(request, [])
    assert ServedModel(bundle, bundle_dir, ServingSettings(candidates=12)).ann_origin == "built"
    for directory in stored:
        (bundle_dir / directory / "index.faiss").write_bytes(b"not an index")
    with caplog.at_level("WARNING", logger="serving.recommender"):
        assert ServedModel(bundle, bundle_dir, serving).ann_origin == "built"
    assert "unreadable ANN index" in caplog.text
