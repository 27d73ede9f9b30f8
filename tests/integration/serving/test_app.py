"""The serving app end to end through HTTP, on hand-built bundles."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from fixtures_serving import tiny_bundle

from core.net import free_port
from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.api.state import NO_BUNDLE
from serving.app import create_app
from serving.store import publish
from training.bundle import load_bundle


def build_bundle(out_dir: Path, version: str) -> Path:
    """The app tests' bundle: no categories, registered model version 1, no metrics."""
    return tiny_bundle(out_dir, version, registered_model_version="1", categories=[[]] * 6, metrics={})


def make_settings(
    tmp_path: Path, valkey_url: str | None = None, namespace: str = "hyperrec", **object_store: str
) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store"), **object_store},
        online_store={"url": valkey_url},
        # exposure_strength 0: these tests pin the plain relevance order (re-ranking: test_serving_exposure.py)
        serving={"namespace": namespace, "reload_interval_s": 0, "exposure_strength": 0.0},
    )


@pytest.fixture
def published(tmp_path: Path, valkey_url: str, namespace: str) -> Settings:
    settings = make_settings(tmp_path, valkey_url, namespace)
    publish(build_bundle(tmp_path / "build", "v1"), ObjectStore(settings.object_store_uri), "v1")
    return settings


@pytest.fixture
def client(published: Settings):
    with TestClient(create_app(published)) as c:
        yield c


def recs(client: TestClient, user: str, **params) -> dict:
    response = client.get(f"/v1/recommendations/{user}", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def test_known_user_excludes_seen_sorted_by_score(client: TestClient) -> None:
    body = recs(client, "u4", k=3)
    assert body["user_id"] == "u4" and body["model_version"] == "v1" and body["cold_start"] is False
    items = body["items"]
    assert len(items) == 3 and [i["rank"] for i in items] == [1, 2, 3]
    assert not {"i1", "i3"} & {i["item_id"] for i in items}
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(i["title"] == f"Title {i['item_id']}" for i in items)

    with_seen = recs(client, "u4", k=6, exclude_seen="false")["items"]
    assert {"i1", "i3"} <= {i["item_id"] for i in with_seen}


def test_unknown_user_gets_popularity(client: TestClient, published: Settings) -> None:
    body = recs(client, "new-user:42", k=4)
    assert body["cold_start"] is True
    bundle = load_bundle(Path(published.object_store_uri) / "v1")
    assert [i["item_id"] for i in body["items"]] == ["i1", "i2", "i3", "i4"]
    assert [i["score"] for i in body["items"]] == pytest.approx(sorted(bundle.popularity, reverse=True)[:4])


def test_event_changes_next_recommendations(client: TestClient) -> None:
    before = recs(client, "u4", k=3)["items"]
    top = before[0]["item_id"]
    response = client.post("/v1/events", json={"user_id": "u4", "item_id": top, "event_type": "click"})
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] is True

    after = recs(client, "u4", k=3)["items"]
    assert top not in {i["item_id"] for i in after}
    assert after != before
    assert not {"i1", "i3"} & {i["item_id"] for i in after}

    # An unknown user's live events make it a scored (still cold-start) list without those items.
    client.post("/v1/events", json={"user_id": "fresh", "item_id": "i6", "event_type": "rate", "rating": 5})
    fresh = recs(client, "fresh", k=5)
    assert fresh["cold_start"] is True and "i6" not in {i["item_id"] for i in fresh["items"]}


@pytest.mark.parametrize(
    "payload, needle",
    [
        ({"user_id": "u1", "item_id": "nope-99", "event_type": "view"}, "nope-99"),
        ({"user_id": "u1", "item_id": "i1", "event_type": "teleport"}, "event_type"),
        ({"user_id": "bad user", "item_id": "i1", "event_type": "view"}, "user_id"),
        ({"user_id": "u1", "item_id": "i1", "event_type": "view", "rating": 4}, "rating is only allowed"),
        ({"user_id": "u1", "item_id": "i1", "event_type": "rate", "rating": 9}, "rating"),
    ],
)
def test_bad_events_are_rejected(client: TestClient, payload: dict, needle: str) -> None:
    response = client.post("/v1/events", json=payload)
    assert response.status_code == 422
    assert needle in response.text
    assert client.portal.call(client.app.state.events.recent_items, "u1") == []


