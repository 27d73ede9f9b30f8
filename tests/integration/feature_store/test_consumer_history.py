"""What fresh profiles are computed from, in the online store (real embedded Valkey): user
histories (bounded, idempotent, exact round trip) and the profile inputs build_features
stores."""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest

from feature_store.online import AS_OF_FIELD, HISTORY_COLUMNS, OnlineStore, event_key, open_redis
from feature_store.stage import profile_items

T0 = pd.Timestamp("2024-06-01", tz="UTC")


@pytest.fixture(scope="module")
def valkey_url():
    with open_redis(None) as server:
        yield server.url


@pytest.fixture
def store(valkey_url: str):
    with OnlineStore(valkey_url, namespace=f"t{uuid.uuid4().hex[:12]}") as s:
        yield s


def events(n: int, user: str = "u1", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": user,
            "item_id": [f"i{i}" for i in rng.integers(0, 9, n)],
            "event_type": rng.choice(["view", "rate"], n),
            "rating": np.where(rng.random(n) < 0.5, rng.random(n) * 4 + 1, np.nan),
            "dwell_time_s": rng.exponential(30, n),
            "scroll_depth": np.where(rng.random(n) < 0.2, np.nan, rng.random(n)),
            "device": rng.choice(["mobile", None], n),
            "session_id": [f"s{i}" for i in range(n)],
            "timestamp": T0 + pd.to_timedelta(rng.permutation(n) * 1_000_003, unit="us"),
            "event_id": [None if i % 3 else f"e{i}" for i in range(n)],
            "confidence": rng.uniform(0.1, 1.0, n),
            "decay_weight": 1.0,  # a column histories do not keep
        }
    )


def test_a_history_round_trips_exactly_and_adding_twice_changes_nothing(store: OnlineStore) -> None:
    frame = events(40)
    assert store.add_history(frame) == 40
    assert store.add_history(frame.sample(frac=1, random_state=1)) == 0
    got = store.history(["u1"])
    assert list(got.columns) == list(HISTORY_COLUMNS)
    expected = frame.sort_values("timestamp").reset_index(drop=True)[list(HISTORY_COLUMNS)]
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert str(got["timestamp"].dtype) == "datetime64[ns, UTC]" and got["rating"].dtype == float
    assert 0 < store.client.ttl(store.history_key("u1")) <= 7 * 86400


def test_a_history_keeps_the_newest_events_in_both_keys(store: OnlineStore) -> None:
    frame = events(30)
    store.add_history(frame.iloc[:20], max_events=10)
    store.add_history(frame.iloc[20:], max_events=10)
    got = store.history(["u1"])
    assert list(got["session_id"]) == list(frame.sort_values("timestamp")["session_id"].iloc[-10:])
    assert store.client.zcard(store.history_key("u1")) == store.client.hlen(store.history_events_key("u1")) == 10


def test_event_keys_prefer_the_event_id_and_otherwise_hash_the_interactions_key() -> None:
    row = {"user_id": "u", "item_id": "i", "event_type": "view", "timestamp": "t", "session_id": "s"}
    assert event_key({**row, "event_id": "abc"}) == "abc"
    assert event_key(row) == event_key({**row, "device": "tv"}) != event_key({**row, "session_id": "s2"})
    assert event_key(row).startswith("k:")


def test_histories_of_several_users_come_back_in_one_frame(store: OnlineStore) -> None:
    store.add_history(pd.concat([events(5, "a"), events(7, "b", seed=1)]))
    assert store.history(["a", "b", "nobody"])["user_id"].value_counts().to_dict() == {"b": 7, "a": 5}
    assert store.history([]).empty


def test_profile_inputs_round_trip_with_their_version(store: OnlineStore) -> None:
    assert store.read_profile_inputs() is None and store.profile_inputs_version() is None
    items = pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3"],
            "title": ["a", "b", "c"],
            "text": ["long text"] * 3,
            "categories": [["drama"], [], None],
        }
    )
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [31.0, None], "gender": ["F", None], "region": ["n", "s"]})
    selected = profile_items(items)
    assert list(selected.columns) == ["item_id", "categories"]
    store.write_profile_inputs(selected, users, version="run-7")
    got_items, got_users, version = store.read_profile_inputs()
    assert version == "run-7" == store.profile_inputs_version()
    assert got_items["categories"].map(lambda c: None if c is None else list(c)).tolist() == [["drama"], [], None]
    pd.testing.assert_frame_equal(got_users, users)


def test_materialize_records_the_profiles_as_of(store: OnlineStore) -> None:
    profiles = pd.DataFrame({"user_id": ["u1"], "events_7d": [3]})
    store.materialize(profiles, version="v1", as_of=T0)
    assert store.get_user("u1") == {"events_7d": 3.0, "_version": "v1", AS_OF_FIELD: T0.isoformat()}
    with pytest.raises(ValueError, match="reserved"):
        store.materialize(profiles.assign(_as_of="x"), version="v1")
