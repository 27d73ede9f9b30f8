"""The serving API against hostile input (issue 14): the corpus of :mod:`corpus_http`, the
events token and rate limit, the body limit, NaN literals, timestamp bounds, unknown fields
and parameters, ``/readyz`` that only reports and which Redis keys may be evicted (the bounded
schemathesis run is ``tests/integration/serving/test_serving_api.py``). One app per test on a
shared embedded Valkey."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from corpus_http import ADMIN, AUTH, GOOD, SECOND_TOKEN, TOKEN, cases
from fastapi.testclient import TestClient
from fixtures_serving import tiny_bundle
from redis.exceptions import ConnectionError as RedisConnectionError

from core.object_store import ObjectStore
from core.settings import Settings, load_settings
from serving.api.guard import events_auth_required
from serving.app import create_app
from serving.store import publish

MAX_BODY_CHARS = 4096


@pytest.fixture(scope="module")
def valkey_url():
    from feature_store.online import open_redis

    with open_redis(None) as server:
        yield server.url


def make_settings(tmp_path: Path, valkey_url: str, **serving: Any) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={
            "namespace": f"t{uuid.uuid4().hex[:12]}",
            "reload_interval_s": 0,
            "events_token": f"{TOKEN}, {SECOND_TOKEN}",
            "admin_token": ADMIN,
            **serving,
        },
    )


def published(tmp_path: Path, valkey_url: str, **serving: Any) -> Settings:
    settings = make_settings(tmp_path, valkey_url, **serving)
    publish(tiny_bundle(tmp_path / "build" / "v1", "v1"), ObjectStore(settings.object_store_uri), "v1")
    return settings


def test_hostile_corpus_gets_no_5xx_and_short_answers(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url)
    corpus = cases()
    assert len(corpus) >= 60
    wrong: list[str] = []
    longest = 0
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for name, method, path, kwargs, allowed in corpus:
            response = client.request(method, path, **kwargs)
            longest = max(longest, len(response.content))
            if response.status_code not in allowed or len(response.content) > MAX_BODY_CHARS:
                wrong.append(f"{name}: {response.status_code} ({len(response.content)} B) {response.text[:200]}")
            if response.status_code == 401:
                assert response.headers["www-authenticate"] == "Bearer", name
    print(f"hostile corpus: {len(corpus)} requests, 0 5xx, longest body {longest} B")
    assert not wrong, wrong


def test_events_need_the_token_and_say_why(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url)
    assert events_auth_required(settings.serving)
    with TestClient(create_app(settings)) as client:
        missing = client.post("/v1/events", json=GOOD)
        assert missing.status_code == 401 and "missing events token" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/events", json=GOOD, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401 and "wrong events token" in wrong.json()["detail"]
        assert client.post("/v1/events", json=GOOD, headers=AUTH).status_code == 202
        assert len(client.portal.call(client.app.state.events.read_stream)) == 1  # the 401s wrote nothing
        assert client.post("/admin/reload").status_code == 401


def test_events_are_open_without_a_configured_token(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url, events_token=None)
    assert not events_auth_required(settings.serving)
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/events", json=GOOD).status_code == 202


def test_rate_limit_answers_429_per_client_and_spares_recommendations(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url, events_rate_per_s=2, events_burst=5)
    with TestClient(create_app(settings)) as client, TestClient(create_app(settings)) as other_worker:
        codes = [client.post("/v1/events", json=GOOD, headers=AUTH).status_code for _ in range(5)]
        limited = other_worker.post("/v1/events", json=GOOD, headers=AUTH)  # one bucket for all workers
        assert codes == [202] * 5 and limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1 and "rate limit" in limited.json()["detail"]
        second = {"Authorization": f"Bearer {SECOND_TOKEN}"}  # another client has its own bucket
        assert client.post("/v1/events", json=GOOD, headers=second).status_code == 202
        assert {client.get("/v1/recommendations/u1").status_code for _ in range(50)} == {200}
        time.sleep(0.6)  # 2 tokens/s: one is back
        assert client.post("/v1/events", json=GOOD, headers=AUTH).status_code == 202


def test_body_limit_is_413_before_parsing(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url, max_body_bytes=1000)
    with TestClient(create_app(settings)) as client:
        big = client.post("/v1/events", content=b"[" * 20_000_000, headers={**AUTH, "content-type": "application/json"})
        assert big.status_code == 413 and "serving.max_body_bytes" in big.json()["detail"]
        chunked = client.post(
            "/v1/events", content=iter([b" " * 600] * 3), headers={**AUTH, "content-type": "application/json"}
        )
        assert chunked.status_code == 413
        assert client.post("/v1/events", json={**GOOD, "session_id": "s" * 200}, headers=AUTH).status_code == 202


def test_nan_literals_get_a_short_422(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url)
    body = b'{"user_id":"u1","item_id":"i4","event_type":"rate","rating":NaN,"dwell_time_s":Infinity}'
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/events", content=body, headers={**AUTH, "content-type": "application/json"})
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert {tuple(e["loc"]) for e in detail} == {("body", "rating"), ("body", "dwell_time_s")}
        assert {e["input"] for e in detail} == {"nan", "inf"}
        many = client.post("/v1/events", json=[GOOD] * 5000, headers=AUTH)  # 160 kB of input: not echoed
        assert many.status_code == 422 and len(many.content) < 1000


def test_timestamps_are_bounded_and_unknown_fields_rejected(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url)
    with TestClient(create_app(settings)) as client:
        for timestamp in ("0001-01-01T00:00:00Z", "1994-12-31T23:59:59+00:00", "9999-01-01T00:00:00Z"):
            response = client.post("/v1/events", json={**GOOD, "timestamp": timestamp}, headers=AUTH)
            assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "timestamp"]
        extra = client.post("/v1/events", json={**GOOD, "utm": "x"}, headers=AUTH)
        assert extra.status_code == 422 and extra.json()["detail"][0]["type"] == "extra_forbidden"
        unknown = client.get("/v1/recommendations/u1", params={"utm": "x"})
        assert unknown.status_code == 422 and unknown.json()["detail"][0]["loc"] == ["query", "utm"]


def test_readyz_only_reports_and_says_when_events_cannot_be_written(tmp_path: Path, valkey_url: str) -> None:
    settings = published(tmp_path, valkey_url)
    with TestClient(create_app(settings)) as client:
        state = client.app.state.serving
        attempts = state.load_attempts
        publish(tiny_bundle(tmp_path / "build" / "v2", "v2"), ObjectStore(settings.object_store_uri), "v2")
        for _ in range(20):
            ready = client.get("/readyz").json()
            assert ready["model_version"] == "v1" and ready["degraded"] is False
        assert state.load_attempts == attempts  # never loads: the poller and /admin/reload do

        events = client.app.state.events
        real_publish = events.publish

        async def broken(event):
            raise RedisConnectionError("connection refused")

        events.publish = broken
        assert client.post("/v1/events", json=GOOD, headers=AUTH).status_code == 503
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["degraded"] is True
        assert "connection refused" in ready.json()["degraded_reason"]
        events.publish = real_publish
        assert client.post("/v1/events", json=GOOD, headers=AUTH).status_code == 202
        assert client.get("/readyz").json()["degraded"] is False


def test_only_recomputable_keys_carry_a_ttl(tmp_path: Path, valkey_url: str) -> None:
    """A volatile-* maxmemory-policy evicts only keys with a TTL: cached lists, generations,
    live histories and rate-limit buckets; never the event stream or the event-id records."""
    settings = published(tmp_path, valkey_url)
    ns = settings.serving.namespace
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/recommendations/u1").status_code == 200
        for item in ("i4", "i5"):
            assert client.post("/v1/events", json={**GOOD, "item_id": item}, headers=AUTH).status_code == 202
        assert client.get("/v1/recommendations/u1").status_code == 200

        async def ttls() -> dict[str, int]:
            redis = client.app.state.events.client
            return {key.decode(): await redis.ttl(key) async for key in redis.scan_iter(match=f"{ns}:*")}

        found = client.portal.call(ttls)
    kinds = {key.split(":")[1]: ttl for key, ttl in found.items()}
    assert set(kinds) == {"events", "event-ids", "rec", "gen", "recent", "ratelimit"}, found
    durable = {key: ttl for key, ttl in found.items() if key.split(":")[1] in ("events", "event-ids")}
    assert len(durable) == 3 and set(durable.values()) == {-1}, durable  # stream, id hash, id zset
    assert all(ttl > 0 for key, ttl in found.items() if key not in durable), found
