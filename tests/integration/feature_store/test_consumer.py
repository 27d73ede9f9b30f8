"""The event-stream consumer (feature_store/consumer.py) on a real embedded Valkey server and a
local landing zone: exactly-once landing across crashes, fencing, health, and fresh online
profiles equal to the offline builder's."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from core.events import Event, stream_key
from core.settings import Settings, load_settings
from feature_store.consumer import EventConsumer, consumer_healthy, heartbeat_key
from feature_store.online import AS_OF_FIELD, HISTORY_COLUMNS, OnlineStore, open_redis
from feature_store.profiles import build_user_profiles
from pipelines.landing import LandingZone
from serving.cache import RecommendationCache
from serving.events import RedisEvents

T0 = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def valkey_url():
    with open_redis(None) as server:
        yield server.url


def consumer_settings(tmp_path: Path, url: str, namespace: str, **landing) -> Settings:
    return load_settings(
        home=str(tmp_path / "home"),
        online_store={"url": url},
        serving={"namespace": namespace},
        landing={"uri": str(tmp_path / "landing"), "batch_max_events": 50, "batch_max_wait_s": 0.2, **landing},
    )


@pytest.fixture
def settings(tmp_path: Path, valkey_url: str) -> Settings:
    return consumer_settings(tmp_path, valkey_url, f"t{uuid.uuid4().hex[:12]}")


def publish(settings: Settings, events: list[Event]) -> list[str]:
    """Publish through the serving tier's event store; returns the stream ids."""

    async def go() -> list[str]:
        client = aioredis.Redis.from_url(settings.online_store.url)
        try:
            ns = settings.serving.namespace
            store = RedisEvents(client, ns, RecommendationCache(client, ns, 300))
            return [(await store.publish(e)).stream_id for e in events]
        finally:
            await client.aclose()

    return asyncio.run(go())


def make_events(n: int, users: int = 7, items: int = 6, start: datetime = T0) -> list[Event]:
    rng = np.random.default_rng(n)
    kinds = ["view", "click", "like", "rate"]
    out = []
    for i in range(n):
        kind = kinds[int(rng.integers(0, 4))]
        out.append(
            Event(
                user_id=f"u{int(rng.integers(0, users))}",
                item_id=f"i{int(rng.integers(1, items + 1))}",
                event_type=kind,
                timestamp=start + timedelta(minutes=int(rng.integers(0, 60 * 24 * 40))),
                rating=float(rng.integers(1, 6)) if kind == "rate" else None,
                event_id=f"e{i}-{uuid.uuid4().hex[:6]}",
            )
        )
    return out


def landed_event_ids(settings: Settings) -> Counter:
    zone = LandingZone.of(settings)
    ids: Counter = Counter()
    for batch in zone.batches():
        root = zone.store.local_path(f"batches/{batch.name}/interactions")
        for part in sorted(root.glob("*.parquet")):
            ids.update(pq.read_table(part, columns=["event_id"]).column("event_id").to_pylist())
    return ids


def pending(settings: Settings) -> int:
    client = redis.Redis.from_url(settings.online_store.url)
    try:
        return int(client.xpending(stream_key(settings.serving.namespace), settings.landing.consumer_group)["pending"])
    finally:
        client.close()


def drain(consumer: EventConsumer, polls: int = 200) -> None:
    """Poll until a read returns nothing and the buffer is landed."""
    for _ in range(polls):
        if consumer.poll(block_ms=50) == 0 and not consumer._buffer:
            return
    raise AssertionError("the consumer did not drain the stream")


class Crash(Exception):
    """Stands for the consumer process dying at this point."""


def crash(*_args, **_kwargs):
    raise Crash


def test_events_land_in_batches_once_and_are_acked(settings: Settings) -> None:
    events = make_events(120)
    publish(settings, events)
    consumer = EventConsumer(settings, name="c1")
    consumer.start()
    try:
        drain(consumer)
    finally:
        consumer.close()
    assert landed_event_ids(settings) == Counter(e.event_id for e in events)
    batches = LandingZone.of(settings).batches()
    assert [b.rows for b in batches] == [50, 50, 20] and {b.source for b in batches} == {"consumer"}
    assert pending(settings) == 0
    # The landed rows are the events, column for column.
    zone = LandingZone.of(settings)
    table = pd.concat(
        pd.read_parquet(zone.store.local_path(f"batches/{b.name}/interactions")) for b in batches
    ).set_index("event_id")
    for e in events[:10]:
        row = table.loc[e.event_id]
        assert (row.user_id, row.item_id, row.event_type) == (e.user_id, e.item_id, e.event_type)
        assert row.timestamp == pd.Timestamp(e.timestamp) and (row.rating == e.rating or pd.isna(row.rating))


