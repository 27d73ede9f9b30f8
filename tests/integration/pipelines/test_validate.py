"""GX quality gates on small Spark DataFrames."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest
from pyspark.sql import functions as F

from core.schemas import INTERACTIONS, ITEMS, USERS
from pipelines.validate import (
    IMPLICIT_EVENTS,
    NOT_APPLICABLE_META,
    GateResult,
    ValidationFailed,
    features_expectations,
    interactions_expectations,
    row_count_bounds,
    run_suite,
    validate_features,
    validate_interactions,
    validate_items,
    validate_quarantine,
    validate_users,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
KEY = list(INTERACTIONS.key)


def _event(
    user="u1", item="i1", event="view", rating=None, dwell=12.5, scroll=0.4, device="mobile", session="s1", minute=0
):
    ts = T0.replace(minute=minute)
    return (user, item, event, rating, dwell, scroll, device, session, ts, None)


def _clean_rows():
    return [
        _event("u1", "i1", "view", minute=0),
        _event("u1", "i2", "rate", rating=4.0, minute=1),
        _event("u2", "i1", "click", device=None, scroll=None, minute=2),
        _event("u2", "i3", "complete", dwell=0.0, scroll=1.0, device="tv", minute=3),
        _event("u3", "i2", "like", session=None, minute=4),
    ]


def _interactions(spark, rows):
    return spark.createDataFrame(rows, INTERACTIONS.spark())


@pytest.mark.spark
def test_clean_interactions_pass_and_render_docs(spark, tmp_path):
    df = _interactions(spark, _clean_rows())
    docs = tmp_path / "docs"
    gate = validate_interactions(
        df,
        stage="processed",
        docs_dir=docs,
        known_users=["u1", "u2", "u3"],
        known_items=["i1", "i2", "i3"],
        unique_key=KEY,
    )
    assert isinstance(gate, GateResult)
    assert gate.success and gate.failed == []
    assert gate.row_count == 5
    assert gate.evaluated == 14  # 11 base + 2 referential + 1 compound key
    assert gate.docs_index == docs / "index.html" and gate.docs_index.exists()
    assert "interactions_processed" in gate.docs_index.read_text()
    assert not df.is_cached  # the gate releases what GX persisted


@pytest.mark.spark
def test_out_of_range_and_unknown_event_fail_with_named_expectations(spark, tmp_path):
    rows = _clean_rows() + [_event("u3", "i3", "view", scroll=1.5, minute=5), _event("u1", "i3", "teleport", minute=6)]
    docs = tmp_path / "docs"
    with pytest.raises(ValidationFailed) as info:
        validate_interactions(_interactions(spark, rows), stage="raw", docs_dir=docs)
    message = str(info.value)
    assert "expect_column_values_to_be_between" in message and "scroll_depth" in message
    assert "1 of 7 rows failed" in message
    assert "expect_column_values_to_be_in_set" in message and "event_type" in message
    failed = {(f["expectation"], f["column"]): f for f in info.value.results}
    assert set(failed) == {
        ("expect_column_values_to_be_between", "scroll_depth"),
        ("expect_column_values_to_be_in_set", "event_type"),
    }
    assert failed[("expect_column_values_to_be_between", "scroll_depth")]["unexpected_count"] == 1
    assert failed[("expect_column_values_to_be_in_set", "event_type")]["details"]["unexpected_sample"] == ["teleport"]
    assert (docs / "index.html").exists()  # docs rendered on failure too


@pytest.mark.spark
def test_no_raise_returns_failed_gate(spark, tmp_path):
    rows = _clean_rows() + [_event(dwell=-3.0, rating=7.0, event="rate", minute=9)]
    gate = validate_interactions(
        _interactions(spark, rows), stage="raw", docs_dir=tmp_path / "d", raise_on_failure=False
    )
    assert not gate.success
    assert sorted(f["column"] for f in gate.failed) == ["dwell_time_s", "rating"]
    assert gate.docs_index is not None and gate.docs_index.exists()


@pytest.mark.spark
def test_referential_miss_is_caught(spark, tmp_path):
    rows = _clean_rows() + [_event("ghost", "i1", minute=7)]
    with pytest.raises(ValidationFailed) as info:
        validate_interactions(
            _interactions(spark, rows),
            stage="processed",
            docs_dir=tmp_path / "docs",
            known_users=["u1", "u2", "u3"],
            known_items=["i1", "i2", "i3"],
        )
    (failure,) = info.value.results
    assert failure["expectation"] == "expect_column_values_to_be_in_set"
    assert failure["column"] == "user_id"
    assert failure["unexpected_count"] == 1 and failure["element_count"] == 6
    assert "ghost" in str(info.value)


@pytest.mark.spark
def test_duplicate_key_is_caught(spark, tmp_path):
    rows = _clean_rows() + [_clean_rows()[0]]
    with pytest.raises(ValidationFailed) as info:
        validate_interactions(_interactions(spark, rows), stage="processed", docs_dir=tmp_path / "docs", unique_key=KEY)
    (failure,) = info.value.results
    assert failure["expectation"] == "expect_compound_columns_to_be_unique"
    assert failure["unexpected_count"] == 2  # both copies of the duplicated row
    assert "expect_compound_columns_to_be_unique" in str(info.value)


@pytest.mark.spark
def test_schema_mismatch_is_caught(spark, tmp_path):
    df = _interactions(spark, _clean_rows()).drop("device")
    with pytest.raises(ValidationFailed) as info:
        validate_interactions(df, stage="raw", docs_dir=tmp_path / "docs")
    kinds = {f["expectation"] for f in info.value.results}
    assert "expect_table_columns_to_match_set" in kinds


@pytest.mark.spark
def test_users_and_items_gates(spark, tmp_path):
    docs = tmp_path / "docs"
    users = spark.createDataFrame([("u1", 30, "F", "x", "eu"), ("u2", None, None, None, None)], USERS.spark())
    items = spark.createDataFrame([("i1", "A title", None, ["news"], T0)], ITEMS.spark())
    assert validate_users(users, stage="raw", docs_dir=docs).success
    assert validate_items(items, stage="raw", docs_dir=docs).row_count == 1

    bad_users = spark.createDataFrame([("u1", 30, None, None, None), ("u1", 150, None, None, None)], USERS.spark())
    with pytest.raises(ValidationFailed) as info:
        validate_users(bad_users, stage="processed", docs_dir=docs)
    assert {(f["expectation"], f["column"]) for f in info.value.results} == {
        ("expect_column_values_to_be_unique", "user_id"),
        ("expect_column_values_to_be_between", "age"),
    }
    bad_items = spark.createDataFrame([("i1", "t", None, None, None)], ITEMS.spark()).withColumn(
        "title", F.lit(None).cast("string")
    )
    gate = validate_items(bad_items, stage="processed", docs_dir=docs, raise_on_failure=False)
    assert [(f["expectation"], f["column"]) for f in gate.failed] == [("expect_column_values_to_not_be_null", "title")]
    index = (docs / "index.html").read_text()
    assert "users_raw" in index and "items_processed" in index  # one site lists every gate of the run


def _reasons(spark, good: int, bad: dict[str, int]):
    rows = [(None,)] * good + [(reason,) for reason, n in bad.items() for _ in range(n)]
    return spark.createDataFrame(rows, "reason string")


@pytest.mark.spark
def test_quarantine_gate_fails_above_threshold_with_reason_counts(spark, tmp_path):
    df = _reasons(spark, 7, {"bad_timestamp": 2, "unknown_event": 1})
    with pytest.raises(ValidationFailed) as info:
        validate_quarantine(df, stage="clean", docs_dir=tmp_path / "docs", max_fraction=0.05)
    message = str(info.value)
    assert message.startswith("quarantine_clean:")
    assert "expect_column_values_to_be_null" in message and "'reason'" in message
    assert "3 of 10 rows failed" in message
    assert "bad_timestamp=2" in message and "unknown_event=1" in message
    (failure,) = info.value.results
    assert failure["kwargs"]["mostly"] == pytest.approx(0.95)
    assert failure["details"]["reason_counts"] == {"bad_timestamp": 2, "unknown_event": 1}
    assert list(failure["details"]["reason_counts"]) == ["bad_timestamp", "unknown_event"]  # most frequent first


@pytest.mark.spark
def test_quarantine_gate_passes_below_threshold(spark, tmp_path):
    docs = tmp_path / "docs"
    gate = validate_quarantine(
        _reasons(spark, 999, {"bad_timestamp": 1}), stage="clean", docs_dir=docs, max_fraction=0.05
    )
    assert gate.success and gate.row_count == 1000 and gate.evaluated == 2
    assert "quarantine_clean" in (docs / "index.html").read_text()
    # the same frame at a zero tolerance fails, returned rather than raised
    strict = validate_quarantine(
        _reasons(spark, 999, {"bad_timestamp": 1}),
        stage="strict",
        docs_dir=docs,
        max_fraction=0.0,
        raise_on_failure=False,
    )
    assert not strict.success
    assert strict.failed[0]["details"]["reason_counts"] == {"bad_timestamp": 1}


@pytest.mark.spark
def test_quarantine_gate_rejects_empty_input(spark, tmp_path):
    with pytest.raises(ValidationFailed) as info:
        validate_quarantine(_reasons(spark, 0, {}), stage="clean", docs_dir=tmp_path / "docs", max_fraction=0.05)
    assert "expect_table_row_count_to_be_between" in str(info.value)


@pytest.mark.spark
def test_interactions_row_count_and_mean_bounds(spark, tmp_path):
    # 5 rows. The means cover the 4 implicit events (not the rating): dwell (12.5*3 + 0)/4
    # = 9.375 (over all 5 rows: 10.0); scroll of 0.4, 1.0, 0.4 = 0.6 (over all: 0.55).
    df = _interactions(spark, _clean_rows())
    docs = tmp_path / "docs"
    gate = validate_interactions(
        df,
        stage="processed",
        docs_dir=docs,
        row_count_between=(4, 6),
        dwell_mean_between=(9.0, 9.5),
        scroll_mean_between=(0.58, 0.62),
    )
    assert gate.success and gate.evaluated == 14  # 11 base + 3 optional
    assert gate.not_applicable == []

    with pytest.raises(ValidationFailed) as info:
        validate_interactions(df, stage="processed", docs_dir=docs, row_count_between=(10, 20))
    (failure,) = info.value.results
    assert failure["expectation"] == "expect_table_row_count_to_be_between"
    assert failure["kwargs"]["min_value"] == 10 and failure["details"]["observed_value"] == 5
    assert "expect_table_row_count_to_be_between" in str(info.value) and "min_value=10" in str(info.value)

    with pytest.raises(ValidationFailed) as info:
        validate_interactions(df, stage="processed", docs_dir=docs, dwell_mean_between=(20.0, 30.0))
    (failure,) = info.value.results
    assert (failure["expectation"], failure["column"]) == ("expect_column_mean_to_be_between", "dwell_time_s")
    assert failure["details"]["observed_value"] == pytest.approx(9.375)
    assert "dwell_time_s" in str(info.value) and "observed 9.375" in str(info.value)


MEANS = dict(dwell_mean_between=(1.0, 3600.0), scroll_mean_between=(0.05, 0.95))  # config/default.yaml


def _ratings(n=20, dwell=None, scroll=None):
    """A ratings-only feed like MovieLens: explicit 'rate' events, no implicit signals."""
    return [
        _event(f"u{i % 4}", f"i{i}", "rate", rating=float(1 + i % 5), dwell=dwell, scroll=scroll, device=None, minute=i)
        for i in range(n)
    ]


def test_mean_expectations_are_conditioned_on_implicit_events():
    means = [e for e in interactions_expectations(**MEANS) if e.expectation_type == "expect_column_mean_to_be_between"]
    assert [e.column for e in means] == ["dwell_time_s", "scroll_depth"]
    assert all(e.row_condition == IMPLICIT_EVENTS for e in means)
    assert (means[0].min_value, means[0].max_value) == (1.0, 3600.0)

    kinds = [e.expectation_type for e in interactions_expectations(**MEANS, implicit_events=False)]
    assert "expect_column_mean_to_be_between" not in kinds
    (stand_in,) = [e for e in interactions_expectations(**MEANS, implicit_events=False) if e.meta]
    assert stand_in.expectation_type == "expect_table_row_count_to_be_between"
    assert (stand_in.min_value, stand_in.max_value, stand_in.row_condition) == (0, 0, IMPLICIT_EVENTS)
    left_out = stand_in.meta[NOT_APPLICABLE_META]["expectations"]
    assert [(e["column"], e["min_value"], e["max_value"]) for e in left_out] == [
        ("dwell_time_s", 1.0, 3600.0),
        ("scroll_depth", 0.05, 0.95),
    ]
    assert "Not applicable" in stand_in.description and "dwell_time_s" in stand_in.description
    # Without mean bounds there is nothing to record as not applicable.
    assert interactions_expectations(implicit_events=False) == interactions_expectations()


@pytest.mark.spark
def test_ratings_only_feed_records_mean_checks_as_not_applicable(spark, tmp_path):
    df = _interactions(spark, _ratings())
    docs = tmp_path / "docs"
    # What the gate did before: the means of columns explicit ratings never carry fail.
    old = run_suite(
        df,
        table="interactions",
        stage="old",
        expectations=interactions_expectations(**MEANS),
        docs_dir=docs,
        raise_on_failure=False,
    )
    assert {(f["expectation"], f["column"]) for f in old.failed} == {
        ("expect_column_mean_to_be_between", "dwell_time_s"),
        ("expect_column_mean_to_be_between", "scroll_depth"),
    }
    assert all(f["details"].get("observed_value") is None for f in old.failed)

    gate = validate_interactions(df, stage="clean", docs_dir=docs, unique_key=KEY, **MEANS)
    assert gate.success and gate.failed == [] and gate.row_count == 20
    assert gate.evaluated == 13  # 11 base + compound key + the not-applicable record
    (record,) = gate.not_applicable
    assert record["reason"] == "no implicit events"
    assert [e["column"] for e in record["expectations"]] == ["dwell_time_s", "scroll_depth"]
    # The record is in the validation result the Data Docs render, not silently dropped.
    (page,) = (docs / "validations" / "interactions_clean").rglob("*.html")
    assert "Not applicable: the mean of dwell_time_s in [1.0, 3600.0] and the mean of scroll_depth" in page.read_text()


@pytest.mark.spark
def test_not_applicable_record_is_itself_checked(spark, tmp_path):
    # Built for a ratings-only feed but run on one with an implicit event: it fails.
    df = _interactions(spark, _ratings() + [_event("u1", "i1", "view", minute=59)])
    gate = run_suite(
        df,
        table="interactions",
        stage="clean",
        docs_dir=tmp_path / "docs",
        raise_on_failure=False,
        expectations=interactions_expectations(**MEANS, implicit_events=False),
    )
    assert not gate.success and gate.not_applicable == [] and gate.row_count == 21
    (failure,) = gate.failed
    assert failure["expectation"] == "expect_table_row_count_to_be_between"
    assert failure["details"]["observed_value"] == 1


@pytest.mark.spark
def test_mean_checks_skip_ratings_but_still_fail_implicit_events_out_of_range(spark, tmp_path):
    docs = tmp_path / "docs"
    # Ratings with wild signals do not move the means of the implicit events (dwell 10, scroll 0.5).
    mixed = _ratings(dwell=9000.0, scroll=0.0) + [
        _event(f"u{i}", "i1", "view", dwell=10.0, scroll=0.5, minute=40 + i) for i in range(4)
    ]
    gate = validate_interactions(
        _interactions(spark, mixed),
        stage="mixed",
        docs_dir=docs,
        dwell_mean_between=(5.0, 20.0),
        scroll_mean_between=(0.4, 0.6),
    )
    assert gate.success and gate.not_applicable == []

    # Implicit events whose means are out of range fail, with or without ratings alongside.
    for stage, rows in (("implicit", []), ("implicit_and_ratings", _ratings())):
        rows = rows + [_event(f"u{i}", "i2", "click", dwell=0.2, scroll=0.99, minute=30 + i) for i in range(5)]
        with pytest.raises(ValidationFailed) as info:
            validate_interactions(_interactions(spark, rows), stage=stage, docs_dir=docs, **MEANS)
        failed = {f["column"]: f for f in info.value.results}
        assert set(failed) == {"dwell_time_s", "scroll_depth"}
        assert {f["expectation"] for f in failed.values()} == {"expect_column_mean_to_be_between"}
        assert failed["dwell_time_s"]["details"]["observed_value"] == pytest.approx(0.2)
        assert failed["scroll_depth"]["details"]["observed_value"] == pytest.approx(0.99)


def _profiles(**overrides):
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3"],
            "events_7d": [3, 0, 1],
            "events_30d": [10, 2, 1],
            "decayed_activity": [2.5, 0.1, 0.0],
            "cat_Comedy": [0.6, 0.0, 1.0],
            "cat_Drama": [0.4, 1.0, 0.0],
            "share_mobile": [1.0 + 1e-12, 0.5, 0.0],  # float noise above 1 is tolerated
            "age": [30.0, None, 150.0],  # not a share/count feature: unchecked
        }
    )
    for column, values in overrides.items():
        frame[column] = values
    return frame


def test_features_expectations_follow_columns():
    kinds = [(e.expectation_type, getattr(e, "column", None)) for e in features_expectations(list(_profiles().columns))]
    between = sorted(c for t, c in kinds if t == "expect_column_values_to_be_between")
    assert between == ["cat_Comedy", "cat_Drama", "decayed_activity", "events_30d", "events_7d", "share_mobile"]
    assert ("expect_column_values_to_be_unique", "user_id") in kinds
    with pytest.raises(ValueError, match="user_id"):
        features_expectations(["cat_x"])


@pytest.mark.spark
def test_features_gate(spark, tmp_path):
    docs = tmp_path / "docs"
    gate = validate_features(spark.createDataFrame(_profiles()), stage="offline", docs_dir=docs)
    assert gate.success and gate.row_count == 3 and gate.evaluated == 9  # rows + 2 key + 6 ranges

    bad = _profiles(share_mobile=[1.5, 0.5, 0.0], user_id=["u1", "u1", "u3"], events_7d=[3, -1, 1])
    with pytest.raises(ValidationFailed) as info:
        validate_features(spark.createDataFrame(bad), stage="offline", docs_dir=docs)
    assert {(f["expectation"], f["column"]) for f in info.value.results} == {
        ("expect_column_values_to_be_between", "share_mobile"),
        ("expect_column_values_to_be_unique", "user_id"),
        ("expect_column_values_to_be_between", "events_7d"),
    }
    assert "user_features_offline" in str(info.value) and "1 of 3 rows failed" in str(info.value)


def test_row_count_bounds():
    assert row_count_bounds(None, 0.2) is None
    assert row_count_bounds(100, 0.1) == (90, 110)
    assert row_count_bounds(1001, 0.1) == (900, 1102)  # floor(900.9), ceil(1101.1)
    assert row_count_bounds(7, 0.0) == (7, 7)
    assert row_count_bounds(10, 1.5) == (0, 25)
    with pytest.raises(ValueError):
        row_count_bounds(10, -0.1)
