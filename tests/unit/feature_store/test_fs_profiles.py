import numpy as np
import pandas as pd
import pytest

from feature_store.offline import read_offline_snapshot, write_offline_snapshot
from feature_store.profiles import build_user_profiles, decay_weights, time_of_day

AS_OF = pd.Timestamp("2024-03-31 12:00", tz="UTC")
HL = 14.0


def _event(user, item, days_ago, event_type="view", device="mobile", rating=None, dwell=10.0, scroll=0.5, **extra):
    return dict(
        user_id=user,
        item_id=item,
        event_type=event_type,
        rating=rating,
        dwell_time_s=dwell,
        scroll_depth=scroll,
        device=device,
        session_id="s",
        timestamp=AS_OF - pd.Timedelta(days=days_ago),
        **extra,
    )


def _items():
    return pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3"],
            "title": ["one", "two", "three"],
            "categories": [["Comedy"], ["Comedy", "Drama"], None],
        }
    )


def _users():
    return pd.DataFrame({"user_id": ["a", "b", "c"], "age": [20.0, None, 40.0]})


def _interactions():
    return pd.DataFrame(
        [
            _event("a", "i1", 1, "click", "mobile", dwell=10.0, scroll=0.2),
            _event("a", "i2", 10, "view", "desktop", dwell=30.0, scroll=None),
            _event("a", "i1", 40, "rate", "tv", rating=4.0, dwell=100.0),
            _event("b", "i3", 0.5, "rate", None, rating=2.0),
        ]
    )


def _build(interactions, items=None, users=None, as_of=AS_OF):
    items = _items() if items is None else items
    users = _users() if users is None else users
    return build_user_profiles(interactions, items, users, as_of=as_of, half_life_days=HL).set_index("user_id")


def test_decay_weights_halve_at_the_half_life():
    w = decay_weights(np.array([0.0, HL, 2 * HL, 3 * HL]), HL)
    np.testing.assert_allclose(w, [1.0, 0.5, 0.25, 0.125], rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="half_life_days"):
        decay_weights(np.array([1.0]), 0.0)


def test_window_counts_and_means():
    p = _build(_interactions())
    a = p.loc["a"]
    assert (a.events_7d, a.events_30d, a.clicks_30d) == (1, 2, 1)
    assert a.mean_dwell_30d == pytest.approx(20.0)
    assert a.mean_scroll_30d == pytest.approx(0.2)  # the null scroll is skipped, the 40-day event is outside
    assert a.mean_rating == pytest.approx(4.0)
    assert p.loc["b"].events_7d == 1 and p.loc["b"].mean_rating == pytest.approx(2.0)
    assert p["events_7d"].dtype == np.int64


def test_window_boundary_is_exclusive_of_the_oldest_instant():
    p = _build(pd.DataFrame([_event("a", "i1", 7), _event("a", "i1", 6.999)]))
    assert p.loc["a"].events_7d == 1


def test_users_without_events_get_zeros_and_median_age():
    p = _build(_interactions())
    c = p.loc["c"]
    assert c.drop("age").eq(0).all()
    assert p.loc["b"].age == pytest.approx(30.0)  # median of 20 and 40
    assert list(p.index) == ["a", "b", "c"]


def test_event_after_as_of_does_not_change_the_profile():
    base = _build(_interactions())
    late = pd.DataFrame([_event("a", "i2", -0.001, "click", "tv", rating=5.0), _event("z", "i1", -3)])
    later = _build(pd.concat([_interactions(), late], ignore_index=True))
    pd.testing.assert_frame_equal(base, later)
    assert "z" not in later.index


def test_decayed_activity_and_confidence_weighting():
    one = pd.DataFrame([_event("a", "i1", HL)])
    assert _build(one).loc["a"].decayed_activity == pytest.approx(0.5, abs=1e-12)
    weighted = one.assign(confidence=[0.4])
    assert _build(weighted).loc["a"].decayed_activity == pytest.approx(0.2, abs=1e-12)
    with pytest.raises(ValueError, match="confidence 1.5 is outside"):
        _build(one.assign(confidence=[1.5]))