def test_a_crash_between_landing_and_ack_lands_nothing_twice(settings: Settings) -> None:
    events = make_events(30)
    publish(settings, events)
    first = EventConsumer(settings, name="dies-after-landing")
    first.start()
    first.poll(block_ms=50)
    first._ack = crash  # the process dies right after its batch committed
    with pytest.raises(Crash):
        first.flush()
    assert sum(landed_event_ids(settings).values()) == 30 and pending(settings) == 30
    first.client.delete(first.alive_key(first.name))  # its alive key expires
    second = EventConsumer(settings, name="recovers")
    second.start()
    try:
        drain(second)
    finally:
        second.close()
    assert landed_event_ids(settings) == Counter(e.event_id for e in events)
    assert second.stats["recovered_acked"] == 30 and second.stats["landed"] == 0
    assert pending(settings) == 0 and not second.client.hlen(second.inflight_key)
    first.store.close()


def test_a_restart_under_the_same_name_resolves_its_own_unacked_batch(settings: Settings) -> None:
    """E.g. a container restarted with the same hostname and pid 1."""
    events = make_events(25)
    publish(settings, events)
    first = EventConsumer(settings, name="host-1")
    first.start()
    first.poll(block_ms=50)
    first._ack = crash
    with pytest.raises(Crash):
        first.flush()
    first.store.close()
    again = EventConsumer(settings, name="host-1")
    again.start()
    try:
        drain(again)
    finally:
        again.close()
    assert landed_event_ids(settings) == Counter(e.event_id for e in events)
    assert again.stats["recovered_acked"] == 25 and again.stats["landed"] == 0 and pending(settings) == 0


def test_a_crash_before_the_batch_commits_lands_the_events_later(settings: Settings) -> None:
    events = make_events(30)
    publish(settings, events)
    first = EventConsumer(settings, name="dies-while-landing")
    first.start()
    first.poll(block_ms=50)
    first.zone.land_events = crash
    with pytest.raises(Crash):
        first.flush()
    assert landed_event_ids(settings) == Counter() and first.client.hlen(first.inflight_key) == 1
    first.client.delete(first.alive_key(first.name))
    second = EventConsumer(settings, name="recovers")
    second.start()
    try:
        drain(second)
    finally:
        second.close()
    assert landed_event_ids(settings) == Counter(e.event_id for e in events)
    assert second.stats["landed"] == 30 and second.stats["recovered_acked"] == 0 and pending(settings) == 0
    first.store.close()


def test_a_consumer_presumed_dead_is_fenced_and_lands_nothing(settings: Settings) -> None:
    events = make_events(20)
    publish(settings, events)
    slow = EventConsumer(settings, name="slow")
    slow.start()
    slow.poll(block_ms=50)
    assert len(slow._buffer) == 20
    slow.client.delete(slow.alive_key("slow"))  # it stalled longer than its alive key lives
    peer = EventConsumer(settings, name="peer")
    peer.start()  # claims slow's entries
    slow.flush()  # fenced: lands nothing
    assert slow.name != "slow" and slow._buffer == []
    try:
        drain(peer)
    finally:
        peer.close()
        slow.close()
    assert landed_event_ids(settings) == Counter(e.event_id for e in events) and pending(settings) == 0


def test_a_live_consumers_entries_are_not_claimed(settings: Settings) -> None:
    publish(settings, make_events(10))
    busy = EventConsumer(settings, name="busy")
    busy.start()
    busy.poll(block_ms=50)
    other = EventConsumer(settings, name="other")
    other.start()
    assert other.reclaim_dead() == 0 and len(busy._buffer) == 10
    busy.close()
    other.close()
    assert sum(landed_event_ids(settings).values()) == 10


def test_stop_flushes_the_buffer(settings: Settings) -> None:
    settings.landing.batch_max_wait_s = 3600
    publish(settings, make_events(7))
    consumer = EventConsumer(settings, name="c")
    consumer.start()
    consumer.poll(block_ms=50)
    assert landed_event_ids(settings) == Counter()
    consumer.close()
    assert sum(landed_event_ids(settings).values()) == 7 and pending(settings) == 0


