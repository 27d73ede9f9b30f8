"""The drift stage of recsys_drift_monitor without a current batch (a scheduled run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

import monitoring.stage as stage
from core.run_context import RunContext


def _no_champion(settings):
    raise AssertionError("a run without a batch must not look for the champion")


def test_resolve_current_batch():
    assert stage.resolve_current_batch(None, "") is None
    assert stage.resolve_current_batch(None, None) is None
    assert stage.resolve_current_batch(None, "/data/batch-7") == Path("/data/batch-7")


@pytest.mark.parametrize("current", ["", None])
def test_no_current_batch_skips_and_says_so(settings, tmp_path, monkeypatch, current):
    monkeypatch.setattr(stage, "reference_run_dir", _no_champion)
    run = RunContext.open(tmp_path)
    summary = stage.check_drift(settings, run, current)
    assert summary["retrain"] is False and summary["drifted"] is False
    assert summary["skipped"] == stage.NO_CURRENT_BATCH and summary["current"] is None
    assert run.read_json("drift.json") == summary
    assert not run.drift_dir.exists()  # no report: nothing was compared


def test_a_landing_zone_batch_would_be_checked(settings, tmp_path, monkeypatch):
    # The batch comes from resolve_current_batch, not the raw param: a resolver that finds
    # one (a later landing zone) leads to the comparison, which needs a champion.
    monkeypatch.setattr(stage, "resolve_current_batch", lambda settings, current: tmp_path / "landed")
    monkeypatch.setattr(stage, "reference_run_dir", lambda settings: (_ for _ in ()).throw(LookupError("no champion")))
    with pytest.raises(LookupError, match="no champion"):
        stage.check_drift(settings, RunContext.open(tmp_path), "")


def test_task_without_current_batch_succeeds(settings, monkeypatch):
    from airflow.sdk.execution_time.context import set_current_context

    from hyperrec import tasks

    monkeypatch.setattr(stage, "reference_run_dir", _no_champion)
    run_id = "scheduled__2026-01-01T01:00:00+00:00"
    context = {"ti": SimpleNamespace(task_id="drift_report"), "run_id": run_id, "params": {"current": None}}
    with set_current_context(context):  # the DAG's default: no current batch
        report = tasks.check_drift(stage.check_drift)
    assert report["retrain"] is False and report["skipped"].startswith("no current batch")
    run = RunContext.of_airflow_run(settings, run_id)
    assert run.read_json("drift.json") == report and set(run.read_json("timings.json")) == {"drift_report"}