def test_category_affinity_is_decay_weighted_and_splits_multi_category_items():
    events = pd.DataFrame([_event("a", "i1", 0), _event("a", "i2", HL), _event("a", "i3", 0)])
    a = _build(events).loc["a"]
    total = 1.0 + 0.5 + 1.0
    assert a.cat_Comedy == pytest.approx((1.0 + 0.25) / total, abs=1e-12)
    assert a.cat_Drama == pytest.approx(0.25 / total, abs=1e-12)


def test_category_columns_span_every_category_in_items():
    items = pd.concat([_items(), pd.DataFrame({"item_id": ["i9"], "title": ["nine"], "categories": [["Horror"]]})])
    p = _build(_interactions(), items=items)
    assert {"cat_Comedy", "cat_Drama", "cat_Horror"} <= set(p.columns)
    assert p["cat_Horror"].eq(0).all()


def test_device_and_time_of_day_shares():
    p = _build(_interactions())
    a = p.loc["a"]
    assert (a.share_mobile, a.share_desktop, a.share_tv, a.share_tablet) == pytest.approx((1 / 3, 1 / 3, 1 / 3, 0))
    assert p.loc["b"][["share_mobile", "share_desktop", "share_tablet", "share_tv"]].sum() == 0  # null device
    tod = [c for c in p.columns if c in ("share_morning", "share_afternoon", "share_evening", "share_night")]
    assert p.loc[["a", "b"], tod].sum(axis=1).tolist() == pytest.approx([1.0, 1.0])
    hours = pd.Series(
        pd.to_datetime(["2024-01-01 00:30", "2024-01-01 06:00", "2024-01-01 13:00", "2024-01-01 23:59"], utc=True)
    )
    assert time_of_day(hours).tolist() == ["night", "morning", "afternoon", "evening"]


def test_naive_as_of_is_utc():
    naive = build_user_profiles(_interactions(), _items(), _users(), as_of=AS_OF.tz_localize(None), half_life_days=HL)
    pd.testing.assert_frame_equal(naive.set_index("user_id"), _build(_interactions()))


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match="timestamp"):
        _build(_interactions().drop(columns="timestamp"))
    with pytest.raises(ValueError, match="scroll_depth.*mean_scroll_30d"):
        _build(_interactions().drop(columns="scroll_depth"))


def test_100k_events_give_every_user_a_normalised_profile():
    """At scale (speed: bench/feature_store.py, not a timed assertion here)."""
    rng = np.random.default_rng(0)
    n, n_users, n_items = 100_000, 3000, 1000
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "title": "t",
            "categories": [[f"c{i % 7}", f"c{i % 3}"] for i in range(n_items)],
        }
    )
    users = pd.DataFrame(
        {"user_id": [f"u{i}" for i in range(n_users)], "age": rng.integers(18, 70, n_users).astype(float)}
    )
    interactions = pd.DataFrame(
        {
            "user_id": np.char.add("u", rng.integers(0, n_users, n).astype(str)),
            "item_id": np.char.add("i", rng.integers(0, n_items, n).astype(str)),
            "event_type": rng.choice(["view", "click", "rate"], n),
            "rating": np.where(rng.random(n) < 0.3, rng.integers(1, 6, n), np.nan),
            "dwell_time_s": rng.exponential(30, n),
            "scroll_depth": rng.random(n),
            "device": rng.choice(["mobile", "desktop", "tablet", "tv"], n),
            "session_id": "s",
            "timestamp": AS_OF - pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s"),
            "confidence": rng.uniform(0.1, 1.0, n),
        }
    )
    p = build_user_profiles(interactions, items, users, as_of=AS_OF, half_life_days=HL)
    assert len(p) == n_users
    cats = p[[c for c in p.columns if c.startswith("cat_")]]
    np.testing.assert_allclose(cats.sum(axis=1), 1.0, atol=1e-9)
    assert p["events_30d"].sum() == (interactions["timestamp"] > AS_OF - pd.Timedelta(days=30)).sum()