def test_health_follows_the_heartbeat(settings: Settings) -> None:
    assert not consumer_healthy(settings)
    consumer = EventConsumer(settings, name="c")
    consumer.start()
    try:
        assert consumer_healthy(settings)
        assert not consumer_healthy(settings, now=datetime.now(UTC) + timedelta(seconds=60))
        key = heartbeat_key(settings.serving.namespace, settings.landing.consumer_group)
        assert key == f"{settings.serving.namespace}:consumer:landing:heartbeat"
    finally:
        consumer.close()
    assert not consumer_healthy(load_settings(online_store={"url": None}))


def test_consume_needs_a_redis_url(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hyperrec.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "online_store": {"url": None}}))
    result = CliRunner().invoke(app, ["consume", "--config", str(config)])
    assert result.exit_code == 1 and "online_store.url" in result.output
    with pytest.raises(ValueError, match="online_store.url"):
        EventConsumer(load_settings(config))


def test_a_trimmed_or_malformed_entry_is_acked_and_counted(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.online_store.url, decode_responses=True)
    key = stream_key(settings.serving.namespace)
    client.xadd(key, {"user_id": "u1", "event_type": "view"})  # no item_id, no timestamp
    publish(settings, make_events(3))
    consumer = EventConsumer(settings, name="c")
    consumer.start()
    try:
        drain(consumer)
    finally:
        consumer.close()
        client.close()
    assert consumer.stats["dropped"] == 1 and sum(landed_event_ids(settings).values()) == 3
    assert pending(settings) == 0


# --------------------------------------------------------------------------- fresh profiles


def profile_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(1, 21)],
            "categories": [["drama"], ["comedy", "news"], ["action"], [], None] * 4,
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(80)],  # u80..u99 are not in the users table
            "age": [None if i % 7 == 0 else 18 + i % 50 for i in range(80)],
            "gender": [["F", "M", None][i % 3] for i in range(80)],
            "occupation": "x",
            "region": [["north", "south", "east"][i % 3] for i in range(80)],
        }
    )
    return items, users


