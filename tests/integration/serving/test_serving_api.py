"""The serving API over HTTP on a real fitted hybrid, with a real Valkey server: cache and its
invalidation, events, filters, MMR, explanations, cold start, admin auth, INT8, hot reload
under load, S3 publishing of blend bundles and a schemathesis fuzz run."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from fixtures_serving import LiveServer, hybrid_bundle

from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.app import create_app
from serving.store import current_version, fetch, publish
from training.bundle import load_bundle
from training.hybrid import WeightedHybrid

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {"v1": hybrid_bundle(root / "v1", "v1", seed=0), "v2": hybrid_bundle(root / "v2", "v2", seed=1)}


def make_settings(tmp_path: Path, valkey_url: str, namespace: str, **serving) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={"namespace": namespace, "reload_interval_s": 0, "candidates": 10, **serving},
    )


@pytest.fixture
def settings(tmp_path: Path, valkey_url: str, namespace: str, built) -> Settings:
    settings = make_settings(tmp_path, valkey_url, namespace, admin_token=TOKEN)
    publish(built["v1"], ObjectStore(settings.object_store_uri), "v1")
    return settings


@pytest.fixture
def client(settings: Settings):
    with TestClient(create_app(settings)) as c:
        yield c


def get(client, user: str, **params) -> httpx.Response:
    response = client.get(f"/v1/recommendations/{user}", params=params)
    assert response.status_code == 200, response.text
    return response


def ids(response: httpx.Response) -> list[str]:
    return [i["item_id"] for i in response.json()["items"]]


def test_second_call_is_a_cache_hit_and_an_event_invalidates(client: TestClient) -> None:
    first = get(client, "u3", k=5, explain="true")
    second = get(client, "u3", k=5, explain="true")
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.content == first.content
    other = get(client, "u3", k=6, explain="true")  # other parameters, other entry
    assert other.headers["x-cache"] == "miss"
    assert get(client, "u5", k=5, explain="true").headers["x-cache"] == "miss"

    top = ids(first)[0]
    assert client.post("/v1/events", json={"user_id": "u3", "item_id": top, "event_type": "like"}).status_code == 202
    after = get(client, "u3", k=5, explain="true")
    assert after.headers["x-cache"] == "miss" and top not in ids(after)
    assert get(client, "u3", k=5, explain="true").headers["x-cache"] == "hit"
    assert get(client, "u5", k=5, explain="true").headers["x-cache"] == "hit"  # other users keep theirs

    text = client.get("/metrics").text
    assert 'hyperrec_cache_requests_total{result="hit"} 3.0' in text
    assert 'hyperrec_cache_requests_total{result="miss"} 4.0' in text
    assert (
        'hyperrec_request_latency_seconds_bucket{le="0.005",method="GET",route="/v1/recommendations/{user_id}"}' in text
    )


def test_events_shape_the_next_recommendations(client: TestClient) -> None:
    before = get(client, "u8", k=5).json()
    liked = ["m02", "m06", "m10"]  # comedy / drama items outside u8's top list
    for item in liked:
        response = client.post("/v1/events", json={"user_id": "u8", "item_id": item, "event_type": "click"})
        assert response.status_code == 202 and response.json()["stream_id"]
    after = get(client, "u8", k=5, explain="true").json()
    assert after["items"] != before["items"] and not set(liked) & {i["item_id"] for i in after["items"]}
    assert after["strategy"] == "personalized"

    cold = get(client, "visitor-1", k=5, explain="true").json()
    assert cold["strategy"] == "global_popularity" and cold["cold_start"]
    client.post("/v1/events", json={"user_id": "visitor-1", "item_id": "m03", "event_type": "view"})
    session = get(client, "visitor-1", k=5, explain="true").json()
    assert session["strategy"] == "session_content+global_popularity" and session["cold_start"]
    assert session["items"] != cold["items"] and "m03" not in {i["item_id"] for i in session["items"]}
    assert any(i["because_item_id"] == "m03" for i in session["items"])


def test_filters_diversity_and_validation_over_http(client: TestClient) -> None:
    news = get(client, "u3", k=5, categories="news").json()
    assert len(news["items"]) == 5 and all("news" in i["categories"] for i in news["items"])
    bad = client.get("/v1/recommendations/u3", params={"categories": "news,space opera,zz"})
    assert bad.status_code == 422 and "['space opera', 'zz']" in bad.text and "unknown_category" in bad.text
    assert client.get("/v1/recommendations/u3", params={"exclude_items": "m01,bogus"}).status_code == 422
    plain, diverse = get(client, "u3", k=8).json(), get(client, "u3", k=8, diversity=1).json()
    assert [i["item_id"] for i in plain["items"]] != [i["item_id"] for i in diverse["items"]]
    assert diverse["intra_list_diversity"] > plain["intra_list_diversity"]
    for params in ({"k": 0}, {"k": 101}, {"diversity": 1.5}, {"diversity": "nan"}, {"age": -1}, {"device": "fridge"}):
        response = client.get("/v1/recommendations/u3", params=params)
        assert response.status_code == 422, params
    assert client.get("/v1/recommendations/bad%20user").status_code == 422
    young = get(client, "someone-new", k=5, age=20).json()
    assert young["strategy"] == "segment_popularity" and young["segment"] == "young"


def test_admin_routes_need_the_token(client: TestClient, settings: Settings) -> None:
    for path in ("/admin/reload", "/admin/cache/flush"):
        assert client.post(path).status_code == 401
        wrong = client.post(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert client.post(path, headers={"Authorization": TOKEN}).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    get(client, "u1", k=3)
    get(client, "u2", k=3)
    flushed = client.post("/admin/cache/flush", headers=auth)
    assert flushed.status_code == 200 and flushed.json() == {"deleted": 2}
    assert get(client, "u1", k=3).headers["x-cache"] == "miss"
    reload = client.post("/admin/reload", headers=auth)
    assert reload.status_code == 200 and reload.json()["model_version"] == "v1" and reload.json()["reloaded"] is False

    disabled = settings.model_copy(update={"serving": settings.serving.model_copy(update={"admin_token": None})})
    with TestClient(create_app(disabled)) as other:
        for path in ("/admin/reload", "/admin/cache/flush"):
            response = other.post(path, headers=auth)
            assert response.status_code == 403 and "admin disabled" in response.text


def test_admin_reload_swaps_to_a_new_version(client: TestClient, settings: Settings, built) -> None:
    assert get(client, "u3", k=5).json()["model_version"] == "v1"
    publish(built["v2"], ObjectStore(settings.object_store_uri), "v2")
    response = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.json() == {"model_version": "v2", "previous_version": "v1", "reloaded": True, "reload_error": None}
    body = get(client, "u3", k=5)
    assert body.json()["model_version"] == "v2" and body.headers["x-cache"] == "miss"
    assert 'version="v2"' in client.get("/metrics").text


def test_quantized_serving(tmp_path: Path, valkey_url: str, namespace: str, built) -> None:
    settings = make_settings(tmp_path, valkey_url, namespace, quantized=True)
    publish(built["v1"], ObjectStore(settings.object_store_uri), "v1")
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        assert ready["quantized"] is True and ready["ann"] == "neural"
        assert len(get(client, "u3", k=10).json()["items"]) == 10
        assert 'quantized="true"' in client.get("/metrics").text


def test_hot_reload_under_load_drops_nothing(tmp_path: Path, valkey_url: str, namespace: str, built) -> None:
    settings = make_settings(tmp_path, valkey_url, namespace, reload_interval_s=0.2, cache_ttl_s=0)
    store = ObjectStore(settings.object_store_uri)
    publish(built["v1"], store, "v1")
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer(url: str, n: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.get(f"/v1/recommendations/u{n % 60}", params={"k": 5})
                    results.append((r.status_code, r.json().get("model_version", "")))
                except httpx.HTTPError as exc:  # a dropped connection counts as a failure
                    results.append((0, repr(exc)))

    with LiveServer(create_app(settings)) as server:
        threads = [threading.Thread(target=hammer, args=(server.url, n)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        publish(built["v2"], store, "v2")
        deadline = time.time() + 20
        while not any(v == "v2" for _, v in results[-20:]) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["model_version"] == "v2"
    statuses = {s for s, _ in results}
    assert statuses == {200}, [r for r in results if r[0] != 200][:3]
    versions = [v for _, v in results]
    first_v2 = versions.index("v2")
    assert versions[:first_v2].count("v1") > 10 and set(versions[first_v2:]) <= {"v1", "v2"}
    assert versions[-1] == "v2" and len(results) > 50


def test_blend_bundle_round_trips_through_s3(tmp_path: Path, s3_endpoint: str, built) -> None:
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="blend-bundles")  # a bucket of its own
    store = ObjectStore("s3://blend-bundles/serving", s3_endpoint_url=s3_endpoint)
    publish(built["v1"], store, "v1")
    assert current_version(store) == "v1"
    keys = store.list("v1")
    assert "v1/blend/blend.json" in keys and "v1/blend/neural/neural/model.pt" in keys
    assert "v1/serving/segments.json" in keys
    loaded = load_bundle(fetch(store, "v1", tmp_path / "cache" / "v1"))
    assert isinstance(loaded.model, WeightedHybrid) and set(loaded.model.components) == {
        "content",
        "neural",
        "popularity",
    }
    original = load_bundle(built["v1"])
    row = original.row("u3", np.array([], dtype=np.int32))
    np.testing.assert_allclose(loaded.model.score(row, ["u3"]), original.model.score(row, ["u3"]), rtol=1e-6)
    # Re-publishing a bundle without the segment files removes them from the version.
    lean = shutil.copytree(built["v1"], tmp_path / "lean")
    shutil.rmtree(lean / "serving")
    publish(lean, store, "v1")
    assert not [k for k in store.list("v1") if k.startswith("v1/serving/")]
    fetch(store, "v1", tmp_path / "cache" / "v1")
    assert not (tmp_path / "cache" / "v1" / "serving" / "segments.json").exists()


def test_schemathesis_finds_no_server_errors(settings: Settings) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given
    from hypothesis import settings as hsettings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    # Producers hold the events token as well (positive cases carry it); no rate limit here.
    serving = settings.serving.model_copy(update={"events_token": TOKEN, "events_rate_per_s": 0})
    with LiveServer(create_app(settings.model_copy(update={"serving": serving}))) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "GET /v1/recommendations/{user_id}",
            "POST /v1/events",
            "POST /admin/reload",
            "POST /admin/cache/flush",
        }
        calls: dict[str, int] = {}
        statuses: set[int] = set()

        def run(operation, mode) -> None:
            # Positive cases carry the token, so admin routes and event intake run for real too.
            headers = {"Authorization": f"Bearer {TOKEN}"} if mode == GenerationMode.POSITIVE else None
            key = f"{operation.method.upper()} {operation.path}"

            @given(case=operation.as_strategy(generation_mode=mode))
            @hsettings(
                max_examples=30,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                response = case.call(base_url=server.url, headers=headers, timeout=10)
                case.validate_response(response, checks=[not_a_server_error])
                calls[key] = calls.get(key, 0) + 1
                statuses.add(response.status_code)

            try:
                check()
            except Unsatisfiable:  # no invalid input exists for a parameterless operation
                assert mode == GenerationMode.NEGATIVE

        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run(operation, mode)
    assert calls["GET /v1/recommendations/{user_id}"] >= 40 and calls["POST /v1/events"] >= 40, calls
    assert all(n >= 1 for n in calls.values()) and {200, 401, 422} <= statuses, (calls, statuses)


def test_cache_hit_fast_path_agrees_with_the_route(client: TestClient) -> None:
    first = get(client, "u4", k=4, diversity=0.5)
    fast = get(client, "u4", diversity="0.5", k="4")  # same query, other order and spelling: the lean path hits
    assert first.headers["x-cache"] == "miss" and fast.headers["x-cache"] == "hit" and fast.content == first.content
    unknown = client.get("/v1/recommendations/u4", params={"k": 4, "utm_source": "mail"})
    assert unknown.status_code == 422 and unknown.json()["detail"][0]["type"] == "extra_forbidden"
    routed = client.get("/v1/recommendations/u4?k=4&k=4&diversity=0.5")  # repeated: FastAPI answers, from the cache
    assert routed.headers["x-cache"] == "hit" and routed.content == first.content
    assert client.get("/v1/recommendations/u4?k=4&k=5").status_code == 200
    assert client.get("/v1/recommendations/u4?k=400").status_code == 422
    text = client.get("/metrics").text
    assert 'hyperrec_requests_total{method="GET",route="/v1/recommendations/{user_id}",status="200"} 4.0' in text
    assert 'hyperrec_cache_requests_total{result="hit"} 2.0' in text


def test_lean_path_misses_answer_as_the_route_does(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    queries = [
        "k=5",
        "k=4&explain=true",
        "k=6&diversity=0.7&exclude_items=m01,m02",
        "k=3&categories=news",
        "k=5&age=20&explain=1",  # unknown user below: segment popularity
    ]
    for user in ("u3", "someone-new"):
        for query in queries:
            lean = client.get(f"/v1/recommendations/{user}?{query}")
            assert client.post("/admin/cache/flush", headers=auth).status_code == 200
            first = query.split("&")[0]
            routed = client.get(f"/v1/recommendations/{user}?{query}&{first}")  # repeated: FastAPI's route answers
            assert lean.status_code == routed.status_code == 200, (user, query, routed.text)
            assert lean.headers["x-cache"] == routed.headers["x-cache"] == "miss"
            assert lean.headers["content-type"] == routed.headers["content-type"] == "application/json"
            assert lean.content == routed.content, (user, query)
    text = client.get("/metrics").text
    assert 'hyperrec_cache_requests_total{result="miss"} 20.0' in text
    assert 'hyperrec_requests_total{method="GET",route="/v1/recommendations/{user_id}",status="200"} 20.0' in text


def test_a_swap_warms_the_recently_hit_lists_for_the_new_version(client: TestClient, settings: Settings, built) -> None:
    hot = [("u3", {"k": 5}), ("u4", {"k": 4, "explain": "true"}), ("someone-new", {"k": 3, "age": 20})]
    for user, params in hot:
        get(client, user, **params)
        assert get(client, user, **params).headers["x-cache"] == "hit"
    assert get(client, "u5", k=5).headers["x-cache"] == "miss"  # requested once: not hot
    publish(built["v2"], ObjectStore(settings.object_store_uri), "v2")
    response = client.post("/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["model_version"] == "v2"
    warmed = [get(client, user, **params) for user, params in hot]
    for (user, _), answer in zip(hot, warmed):
        assert answer.headers["x-cache"] == "hit" and answer.json()["model_version"] == "v2", user
    assert client.post("/admin/cache/flush", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    for (user, params), answer in zip(hot, warmed):
        assert get(client, user, **params).content == answer.content  # computed now: the same list
    fresh = get(client, "u5", k=5)
    assert fresh.headers["x-cache"] == "miss" and fresh.json()["model_version"] == "v2"