def test_snapshot_round_trip_and_idempotent_overwrite(tmp_path):
    p = _build(_interactions()).reset_index()
    path = write_offline_snapshot(p, tmp_path, AS_OF)
    assert path == tmp_path / "date=2024-03-31" / "profiles.parquet"
    pd.testing.assert_frame_equal(read_offline_snapshot(tmp_path), p)
    p2 = p.assign(events_7d=p["events_7d"] + 1)
    assert write_offline_snapshot(p2, tmp_path, AS_OF) == path
    pd.testing.assert_frame_equal(read_offline_snapshot(tmp_path, AS_OF), p2)
    assert [f.name for f in path.parent.iterdir()] == ["profiles.parquet"]


def test_snapshot_reads_latest_partition_on_or_before_as_of(tmp_path):
    base = _build(_interactions()).reset_index()
    for day in ("2024-03-01", "2024-03-10", "2024-03-20"):
        write_offline_snapshot(base.assign(mean_rating=float(day[-2:])), tmp_path, pd.Timestamp(day))
    assert read_offline_snapshot(tmp_path)["mean_rating"].iloc[0] == 20.0
    assert read_offline_snapshot(tmp_path, pd.Timestamp("2024-03-15 23:00"))["mean_rating"].iloc[0] == 10.0
    assert read_offline_snapshot(tmp_path, pd.Timestamp("2024-03-10"))["mean_rating"].iloc[0] == 10.0
    with pytest.raises(FileNotFoundError, match="on or before 2024-02-28"):
        read_offline_snapshot(tmp_path, pd.Timestamp("2024-02-28"))


def test_one_day_window_activity_stats_and_day_type():
    p = _build(_interactions())
    a, b = p.loc["a"], p.loc["b"]
    # The event exactly one day before as_of is outside the (as_of - 1d, as_of] window.
    assert (a.events_1d, a.clicks_1d, a.clicks_7d, a.events_total) == (0, 0, 1, 3)
    assert (b.events_1d, b.events_total) == (1, 1)
    assert a.click_rate == pytest.approx(1 / 3)
    assert a.mean_dwell == pytest.approx((10 + 30 + 100) / 3)
    assert a.mean_scroll == pytest.approx((0.2 + 0.5) / 2)
    assert a.mean_dwell_7d == pytest.approx(10.0)
    assert a.decayed_clicks == pytest.approx(0.5 ** (1 / HL), abs=1e-12)
    # AS_OF is Sunday 2024-03-31: a's events fall on Sat (1 day ago), Thu and Tue; b's on Sunday.
    assert (a.share_weekend, a.share_weekday) == pytest.approx((1 / 3, 2 / 3))
    assert (b.share_weekend, b.share_weekday) == pytest.approx((1.0, 0.0))


def test_explicit_and_implicit_signals():
    p = _build(_interactions().assign(confidence=[0.4, 0.2, 0.8, 0.4]))
    a, b = p.loc["a"], p.loc["b"]
    assert (a.ratings_total, b.ratings_total) == (1, 1)
    assert a.mean_rating == pytest.approx(4.0)
    assert a.mean_implicit_confidence == pytest.approx((0.4 + 0.2) / 2)  # the rate event is explicit
    assert b.mean_implicit_confidence == 0.0  # b has no implicit events
    assert a.decayed_implicit_strength == pytest.approx(0.4 * 0.5 ** (1 / HL) + 0.2 * 0.5 ** (10 / HL), abs=1e-12)


def test_demographics_pass_through_and_one_hot():
    users = pd.DataFrame(
        {
            "user_id": ["a", "b", "c"],
            "age": [20.0, None, 40.0],
            "gender": ["F", None, "M"],
            "region": ["north", "south", "north"],
        }
    )
    events = pd.concat([_interactions(), pd.DataFrame([_event("z", "i1", 2, "rate", rating=3.0)])], ignore_index=True)
    p = _build(events, users=users)
    assert p.loc["a", ["gender_F", "gender_M", "region_north", "region_south"]].tolist() == [1, 0, 1, 0]
    assert p.loc["b", ["gender_F", "gender_M", "region_south"]].tolist() == [0, 0, 1]  # null gender: no indicator
    assert p.loc["z", ["gender_F", "gender_M", "region_north", "region_south"]].tolist() == [0, 0, 0, 0]
    assert p.loc["z"].age == pytest.approx(30.0)  # not in the users table: the median
    assert p["gender_F"].dtype == np.int64
    assert not any(c.startswith("gender_") for c in _build(_interactions()).columns)  # no gender column in users
