"""Bundle format round trips, publishing order, S3 (moto server mode) and the served model on the tiny bundle."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
from fixtures_serving import PAIRS, tiny_bundle

from core.object_store import ObjectStore
from core.settings import ServingSettings
from serving.recommender import RecommendationRequest, ServedModel
from serving.schemas import Recommendations
from serving.store import current_version, fetch, publish
from training.bundle import BUNDLE_FILES, Bundle, load_bundle, write_bundle
from training.models import InteractionMatrix, fit_popularity, popularity


def assert_same_bundle(a: Bundle, b: Bundle) -> None:
    assert a.version == b.version
    assert a.metadata == b.metadata
    assert a.model.name == b.model.name
    np.testing.assert_array_equal(a.model.bias, b.model.bias)
    if a.model.weights is None:
        assert b.model.weights is None
    else:
        np.testing.assert_array_equal(a.model.weights, b.model.weights)
    np.testing.assert_array_equal(a.popularity, b.popularity)
    assert list(a.item_ids) == list(b.item_ids)
    assert list(a.titles) == list(b.titles)
    assert a.categories == b.categories
    assert a.history.keys() == b.history.keys()
    for user in a.history:
        np.testing.assert_array_equal(a.history[user], b.history[user])


def test_local_round_trip(tmp_path: Path) -> None:
    bundle_dir = tiny_bundle(tmp_path / "build")
    store = ObjectStore(str(tmp_path / "store"))
    assert current_version(store) is None

    assert publish(bundle_dir, store, "v1") == "v1"
    assert current_version(store) == "v1"
    loaded = load_bundle(fetch(store, "v1", tmp_path / "cache"))
    original = load_bundle(bundle_dir)
    assert_same_bundle(loaded, original)

    meta = loaded.metadata
    assert meta["version"] == "v1" and meta["model_name"] == "ease" and meta["registered_model_version"] == "3"
    assert meta["metrics"] == {"ndcg@10": 0.5} and meta["k"] == 10 and meta["created_at"]
    assert list(loaded.item_ids) == ["i1", "i2", "i3", "i4", "i5", "i6"]
    assert loaded.titles[0] == "Title i1" and loaded.categories[:2] == [["comedy", "news"], ["drama"]]
    assert sorted(loaded.history["u4"].tolist()) == [0, 2]
    assert loaded.history["u4"].dtype == np.int32
    assert loaded.model.weights.shape == (6, 6)


def test_republish_is_idempotent_and_drops_stale_files(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "store"))
    publish(tiny_bundle(tmp_path / "ease"), store, "v1")
    assert (tmp_path / "store" / "v1" / "weights.npy").is_file()

    # Same version again, now a popularity model without weights: overwritten, not merged.
    pop_dir = tiny_bundle(tmp_path / "pop", model_kind="popularity")
    publish(pop_dir, store, "v1")
    publish(pop_dir, store, "v1")
    assert current_version(store) == "v1"
    assert not (tmp_path / "store" / "v1" / "weights.npy").exists()
    loaded = load_bundle(fetch(store, "v1", tmp_path / "cache"))
    assert loaded.model.name == "popularity" and loaded.model.weights is None
    assert_same_bundle(loaded, load_bundle(pop_dir))


def test_current_is_written_last(tmp_path: Path) -> None:
    store = ObjectStore(str(tmp_path / "store"))
    publish(tiny_bundle(tmp_path / "v1"), store, "v1")

    broken = tiny_bundle(tmp_path / "v2", version="v2")
    (broken / "user_history.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="user_history.parquet"):
        publish(broken, store, "v2")
    assert current_version(store) == "v1"
    assert store.list("v2") == []

    with pytest.raises(ValueError, match="metadata.json says version 'v1'"):
        publish(tmp_path / "v1", store, "v3")
    assert current_version(store) == "v1"

    publish(tiny_bundle(tmp_path / "v2b", version="v2"), store, "v2")
    assert current_version(store) == "v2"
    assert store.list("v1")  # old versions stay for rollback


def test_s3_publish_and_fetch(tmp_path: Path, s3_endpoint: str) -> None:
    store = ObjectStore("s3://bundles/recsys/prod", s3_endpoint_url=s3_endpoint)
    assert current_version(store) is None
    bundle_dir = tiny_bundle(tmp_path / "build")

    publish(bundle_dir, store, "v1")
    assert current_version(store) == "v1"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bundles")["Contents"]}
    assert keys == {"recsys/prod/CURRENT"} | {f"recsys/prod/v1/{name}" for name in BUNDLE_FILES}
    assert s3.get_object(Bucket="bundles", Key="recsys/prod/CURRENT")["Body"].read() == b"v1"

    dest = fetch(store, "v1", tmp_path / "cache" / "v1")
    assert dest == tmp_path / "cache" / "v1"
    assert_same_bundle(load_bundle(dest), load_bundle(bundle_dir))

    with pytest.raises(FileNotFoundError, match="'v9' not found"):
        fetch(store, "v9", tmp_path / "cache" / "v9")


def test_load_bundle_names_the_bad_file(tmp_path: Path) -> None:
    bundle_dir = tiny_bundle(tmp_path / "b")
    (bundle_dir / "items.parquet").rename(tmp_path / "items.parquet")
    with pytest.raises(FileNotFoundError, match="missing items.parquet"):
        load_bundle(bundle_dir)
    (tmp_path / "items.parquet").rename(bundle_dir / "items.parquet")

    np.save(bundle_dir / "popularity.npy", np.ones(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"popularity.npy: expected shape \(6,\)"):
        load_bundle(bundle_dir)

    (bundle_dir / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json: invalid JSON"):
        load_bundle(bundle_dir)

    with pytest.raises(FileNotFoundError, match="bundle directory not found"):
        load_bundle(tmp_path / "nowhere")


def test_write_bundle_validates_inputs(tmp_path: Path) -> None:
    data = InteractionMatrix.from_frame(pd.DataFrame(PAIRS, columns=["user_id", "item_id"]))
    args = dict(
        model=fit_popularity(data.matrix),
        item_ids=data.item_ids,
        titles=list(data.item_ids),
        categories=[[]] * 6,
        history={"u1": [0, 1]},
        popularity=popularity(data.matrix),
        metadata={"version": "v1", "metrics": {}, "k": 10},
    )
    with pytest.raises(ValueError, match="missing keys \\['k'\\]"):
        write_bundle(tmp_path / "a", **{**args, "metadata": {"version": "v1", "metrics": {}}})
    with pytest.raises(ValueError, match="titles: expected shape \\(6,\\)"):
        write_bundle(tmp_path / "b", **{**args, "titles": ["x"] * 5})
    with pytest.raises(ValueError, match="user 'u1': item index out of range"):
        write_bundle(tmp_path / "c", **{**args, "history": {"u1": [0, 6]}})
    with pytest.raises(ValueError, match="invalid bundle version"):
        write_bundle(tmp_path / "d", **{**args, "metadata": {"version": "../x", "metrics": {}, "k": 1}})
    json.loads((write_bundle(tmp_path / "ok", **args) / "metadata.json").read_text())


def test_served_model_on_a_tiny_bundle(tmp_path: Path) -> None:
    """Known, unknown and live users through :class:`serving.recommender.ServedModel` (the
    one ranking of a bundle) on the hand-built EASE bundle."""
    bundle = load_bundle(tiny_bundle(tmp_path / "b"))
    served = ServedModel(bundle, None, ServingSettings(exposure_strength=0.0))  # the plain relevance order
    ids = list(bundle.item_ids)

    def ask(user: str, k: int, recent: tuple[str, ...] = (), exclude_seen: bool = True) -> Recommendations:
        return served.recommend(RecommendationRequest(user, k, exclude_seen), list(recent))

    # Known user: seen items excluded, scores descending, same order as the model itself.
    known = ask("u4", 3)
    assert known.cold_start is False and known.strategy == "personalized"
    assert not {"i1", "i3"} & {r.item_id for r in known.items}
    scores = [r.score for r in known.items]
    assert scores == sorted(scores, reverse=True) and [r.rank for r in known.items] == [1, 2, 3]
    expected = bundle.model.recommend(bundle.row("u4", np.array([], dtype=np.int32)), k=3)[0]
    assert [r.item_id for r in known.items] == [ids[i] for i in expected]
    assert known.items[0].title == f"Title {known.items[0].item_id}"

    # Asking for more than is left returns only the unseen items.
    assert len(ask("u4", 50).items) == 4
    assert {r.item_id for r in ask("u4", 50, exclude_seen=False).items} == set(ids)

    # A live item joins the history: excluded and it changes the list.
    live = ask("u4", 3, ("i2", "not-in-bundle"))
    assert live.cold_start is False and "i2" not in {r.item_id for r in live.items}
    assert live.items != known.items

    # Unknown user, nothing live: popularity order, cold start.
    pop = ask("stranger", 6)
    assert pop.cold_start is True and pop.strategy == "global_popularity"
    assert [r.item_id for r in pop.items] == [ids[i] for i in np.lexsort((np.arange(6), -bundle.popularity))]
    assert [r.score for r in pop.items] == pytest.approx(sorted(bundle.popularity.tolist(), reverse=True))

    # Unknown user with live items: scored from the session, still a cold start.
    warm = ask("stranger", 6, ("i5",))
    assert warm.cold_start is True and warm.strategy == "session+global_popularity"
    assert "i5" not in {r.item_id for r in warm.items} and len(warm.items) == 5
