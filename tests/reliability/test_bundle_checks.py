"""Bundles are checked before they serve (issue 14, item 6): a NaN bundle, a version that
differs from ``CURRENT``, a canary ranking that does not reproduce and a corrupt neural
``model.pt`` are refused with a non-empty reason, once, while the old model keeps serving."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import hybrid_bundle, tiny_bundle

from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.api.metrics import ServingMetrics
from serving.api.state import ServingState
from serving.app import create_app
from serving.bundle_checks import CANARY_FILE, BundleRefused, check_canary, check_finite, write_canary
from serving.store import CURRENT, publish
from training.bundle import load_bundle


@pytest.fixture(scope="module")
def valkey_url():
    from feature_store.online import open_redis

    with open_redis(None) as server:
        yield server.url


def make_settings(tmp_path: Path, valkey_url: str | None = None) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={"namespace": f"t{uuid.uuid4().hex[:12]}", "reload_interval_s": 0, "candidates": 10},
    )


def poisoned(out_dir: Path, version: str) -> Path:
    """A tiny bundle whose float arrays are all NaN."""
    bundle = tiny_bundle(out_dir, version)
    for name in ("bias.npy", "popularity.npy", "weights.npy"):
        if (bundle / name).is_file():
            array = np.load(bundle / name)
            np.save(bundle / name, np.full_like(array, np.nan))
    return bundle


def test_nan_bundle_is_refused_once_while_the_old_one_answers(tmp_path: Path, valkey_url: str) -> None:
    settings = make_settings(tmp_path, valkey_url)
    store = ObjectStore(settings.object_store_uri)
    publish(tiny_bundle(tmp_path / "b1", "v1"), store, "v1")
    with TestClient(create_app(settings)) as client:
        state = client.app.state.serving
        publish(poisoned(tmp_path / "b2", "v2"), store, "v2")
        attempts = state.load_attempts
        for _ in range(5):  # five polls
            assert state.refresh().version == "v1"
        assert state.load_attempts == attempts + 1  # refused once, not retried
        assert (
            "refused bundle 'v2'" in state.error and "not finite" in state.error and "still serving v1" in state.error
        )
        body = client.get("/v1/recommendations/u1", params={"k": 3}).json()
        assert body["model_version"] == "v1" and all(item["score"] == item["score"] for item in body["items"])
        ready = client.get("/readyz").json()
        assert ready["model_version"] == "v1" and "not finite" in ready["reload_error"]
        assert 'hyperrec_model_reloads_total{outcome="refused"} 1.0' in client.get("/metrics").text
        publish(tiny_bundle(tmp_path / "b3", "v3"), store, "v3")  # CURRENT moves on: loaded
        assert state.refresh().version == "v3" and state.error is None


def test_version_mismatch_is_refused_once(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = ObjectStore(settings.object_store_uri)
    publish(tiny_bundle(tmp_path / "b1", "v1"), store, "v1")
    shutil.copytree(tiny_bundle(tmp_path / "b2", "v9"), store.local_path("v2"))  # says v9, lives at v2
    store.put_bytes(CURRENT, b"v2")
    state = ServingState(store, tmp_path / "cache", settings, ServingMetrics())
    for _ in range(10):
        state.refresh()
    assert state.served is None and state.load_attempts == 1
    assert "metadata.json says version 'v9', but CURRENT names 'v2'" in state.error


def test_canary_must_reproduce(tmp_path: Path) -> None:
    bundle_dir = tiny_bundle(tmp_path / "b", "v1")
    assert write_canary(bundle_dir).name == CANARY_FILE
    spec = json.loads((bundle_dir / CANARY_FILE).read_text())
    assert len(spec["users"]) == 5 and all(len(u["items"]) >= 1 for u in spec["users"].values())
    assert check_canary(load_bundle(bundle_dir), bundle_dir) is True

    weights = np.load(bundle_dir / "weights.npy")  # finite, but not the model the canary came from
    np.save(bundle_dir / "weights.npy", np.roll(weights, 1, axis=1))
    with pytest.raises(BundleRefused, match="canary user .* does not reproduce"):
        check_canary(load_bundle(bundle_dir), bundle_dir)

    (bundle_dir / CANARY_FILE).unlink()  # a bundle published before canaries: skipped
    assert check_canary(load_bundle(bundle_dir), bundle_dir) is False


def test_canary_mismatch_keeps_the_old_model(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    store = ObjectStore(settings.object_store_uri)
    publish(tiny_bundle(tmp_path / "b1", "v1"), store, "v1")
    state = ServingState(store, tmp_path / "cache", settings, ServingMetrics())
    assert state.refresh().version == "v1"
    bad = tiny_bundle(tmp_path / "b2", "v2")
    write_canary(bad)
    spec = json.loads((bad / CANARY_FILE).read_text())
    user = sorted(spec["users"])[0]
    spec["users"][user]["items"] = spec["users"][user]["items"][::-1]
    spec["users"][user]["scores"] = [s + 1.0 for s in spec["users"][user]["scores"]]
    (bad / CANARY_FILE).write_text(json.dumps(spec))
    publish(bad, store, "v2")
    assert state.refresh().version == "v1"
    assert f"canary user {user!r} does not reproduce" in state.error


def test_corrupt_neural_model_is_refused_with_a_message(tmp_path: Path) -> None:
    bundle_dir = hybrid_bundle(tmp_path / "b", "v1", segments=False, n_users=30)
    write_canary(bundle_dir)  # a real hybrid (EASE, neural, content, popularity) reproduces its canary
    assert check_canary(load_bundle(bundle_dir), bundle_dir) is True
    model_files = sorted(bundle_dir.rglob("model.pt"))
    assert model_files
    model_files[0].write_bytes(b"garbage" + bytes(range(256)))
    with pytest.raises(BundleRefused) as refused:
        check_finite(bundle_dir)
    message = str(refused.value)
    assert "model.pt: unreadable (" in message and len(message.split("unreadable (", 1)[1]) > 5
    settings = make_settings(tmp_path)
    store = ObjectStore(settings.object_store_uri)
    publish(bundle_dir, store, "v1")
    state = ServingState(store, tmp_path / "cache", settings, ServingMetrics())
    assert state.refresh() is None
    assert "model.pt: unreadable" in state.error
