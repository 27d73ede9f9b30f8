"""The online store on a real embedded Valkey server, and that server's lifecycle."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from feature_store.online import OnlineStore, open_redis
from feature_store.profiles import build_user_profiles

AS_OF = pd.Timestamp("2024-03-31", tz="UTC")


@pytest.fixture(scope="module")
def profiles():
    rng = np.random.default_rng(1)
    n = 2000
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(50)],
            "title": "t",
            "categories": [["Sci-Fi", "Children's"][: 1 + i % 2] for i in range(50)],
        }
    )
    users = pd.DataFrame(
        {"user_id": [f"u{i}" for i in range(120)], "age": [None if i % 5 == 0 else 20 + i for i in range(120)]}
    )
    interactions = pd.DataFrame(
        {
            "user_id": np.char.add("u", rng.integers(0, 100, n).astype(str)),
            "item_id": np.char.add("i", rng.integers(0, 50, n).astype(str)),
            "event_type": rng.choice(["view", "click", "rate"], n),
            "rating": np.where(rng.random(n) < 0.3, rng.integers(1, 6, n), np.nan),
            "dwell_time_s": rng.exponential(30, n),
            "scroll_depth": rng.random(n),
            "device": rng.choice(["mobile", "desktop", "tablet", "tv"], n),
            "session_id": "s",
            "timestamp": AS_OF - pd.to_timedelta(rng.integers(0, 60 * 86400, n), unit="s"),
        }
    )
    return build_user_profiles(interactions, items, users, as_of=AS_OF, half_life_days=14.0)


@pytest.fixture
def store(tmp_path):
    s = OnlineStore(None, data_dir=tmp_path / "valkey", namespace="test")
    yield s
    s.close()


def test_materialize_then_get_user_matches_offline(store, profiles):
    assert store.materialize(profiles, version="2024-03-31", ttl_s=3600, batch_size=7) == len(profiles)
    for user_id in ["u0", "u3", "u57", "u110"]:
        row = profiles.set_index("user_id").loc[user_id]
        online = store.get_user(user_id)
        assert online["_version"] == "2024-03-31"
        assert set(online) == set(row.index) | {"_version"}
        for name, value in row.items():
            assert isinstance(online[name], float)
            assert online[name] == pytest.approx(float(value), abs=1e-9), name
        assert 0 < store.ttl(user_id) <= 3600
        assert 0 < store.client.ttl(f"test:user:{user_id}") <= 3600
    assert store.get_user("nobody") is None


def test_rematerialize_replaces_fields_and_version(store, profiles):
    store.materialize(profiles.assign(old_feature=1.0), version="v1")
    store.materialize(profiles.assign(events_7d=99), version="v2")
    got = store.get_user("u3")
    assert got["_version"] == "v2" and got["events_7d"] == 99.0
    assert "old_feature" not in got


def test_embedded_store_persists_across_restarts(tmp_path, profiles):
    with OnlineStore(None, data_dir=tmp_path / "kv") as first:
        first.materialize(profiles.head(5), version="v7")
    with OnlineStore(None, data_dir=tmp_path / "kv") as second:
        assert second.get_user(profiles["user_id"].iloc[0])["_version"] == "v7"


def test_url_mode_talks_to_a_redis_server(store, profiles):
    remote = OnlineStore(store.url, namespace="test")
    try:
        remote.materialize(profiles.head(3), version="remote")
        assert store.get_user(profiles["user_id"].iloc[2])["_version"] == "remote"
    finally:
        remote.close()


def test_reserved_and_missing_columns_are_rejected(store, profiles):
    with pytest.raises(ValueError, match="'_version' is reserved"):
        store.materialize(profiles.assign(_version="x"), version="v")
    with pytest.raises(ValueError, match="missing column 'user_id'"):
        store.materialize(profiles.drop(columns="user_id"), version="v")


def test_open_redis_passes_a_url_through(store):
    with open_redis(store.url) as server:
        assert server.url == store.url and not server.embedded
    assert store.client.ping()  # closing a server named by URL leaves it running


def test_embedded_server_stops_with_its_parent_even_on_sigkill(tmp_path):
    script = (
        "import sys, time; from feature_store.online import open_redis; s = open_redis(None, data_dir=sys.argv[1]); "
        "print(s.url, flush=True); time.sleep(120)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "kv")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    )
    try:
        url = parent.stdout.readline().strip()
        client = redis.Redis.from_url(url, socket_timeout=1)
        assert client.ping()
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.time() + 10
        while True:
            try:
                client.ping()
            except redis.ConnectionError:
                break
            assert time.time() < deadline, "the embedded server outlived its parent"
            time.sleep(0.1)
    finally:
        parent.kill()
        parent.wait()