@pytest.mark.parametrize("query", ["k=0", "k=101", "k=ten"])
def test_bad_k_is_422(client: TestClient, query: str) -> None:
    assert client.get(f"/v1/recommendations/u1?{query}").status_code == 422


def test_bad_user_id_is_422(client: TestClient) -> None:
    assert client.get("/v1/recommendations/" + "a" * 129).status_code == 422
    assert client.get("/v1/recommendations/bad%20user").status_code == 422
    assert client.get("/v1/recommendations/" + "a" * 128).status_code == 200


def test_probes_metrics_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "v1"
    recs(client, "u1")
    recs(client, "u2")
    client.get("/v1/recommendations/u1?k=0")
    text = client.get("/metrics").text
    assert "hyperrec_request_latency_seconds_bucket" in text
    assert 'route="/v1/recommendations/{user_id}"' in text and 'route="/v1/recommendations/u1"' not in text
    assert 'hyperrec_requests_total{method="GET",route="/v1/recommendations/{user_id}",status="200"} 2.0' in text
    assert 'hyperrec_requests_total{method="GET",route="/v1/recommendations/{user_id}",status="422"} 1.0' in text
    assert (
        'hyperrec_model_info{ann="none",model_name="ease",quantized="false",registered_model_version="1",'
        'version="v1"} 1.0'
    ) in text
    assert 'hyperrec_cache_requests_total{result="miss"} 2.0' in text
    assert client.get("/docs").status_code == 200
    assert "/v1/events" in client.get("/openapi.json").json()["paths"]


def _wait_for_version(client: TestClient, version: str, timeout_s: float = 20) -> dict:
    """``/readyz`` once it reports ``version`` (the poller loads it; /readyz only reports)."""
    import time

    deadline = time.monotonic() + timeout_s
    while (body := client.get("/readyz").json()).get("model_version") != version:
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    return body


def test_not_ready_until_published_then_hot_reload(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)  # online_store.url None: the app starts its own Valkey
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"reload_interval_s": 0.1})})
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["detail"] == NO_BUNDLE
        response = client.get("/v1/recommendations/u1")
        assert response.status_code == 503 and "make demo" in response.json()["detail"]
        event = {"user_id": "u1", "item_id": "i1", "event_type": "view"}
        assert client.post("/v1/events", json=event).status_code == 503
        assert "hyperrec_model_loaded 0.0" in client.get("/metrics").text

        store = ObjectStore(settings.object_store_uri)
        publish(build_bundle(tmp_path / "b1", "v1"), store, "v1")
        _wait_for_version(client, "v1")
        publish(build_bundle(tmp_path / "b2", "v2"), store, "v2")
        _wait_for_version(client, "v2")
        assert recs(client, "u1")["model_version"] == "v2"


def test_two_apps_share_events_but_not_metrics(published: Settings) -> None:
    """Two workers on one Redis: an event posted to one shapes the other's answers."""
    with TestClient(create_app(published)) as a, TestClient(create_app(published)) as b:
        assert "i2" in {i["item_id"] for i in recs(b, "u4", k=4)["items"]}
        a.post("/v1/events", json={"user_id": "u4", "item_id": "i2", "event_type": "like"})
        assert "i2" not in {i["item_id"] for i in recs(a, "u4", k=4)["items"]}
        assert "i2" not in {i["item_id"] for i in recs(b, "u4", k=4)["items"]}
        assert 'hyperrec_events_total{event_type="like"} 1.0' in a.get("/metrics").text
        assert 'hyperrec_events_total{event_type="like"}' not in b.get("/metrics").text


