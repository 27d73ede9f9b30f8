"""What is registered is what is served: the model registered in MLflow (loaded back with
``mlflow.pyfunc.load_model``) and ``GET /v1/recommendations/{user_id}`` of the serving app
on the published registered bundle give the same top-10 (same items, same order) for 200
users: known users on the global neural model, users routed to a segment's fine-tuned model,
and cold-start users.

The flow is the pipeline's: the register task's pyfunc (:class:`serving.publish.ServedPyfunc`)
is logged over a bundle with its serving files (segment popularity, stored ANN indexes), the
registered artifact is downloaded and published, and the app serves it. ANN retrieval is on
(``candidates`` below the catalogue size).
"""

from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import hybrid_bundle

from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.app import create_app
from serving.publish import ServedPyfunc, write_ann_indexes
from serving.store import publish
from training.bundle import load_bundle
from training.registry import bundle_dir_of, log_and_register

KNOWN_USERS = 120  # of which the even-numbered half ("young") is routed to a segment model
COLD_USERS = 80
K = 10


@pytest.fixture(scope="module")
def settings(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("registered-is-served")
    return load_settings(
        home=str(root / "home"),
        object_store={"uri": str(root / "store")},
        online_store={"url": None},  # the app starts an embedded Valkey server of its own
        mlflow={"registered_model": "test-registered-is-served"},
        serving={"namespace": "registered-is-served", "reload_interval_s": 0, "candidates": K, "cache_ttl_s": 0},
    )


@pytest.fixture(scope="module")
def registered(settings: Settings, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bundle")
    bundle_dir = hybrid_bundle(root / "hybrid", "v1", segment_models=True, n_users=KNOWN_USERS)
    assert write_ann_indexes(bundle_dir, settings.serving)  # as the register task stores them
    reg = log_and_register(
        settings,
        run_name="registered-is-served",
        params={"model": "hybrid"},
        metrics={},
        bundle_dir=bundle_dir,
        artifact_dirs={},
        tags={"hyperrec.model": "hybrid"},
        python_model=ServedPyfunc(settings.serving),
    )
    # Publishing copies the registered artifact, as serving.publish.publish_champion does.
    downloaded = bundle_dir_of(settings, reg.version, root / "download")
    publish(downloaded, ObjectStore(settings.object_store_uri), f"v{reg.version}")
    return {"registration": reg, "bundle": load_bundle(downloaded)}


def test_the_registered_model_ranks_exactly_as_the_api(settings: Settings, registered: dict) -> None:
    bundle = registered["bundle"]
    neural = bundle.model.components["neural"]
    known = sorted(bundle.history, key=lambda u: int(u[1:]))
    assert len(known) == KNOWN_USERS
    routed = [u for u in known if neural.segment_of(u) is not None]
    assert len(routed) == KNOWN_USERS // 2 and len(neural.segment_labels()) == 1
    cold = [f"new-{n:03d}" for n in range(COLD_USERS)]
    users = known + cold
    assert len(users) == 200

    model = mlflow.pyfunc.load_model(registered["registration"].model_uri)
    predicted = model.predict(pd.DataFrame({"user_id": users, "k": [K] * len(users)}))
    assert list(predicted.columns) == ["user_id", "item_id", "rank", "score"]
    by_user = {u: frame.sort_values("rank") for u, frame in predicted.groupby("user_id", sort=False)}

    retrieval, segments = set(), set()
    with TestClient(create_app(settings)) as client:
        for user in users:
            response = client.get(f"/v1/recommendations/{user}", params={"k": K})
            assert response.status_code == 200, response.text
            body = response.json()
            served = [item["item_id"] for item in body["items"]]
            registered_items = by_user[user]
            assert registered_items["item_id"].tolist() == served, user
            assert registered_items["rank"].tolist() == list(range(1, len(served) + 1))
            np.testing.assert_allclose(
                registered_items["score"].to_numpy(), [item["score"] for item in body["items"]], rtol=1e-6
            )
            assert len(served) == K and body["cold_start"] == (user in cold)
            retrieval.add(body["retrieval"])
            segments.add(body["segment"])
    assert "ann" in retrieval  # candidates were retrieved by the ANN index, not all scored
    assert segments == {None, "young"}  # both the global and a segment's fine-tuned model ranked
