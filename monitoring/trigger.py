"""Retraining policy: turns a drift check into a recorded decision.

A decision is one of :data:`ACTIONS`. ``retrain`` wakes ``recsys_training`` (through the
drift asset); ``skipped: cool-down`` means drift was found within ``drift.cooldown_hours``
of the last drift-triggered retrain; ``no drift`` and ``no new batch`` retrain nothing.
Every decision is appended to ``<home>/monitoring/decisions.jsonl`` with its report.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from core.settings import Settings

RETRAIN = "retrain"
COOL_DOWN = "skipped: cool-down"
NO_DRIFT = "no drift"
NO_BATCH = "no new batch"
ACTIONS = (RETRAIN, COOL_DOWN, NO_DRIFT, NO_BATCH)


@dataclass
class Decision:
    """What one drift-monitor run decided, and from what."""

    action: str
    reason: str
    at: str
    airflow_run_id: str
    batches: list[str] = field(default_factory=list)
    forced: bool = False
    drifted: bool = False
    report_html: str | None = None
    report_json: str | None = None
    drifted_columns: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None

    @property
    def retrain(self) -> bool:
        return self.action == RETRAIN


def decisions_path(settings: Settings) -> Path:
    return settings.home / "monitoring" / "decisions.jsonl"


def read_decisions(settings: Settings) -> list[dict]:
    """Every recorded decision, oldest first."""
    path = decisions_path(settings)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(settings: Settings, decision: Decision) -> None:
    """Append ``decision`` to the decisions log (one fsynced JSON line)."""
    path = decisions_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(asdict(decision), sort_keys=True) + "\n")
        out.flush()
        os.fsync(out.fileno())


def checked_batches(settings: Settings) -> set[str]:
    """Batches a recorded decision already covered."""
    return {name for d in read_decisions(settings) for name in d.get("batches", [])}


def last_retrain_at(settings: Settings) -> datetime | None:
    """When the last ``retrain`` decision was made, or None."""
    times = [datetime.fromisoformat(d["at"]) for d in read_decisions(settings) if d["action"] == RETRAIN]
    return max(times) if times else None


def decide(settings: Settings, *, drifted: bool, forced: bool = False, now: datetime | None = None) -> tuple[str, str]:
    """``(action, reason)`` for a drift check: retrain on drift unless the last retrain
    decision is less than ``drift.cooldown_hours`` old (``forced`` ignores the cool-down)."""
    now = now or datetime.now(UTC)
    if not drifted:
        return NO_DRIFT, "the share of drifted features stayed below drift.drift_share"
    last = last_retrain_at(settings)
    cooldown = timedelta(hours=settings.drift.cooldown_hours)
    if last is not None and now - last < cooldown and not forced:
        until = (last + cooldown).isoformat(timespec="seconds")
        return (
            COOL_DOWN,
            f"drift found, but the last retrain started at {last.isoformat(timespec='seconds')}: "
            f"cool-down until {until}",
        )
    return RETRAIN, "drift found" + (" (forced by hand: cool-down ignored)" if forced and last else "")
