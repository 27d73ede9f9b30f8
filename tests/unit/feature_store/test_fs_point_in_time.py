"""Point-in-time correctness of the offline store: a label only sees snapshots strictly before it."""

import pandas as pd
import pytest

from feature_store.offline import (
    list_snapshots,
    point_in_time_join,
    read_all_snapshots,
    read_offline_snapshot,
)
from feature_store.profiles import build_snapshots

DAY0 = pd.Timestamp("2024-01-01", tz="UTC")
HL = 14.0


def day(d: float) -> pd.Timestamp:
    return DAY0 + pd.Timedelta(days=d)


def _click(user: str, ts: pd.Timestamp) -> dict:
    return dict(
        user_id=user,
        item_id="i1",
        event_type="click",
        rating=None,
        dwell_time_s=5.0,
        scroll_depth=0.5,
        device="mobile",
        session_id="s",
        timestamp=ts,
    )


@pytest.fixture
def tables():
    # u1 clicks once on day 1, then 10 times on day 5; u2 never acts.
    events = [_click("u1", day(1.5))] + [_click("u1", day(5) + pd.Timedelta(minutes=10 + i)) for i in range(10)]
    interactions = pd.DataFrame(events)
    items = pd.DataFrame({"item_id": ["i1"], "title": ["one"], "categories": [["News"]]})
    users = pd.DataFrame({"user_id": ["u1", "u2"], "age": [30.0, 40.0]})
    return interactions, items, users


@pytest.fixture
def root(tmp_path, tables):
    interactions, items, users = tables
    paths = build_snapshots(
        interactions, items, users, as_of_dates=[day(2), day(4), day(6)], half_life_days=HL, root=tmp_path / "offline"
    )
    assert [p.parent.name for p in paths] == ["date=2024-01-03", "date=2024-01-05", "date=2024-01-07"]
    return tmp_path / "offline"


def test_snapshots_are_date_partitioned_and_carry_as_of(root):
    assert [d for d, _ in list_snapshots(root)] == ["2024-01-03", "2024-01-05", "2024-01-07"]
    for (_, path), as_of in zip(list_snapshots(root), (day(2), day(4), day(6))):
        frame = pd.read_parquet(path)
        assert list(frame.columns[:2]) == ["user_id", "as_of"]
        assert (pd.to_datetime(frame["as_of"], utc=True) == as_of).all()
    stacked = read_all_snapshots(root).set_index(["as_of", "user_id"])["clicks_30d"]
    # Each snapshot only counts events at or before its as_of.
    assert stacked.loc[(day(2), "u1")] == 1 and stacked.loc[(day(4), "u1")] == 1 and stacked.loc[(day(6), "u1")] == 11
    # The old reader still returns profiles without as_of.
    assert "as_of" not in read_offline_snapshot(root).columns
    assert read_offline_snapshot(root, with_as_of=True)["as_of"].iloc[0] == day(6)


def test_point_in_time_join_does_not_leak_what_a_naive_join_does(root):
    labels = pd.DataFrame({"user_id": ["u1"], "timestamp": [day(3)], "label": [1]})

    # Naive: the latest snapshot per user, whatever the label's time.
    latest = read_offline_snapshot(root, with_as_of=True)
    naive = labels.merge(latest, on="user_id", how="left").iloc[0]
    assert naive["clicks_7d"] == 11  # the day-5 clicks, two days after the label: a leak
    assert naive["as_of"] > naive["timestamp"]

    pit = point_in_time_join(labels, root).iloc[0]
    assert pit["clicks_7d"] == 1  # the day-2 snapshot: only the day-1 click
    assert pit["as_of"] == day(2) and pit["as_of"] < pit["timestamp"]
    assert pit["label"] == 1


def test_join_is_strict_keeps_label_order_and_nulls_without_a_snapshot(root):
    labels = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "ghost", "u1", "u2", "u1"],
            "timestamp": [day(7), day(4), day(7), day(1.5), day(3), day(4) + pd.Timedelta(microseconds=1)],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    out = point_in_time_join(labels, root)
    assert list(out.index) == [10, 11, 12, 13, 14, 15]
    assert out["user_id"].tolist() == labels["user_id"].tolist()
    assert out.loc[10, "as_of"] == day(6) and out.loc[10, "clicks_7d"] == 11
    # A snapshot taken exactly at the label's time is not earlier than it: the day-2 one is used.
    assert out.loc[11, "as_of"] == day(2) and out.loc[11, "clicks_7d"] == 1
    assert out.loc[15, "as_of"] == day(4)
    # No earlier snapshot (u1 before day 2) or no snapshot holding the user (ghost): nulls.
    for row in (12, 13):
        assert pd.isna(out.loc[row, "as_of"])
        assert out.loc[row].drop(["user_id", "timestamp", "as_of"]).isna().all()
    assert out.loc[14, "events_total"] == 0 and out.loc[14, "age"] == 40.0
    assert str(out["clicks_7d"].dtype) == "Int64"  # integer features stay exact next to nulls


def test_naive_label_timestamps_are_utc(root):
    labels = pd.DataFrame({"user_id": ["u1"], "timestamp": [day(3).tz_localize(None)]})
    assert point_in_time_join(labels, root)["as_of"].iloc[0] == day(2)


def test_errors_are_clear(tmp_path, root, tables):
    with pytest.raises(ValueError, match="missing columns \\['timestamp'\\]"):
        point_in_time_join(pd.DataFrame({"user_id": ["u1"]}), root)
    with pytest.raises(ValueError, match="columns \\[.clicks_7d.\\] clash with snapshot columns"):
        point_in_time_join(pd.DataFrame({"user_id": ["u1"], "timestamp": [day(3)], "clicks_7d": [0]}), root)
    with pytest.raises(ValueError, match="null timestamp"):
        point_in_time_join(pd.DataFrame({"user_id": ["u1"], "timestamp": [pd.NaT]}), root)
    with pytest.raises(FileNotFoundError, match="no profile snapshot"):
        point_in_time_join(pd.DataFrame({"user_id": ["u1"], "timestamp": [day(3)]}), tmp_path / "empty")
    with pytest.raises(ValueError, match="one snapshot per UTC date"):
        build_snapshots(*tables, as_of_dates=[day(2), day(2.5)], half_life_days=HL, root=tmp_path / "x")