def test_live_history_is_bounded_and_events_reach_the_stream(tmp_path: Path, valkey_url: str, namespace: str) -> None:
    settings = make_settings(tmp_path, valkey_url, namespace)
    settings.serving.live_history = 3
    publish(build_bundle(tmp_path / "b", "v1"), ObjectStore(settings.object_store_uri), "v1")
    with TestClient(create_app(settings)) as client:
        for item in ("i1", "i2", "i3", "i4", "i5"):
            assert (
                client.post("/v1/events", json={"user_id": "a", "item_id": item, "event_type": "view"}).status_code
                == 202
            )
        client.post("/v1/events", json={"user_id": "b", "item_id": "i6", "event_type": "rate", "rating": 4.5})
        events = client.app.state.events
        assert client.portal.call(events.recent_items, "a") == ["i3", "i4", "i5"]
        stream = client.portal.call(events.read_stream, 10)
    assert [(e["user_id"], e["item_id"]) for e in stream] == [("a", f"i{n}") for n in range(1, 6)] + [("b", "i6")]
    assert stream[-1]["event_type"] == "rate" and float(stream[-1]["rating"]) == 4.5 and stream[0]["rating"] == ""


def test_serves_from_s3_store_named_in_settings(
    tmp_path: Path, s3_endpoint: str, valkey_url: str, namespace: str
) -> None:
    endpoint = s3_endpoint
    settings = make_settings(tmp_path, valkey_url, namespace, uri="s3://models/serving", s3_endpoint_url=endpoint)
    publish(build_bundle(tmp_path / "b", "v7"), ObjectStore(settings.object_store_uri, endpoint), "v7")
    with TestClient(create_app(settings)) as client:
        body = recs(client, "u4", k=2)
    assert body["model_version"] == "v7" and len(body["items"]) == 2
    assert (settings.home / "serving" / "bundles" / "v7" / "metadata.json").is_file()


def test_two_worker_server_reports_every_worker_in_metrics(tmp_path: Path) -> None:
    """``hyperrec serve --workers 2``: Prometheus multiprocess mode, so one scrape of
    ``/metrics`` counts every request whichever worker answered it, and both workers' model
    gauges appear (one ``pid`` label each); killing the server with SIGKILL ends its workers."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    import httpx

    home, store_dir = tmp_path / "home", tmp_path / "store"
    publish(build_bundle(tmp_path / "build", "v1"), ObjectStore(str(store_dir)), "v1")
    config = tmp_path / "serve.yaml"
    config.write_text(
        json.dumps({"home": str(home), "object_store": {"uri": str(store_dir)}, "serving": {"reload_interval_s": 0}})
    )
    stale = home / "serving" / "prometheus" / "counter_999999.db"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"left by an earlier server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    server = subprocess.Popen(
        [sys.executable, "-m", "hyperrec.cli", "serve", "--port", str(port), "--workers", "2", "--config", str(config)],
        env=env,
        start_new_session=True,
    )
    try:
        pids: set[str] = set()
        deadline = time.time() + 120
        while len(pids) < 2:  # both workers have loaded v1 (each sets its own model gauge)
            assert server.poll() is None, "server exited"
            assert time.time() < deadline, f"workers with a model after 120 s: {pids}"
            try:
                text = httpx.get(f"{url}/metrics", timeout=5).text
                pids = set(re.findall(r'hyperrec_model_loaded\{pid="(\d+)"\} 1\.0', text))
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert not stale.exists()
        n = 40
        for i in range(n):  # a new connection each: the kernel spreads them over the workers
            assert httpx.get(f"{url}/v1/recommendations/u{i % 5 + 1}", params={"k": 2}, timeout=10).status_code == 200
        text = httpx.get(f"{url}/metrics", timeout=5).text
        total = re.search(
            r'hyperrec_requests_total\{method="GET",route="/v1/recommendations/\{user_id\}",'
            r'status="200"\} ([0-9.]+)',
            text,
        )
        assert total is not None and float(total.group(1)) == n
        versions = re.findall(r'hyperrec_model_info\{[^}]*pid="(\d+)"[^}]*version="v1"\} 1\.0', text)
        assert set(versions) == pids

        server.kill()  # SIGKILL to the server process alone: its workers must not outlive it
        server.wait(timeout=30)
        deadline = time.time() + 30
        while alive := [pid for pid in pids if _running(int(pid))]:
            assert time.time() < deadline, f"workers outlived the killed server: {alive}"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
