"""The retraining policy: drift retrains, unless within the cool-down of the last retrain
decision (forced runs ignore it); every decision is kept in the decisions log."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from monitoring import trigger

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def local(settings, tmp_path):
    return settings.model_copy(
        update={"home": tmp_path, "drift": settings.drift.model_copy(update={"cooldown_hours": 6})}
    )


def _retrained(settings, at: datetime) -> None:
    trigger.record(settings, trigger.Decision(trigger.RETRAIN, "drift found", at.isoformat(), "r1", batches=["b1"]))


def test_no_drift_never_retrains(local):
    assert trigger.decide(local, drifted=False, now=NOW)[0] == trigger.NO_DRIFT


def test_drift_retrains_when_no_retrain_is_recent(local):
    assert trigger.decide(local, drifted=True, now=NOW)[0] == trigger.RETRAIN
    _retrained(local, NOW - timedelta(hours=7))
    assert trigger.decide(local, drifted=True, now=NOW)[0] == trigger.RETRAIN


def test_drift_within_the_cool_down_is_skipped_unless_forced(local):
    _retrained(local, NOW - timedelta(hours=5))
    action, reason = trigger.decide(local, drifted=True, now=NOW)
    assert action == trigger.COOL_DOWN == "skipped: cool-down"
    assert "cool-down until 2026-12-01T13:00:00+00:00" in reason
    action, reason = trigger.decide(local, drifted=True, forced=True, now=NOW)
    assert action == trigger.RETRAIN and "forced" in reason


def test_the_log_keeps_every_decision_and_the_checked_batches(local):
    _retrained(local, NOW - timedelta(hours=1))
    trigger.record(local, trigger.Decision(trigger.NO_DRIFT, "calm", NOW.isoformat(), "r2", batches=["b2", "b3"]))
    assert [d["action"] for d in trigger.read_decisions(local)] == [trigger.RETRAIN, trigger.NO_DRIFT]
    assert trigger.checked_batches(local) == {"b1", "b2", "b3"}
    assert trigger.last_retrain_at(local) == NOW - timedelta(hours=1)