def offline_events(n: int, seed: int = 0) -> pd.DataFrame:
    """Seeded (offline, preprocessed-like) events of u0..u59 with every column."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": np.char.add("u", rng.integers(0, 60, n).astype(str)),
            "item_id": np.char.add("i", rng.integers(1, 21, n).astype(str)),
            "event_type": rng.choice(["view", "click", "complete"], n),
            "rating": np.nan,
            "dwell_time_s": rng.exponential(30, n),
            "scroll_depth": rng.random(n),
            "device": rng.choice(["mobile", "desktop", "tv"], n),
            "session_id": "s",
            "timestamp": pd.Timestamp(T0) - pd.to_timedelta(rng.integers(0, 40 * 86400, n), unit="s"),
            "event_id": None,
            "confidence": rng.uniform(0.2, 0.95, n),
        }
    )


def test_fresh_profiles_equal_the_offline_builders(settings: Settings) -> None:
    settings.landing.batch_max_events = 500
    items, users = profile_tables()
    seeded = offline_events(3000)
    store = OnlineStore(settings.online_store.url, namespace=settings.serving.namespace)
    try:
        store.write_profile_inputs(items, users, version="run-1")
        assert store.add_history(seeded) == 3000
        assert store.add_history(seeded) == 0  # seeding twice changes nothing
        live = make_events(1500, users=100, items=20, start=T0 - timedelta(days=10))
        publish(settings, live)
        consumer = EventConsumer(settings, name="c")
        consumer.start()
        try:
            drain(consumer)
            user_ids = sorted({e.user_id for e in live})
            assert len(user_ids) == 100
            online = {u: store.get_user(u) for u in user_ids}
            # Applying every event again (a redelivery) adds nothing to the histories; the
            # profiles are recomputed (at a later as_of) from the same events.
            consumer.update_profiles(live)
            assert consumer.stats["profile_errors"] == 0
        finally:
            consumer.close()
        again = {u: store.get_user(u) for u in user_ids}
        history = store.history(user_ids)
    finally:
        store.close()
    assert len(history) == len(seeded[seeded.user_id.isin(user_ids)]) + len(live)
    live_frame = pd.DataFrame([e.row() for e in live]).astype({c: float for c in ("dwell_time_s", "scroll_depth")})
    events = pd.concat([seeded, live_frame.assign(confidence=np.nan)], ignore_index=True)
    mismatches = []
    for profiles_by_user in (online, again):
        by_as_of: dict[str, list[str]] = {}
        for user_id, profile in profiles_by_user.items():
            by_as_of.setdefault(profile[AS_OF_FIELD], []).append(user_id)
        for as_of, group in by_as_of.items():
            offline = build_user_profiles(
                events, items, users, as_of=pd.Timestamp(as_of), half_life_days=settings.features.half_life_days
            ).set_index("user_id")
            assert pd.Timestamp(as_of) >= events[events.user_id.isin(group)].timestamp.max()
            for user_id in group:
                profile = profiles_by_user[user_id]
                expected = offline.loc[user_id]
                assert set(profile) - {AS_OF_FIELD} == set(expected.index), user_id
                for name, value in expected.items():
                    if abs(profile[name] - float(value)) > 1e-9:
                        mismatches.append((user_id, name, profile[name], float(value)))
    assert mismatches == []
    assert set(HISTORY_COLUMNS) <= set(history.columns)


# --------------------------------------------------------------------------- a real process, killed


def drained(settings: Settings) -> bool:
    """Every stream entry was delivered to the group and acked."""
    client = redis.Redis.from_url(settings.online_store.url, decode_responses=True)
    try:
        key = stream_key(settings.serving.namespace)
        last = client.xinfo_stream(key)["last-generated-id"]
        group = next(g for g in client.xinfo_groups(key) if g["name"] == settings.landing.consumer_group)
        return group["pending"] == 0 and group["last-delivered-id"] == last
    finally:
        client.close()


@pytest.mark.slow
def test_http_events_land_exactly_once_across_a_kill_9(tmp_path: Path, valkey_url: str) -> None:
    """10,000 events POSTed to a real uvicorn server (every tenth with a client event id,
    posted twice) while ``hyperrec consume`` runs as a process that is killed (SIGKILL)
    halfway and restarted: every event id lands exactly once and nothing stays pending."""
    from fixtures_serving import LiveServer, tiny_bundle

    from core.object_store import ObjectStore
    from serving.app import create_app
    from serving.store import publish as publish_bundle

    namespace = f"t{uuid.uuid4().hex[:12]}"
    landing = {"uri": str(tmp_path / "landing"), "batch_max_events": 500, "batch_max_wait_s": 0.5}
    settings = consumer_settings(tmp_path, valkey_url, namespace, **landing)
    settings.object_store.uri = str(tmp_path / "bundles")
    settings.serving.reload_interval_s = 0
    settings.serving.events_rate_per_s = 0  # one client at full speed: the rate limit has its own test
    publish_bundle(tiny_bundle(tmp_path / "build", "v1"), ObjectStore(settings.object_store_uri), "v1")
    config = tmp_path / "consumer.yaml"
    overlay = {"home": str(tmp_path / "home"), "online_store": {"url": valkey_url}, "serving": {"namespace": namespace}}
    config.write_text(yaml.safe_dump({**overlay, "landing": landing}))
    logs = tmp_path / "consumer.log"
    zone = LandingZone.of(settings)

    def start() -> subprocess.Popen:
        with logs.open("ab") as out:
            argv = [str(Path(sys.executable).parent / "hyperrec"), "consume", "--config", str(config)]
            return subprocess.Popen(argv, stdout=out, stderr=out)

    def post(conn: http.client.HTTPConnection, body: dict) -> dict:
        conn.request("POST", "/v1/events", body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read())
        assert response.status == 202, payload
        return payload

    n, sent, retried = 10_000, [], 0
    proc = start()
    try:
        with LiveServer(create_app(settings)) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            for i in range(n):
                body = {"user_id": f"u{i % 200}", "item_id": f"i{1 + i % 6}", "event_type": "view"}
                if i % 10 == 0:
                    body["event_id"] = f"client-{i}"
                first = post(conn, body)
                assert first["duplicate"] is False
                sent.append(first["event_id"])
                if i % 10 == 0:  # the client retries: accepted, not recorded again
                    assert post(conn, body)["duplicate"] is True
                    retried += 1
                if i == n // 2:
                    deadline = time.monotonic() + 60
                    while not zone.batches() and time.monotonic() < deadline:
                        time.sleep(0.05)
                    assert zone.batches(), logs.read_text()[-3000:]
                    proc.kill()  # kill -9, mid-stream
                    assert proc.wait(timeout=30) == -signal.SIGKILL
                    proc = start()
            conn.close()
        deadline = time.monotonic() + 120
        while not drained(settings):
            assert time.monotonic() < deadline and proc.poll() is None, logs.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, logs.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    landed = landed_event_ids(settings)
    assert len(set(sent)) == n and retried == n // 10
    lost = set(sent) - set(landed)
    duplicated = {i: c for i, c in landed.items() if c > 1}
    assert (len(lost), len(duplicated), set(landed) - set(sent)) == (0, 0, set())
    assert pending(settings) == 0
    text = logs.read_text()
    assert "recovered dead consumer" in text and "'profile_errors': 0" in text and "ERROR" not in text
