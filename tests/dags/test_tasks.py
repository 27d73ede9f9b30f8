"""The bookkeeping of hyperrec.tasks inside a (stand-in) Airflow task context: timings
under the task id, data-quality failures final, the run's params and run type recorded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from core.errors import DataQualityError
from core.run_context import RunContext
from hyperrec import tasks


@pytest.fixture
def in_task():
    """Enter a task context the way Airflow's task runner does."""
    from airflow.sdk.execution_time.context import set_current_context

    def enter(
        task_id: str,
        run_id: str = "manual__2026-01-01T00:00:00+00:00",
        run_type="manual",
        triggering_asset_events=None,
        outlet_events=None,
        **params,
    ):
        ctx = {
            "ti": SimpleNamespace(task_id=task_id),
            "run_id": run_id,
            "dag_run": SimpleNamespace(run_type=run_type),
            "params": params,
            "triggering_asset_events": triggering_asset_events or {},
            "outlet_events": outlet_events,
        }
        return set_current_context(ctx)

    return enter


def test_run_stage_times_under_the_task_id(settings, tmp_path, in_task):
    calls = []

    def publish_champion(settings, run):
        calls.append(run.root)
        return {"current": "v1"}

    with in_task("publish"):
        assert tasks.run_stage(publish_champion, str(tmp_path)) == str(tmp_path)
    with in_task("promote"):
        tasks.run_stage(lambda settings, run: {}, str(tmp_path))
    assert calls == [tmp_path]
    assert set(RunContext.open(tmp_path).read_json("timings.json")) == {"publish", "promote"}


def test_a_data_quality_error_fails_the_task_for_good(tmp_path, in_task):
    from airflow.sdk.exceptions import AirflowFailException

    def validate(settings, run):
        raise DataQualityError("30% quarantined")

    with in_task("validate"), pytest.raises(AirflowFailException, match="validate: 30% quarantined"):
        tasks.run_stage(validate, str(tmp_path))
    assert not (tmp_path / "timings.json").exists()


def test_other_errors_are_left_to_retries(tmp_path, in_task):
    def train(settings, run):
        raise MemoryError("out of memory")

    with in_task("train"), pytest.raises(MemoryError):
        tasks.run_stage(train, str(tmp_path))


@pytest.mark.parametrize(
    ("reason", "run_type", "expected"),
    [
        (None, "scheduled", "scheduled"),
        ("", "DagRunType.ASSET_TRIGGERED", "asset_triggered"),
        ("demo", "manual", "demo"),
    ],
)
def test_start_run_records_the_run_and_ingests(settings, in_task, reason, run_type, expected):
    run_id = f"{run_type}__{expected}"
    seen = {}

    def ingest(settings, run, **kwargs):
        seen.update(kwargs)
        return {"rows": 1}

    with in_task("ingest", run_id, run_type, dataset="", synthetic_events=5, seed=3, reason=reason):
        run_dir = tasks.start_run(ingest)
    run = RunContext.of_airflow_run(settings, run_id)
    assert run_dir == str(run.root)
    assert seen == {"dataset": "", "synthetic_events": 5, "seed": 3, "landed": True}
    assert run.read_json("airflow_run.json") == {"run_id": run_id, "run_type": run_type}
    assert run.read_json("params.json")["reason"] == expected
    assert set(run.read_json("timings.json")) == {"ingest"}


def test_a_run_woken_by_a_retrain_request_records_drift_as_its_reason(settings, in_task):
    requests = {
        "hyperrec_retrain_request": [
            SimpleNamespace(extra={"reason": "drift", "drift_report": "/r/a.json", "batches": ["b2", "b1"]}),
            SimpleNamespace(extra={"reason": "drift", "drift_report": "/r/b.json", "batches": ["b3"]}),
        ]
    }
    run_id = "asset_triggered__2026-01-02T00:00:00+00:00"
    with in_task("ingest", run_id, "asset_triggered", triggering_asset_events=requests, dataset="", reason=None):
        tasks.start_run(lambda settings, run, **kwargs: {"rows": 1})
    params = RunContext.of_airflow_run(settings, run_id).read_json("params.json")
    assert (params["reason"], params["drift_report"], params["drift_batches"]) == (
        "drift",
        "/r/b.json",
        ["b1", "b2", "b3"],
    )


def test_a_retrain_request_carries_the_report_and_no_retrain_skips(in_task):
    from airflow.sdk.exceptions import AirflowSkipException

    asset = "retrain-asset"
    outlets = {asset: SimpleNamespace(extra={})}
    report = {
        "retrain": True,
        "decision": "retrain",
        "reason": "drift found",
        "json_path": "/d/drift_report.json",
        "html_path": "/d/drift_report.html",
        "batches": ["b1"],
    }
    with in_task("retrain_request", "asset_triggered__x", outlet_events=outlets):
        tasks.request_retraining(report, asset)
    assert outlets[asset].extra["reason"] == "drift" and outlets[asset].extra["batches"] == ["b1"]
    assert outlets[asset].extra["drift_report_html"] == "/d/drift_report.html"
    skipped = {**report, "retrain": False, "decision": "skipped: cool-down", "reason": "cool-down until 10:00"}
    outlets = {asset: SimpleNamespace(extra={})}
    with in_task("retrain_request", outlet_events=outlets), pytest.raises(AirflowSkipException, match="cool-down"):
        tasks.request_retraining(skipped, asset)
    assert outlets[asset].extra == {}
