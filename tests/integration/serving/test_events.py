"""``POST /v1/events`` idempotency (event ids) and the stream encoding of an event, on the
session's real Valkey server."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from fixtures_serving import tiny_bundle

from core.events import Event, interactions_table
from core.object_store import ObjectStore
from core.schemas import INTERACTIONS
from core.settings import Settings, load_settings
from serving.app import create_app
from serving.cache import RecommendationCache
from serving.events import RedisEvents
from serving.store import publish


@pytest.fixture
def client(tmp_path: Path, valkey_url: str, namespace: str):
    settings: Settings = load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        online_store={"url": valkey_url},
        serving={"namespace": namespace, "reload_interval_s": 0},
    )
    publish(tiny_bundle(tmp_path / "build", "v1"), ObjectStore(settings.object_store_uri), "v1")
    with TestClient(create_app(settings)) as c:
        yield c


def stream(client: TestClient) -> list[dict[str, str]]:
    return client.portal.call(client.app.state.events.read_stream, 1000)


def test_a_retry_with_the_same_event_id_is_accepted_but_not_recorded_again(client: TestClient) -> None:
    event = {"user_id": "u9", "item_id": "i3", "event_type": "click", "event_id": "client-42"}
    first = client.post("/v1/events", json=event)
    again = client.post("/v1/events", json=event)
    assert first.status_code == again.status_code == 202
    assert first.json()["duplicate"] is False and again.json()["duplicate"] is True
    assert first.json()["event_id"] == again.json()["event_id"] == "client-42"
    assert again.json()["stream_id"] == first.json()["stream_id"]
    entries = stream(client)
    assert [e["event_id"] for e in entries] == ["client-42"]
    assert client.portal.call(client.app.state.events.recent_items, "u9") == ["i3"]
    assert 'hyperrec_events_total{event_type="click"} 1.0' in client.get("/metrics").text
    # Another event id is another event, even with the same content.
    third = client.post("/v1/events", json={**event, "event_id": "client-43"})
    assert third.json()["duplicate"] is False and len(stream(client)) == 2


def test_the_server_assigns_an_event_id_when_the_client_sends_none(client: TestClient) -> None:
    bodies = [client.post("/v1/events", json={"user_id": "u1", "item_id": "i2", "event_type": "view"}).json()]
    bodies.append(client.post("/v1/events", json={"user_id": "u1", "item_id": "i2", "event_type": "view"}).json())
    ids = [b["event_id"] for b in bodies]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids) and ids[0] != ids[1]
    assert not any(b["duplicate"] for b in bodies)
    assert [e["event_id"] for e in stream(client)] == ids


@pytest.mark.parametrize("event_id", ["", "x" * 129, "has space", "tab\there", "naïve"])
def test_bad_event_ids_are_rejected(client: TestClient, event_id: str) -> None:
    response = client.post(
        "/v1/events", json={"user_id": "u1", "item_id": "i2", "event_type": "view", "event_id": event_id}
    )
    assert response.status_code == 422 and "event_id" in response.text
    assert stream(client) == []


def test_longest_event_id_and_punctuation_are_accepted(client: TestClient) -> None:
    event_id = "a:b/c-" + "z" * 122
    response = client.post(
        "/v1/events", json={"user_id": "u1", "item_id": "i2", "event_type": "like", "event_id": event_id}
    )
    assert response.status_code == 202 and response.json()["event_id"] == event_id


def test_concurrent_deliveries_of_one_event_id_append_it_once(valkey_url: str, namespace: str) -> None:
    async def deliver() -> list[bool]:
        client = aioredis.Redis.from_url(valkey_url)
        try:
            events = RedisEvents(client, namespace, RecommendationCache(client, namespace, 300))
            event = Event("u1", "i1", "view", datetime(2024, 5, 1, tzinfo=UTC), None, "same")
            results = await asyncio.gather(*(events.publish(event) for _ in range(50)))
            assert len({r.stream_id for r in results}) == 1
            assert await client.xlen(events.stream_key) == 1
            assert await events.recent_items("u1") == ["i1"]
            return [r.duplicate for r in results]
        finally:
            await client.aclose()

    duplicates = asyncio.run(deliver())
    assert duplicates.count(False) == 1 and duplicates.count(True) == 49


def test_publish_refuses_an_event_without_id(valkey_url: str, namespace: str) -> None:
    async def go() -> None:
        client = aioredis.Redis.from_url(valkey_url)
        try:
            events = RedisEvents(client, namespace, RecommendationCache(client, namespace, 300))
            with pytest.raises(ValueError, match="event_id"):
                await events.publish(Event("u1", "i1", "view", datetime.now(UTC)))
        finally:
            await client.aclose()

    asyncio.run(go())


@pytest.mark.parametrize("rating", [None, 4.5, 1 / 3])
def test_stream_fields_round_trip_to_the_event_and_an_interactions_row(rating: float | None) -> None:
    event = Event(
        "u1", "i1", "rate" if rating else "view", datetime(2024, 5, 1, 12, 30, 1, 123456, tzinfo=UTC), rating, "e1"
    )
    encoded = {k.encode(): v.encode() for k, v in event.fields().items()}  # as a bytes client reads them
    assert Event.from_fields(encoded) == event
    table = interactions_table([event])
    assert table.schema == INTERACTIONS.arrow()
    row = table.to_pylist()[0]
    assert row["event_id"] == "e1" and row["rating"] == rating and row["timestamp"] == event.timestamp
    assert row["dwell_time_s"] is None and row["device"] is None
    # An entry written before event ids existed decodes with event_id None.
    legacy = {k: v for k, v in event.fields().items() if k != "event_id"}
    assert Event.from_fields(legacy).event_id is None
    with pytest.raises(ValueError, match="item_id"):
        Event.from_fields({"user_id": "u1", "event_type": "view", "timestamp": "2024-05-01T00:00:00+00:00"})


def test_an_events_context_fields_reach_the_stream_and_its_landed_row(client: TestClient) -> None:
    body = {
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "view",
        "event_id": "ctx-1",
        "device": "tablet",
        "dwell_time_s": 12.5,
        "scroll_depth": 1 / 3,
        "session_id": "s-9",
    }
    assert client.post("/v1/events", json=body).status_code == 202
    (entry,) = [e for e in stream(client) if e.get("event_id") == "ctx-1"]
    event = Event.from_fields(entry)
    context = ("tablet", 12.5, 1 / 3, "s-9")
    assert (event.device, event.dwell_time_s, event.scroll_depth, event.session_id) == context
    row = interactions_table([event]).to_pylist()[0]
    assert (row["device"], row["dwell_time_s"], row["scroll_depth"], row["session_id"]) == context


@pytest.mark.parametrize(
    ("field", "value"),
    [("device", "fridge"), ("dwell_time_s", -1.0), ("scroll_depth", 1.5), ("dwell_time_s", "NaN"), ("session_id", "")],
)
def test_bad_context_fields_are_rejected_naming_the_field(client: TestClient, field: str, value) -> None:
    body = {"user_id": "u1", "item_id": "i1", "event_type": "view", field: value}
    answer = client.post("/v1/events", json=body)
    assert answer.status_code == 422 and field in answer.text
