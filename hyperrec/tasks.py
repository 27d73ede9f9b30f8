"""The bookkeeping every DAG task shares. A task passes its stage function
``fn(settings, run, **kwargs) -> dict`` here; the stage runs on the run directory with
settings rebuilt from ``HYPERREC_CONFIG`` (see :func:`hyperrec.orchestration.configure_airflow`),
and its time goes to the run's ``timings.json`` under the current task's id."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from core.errors import DataQualityError, UserError
from core.run_context import RunContext
from core.settings import load_settings

log = logging.getLogger("hyperrec")

Stage = Callable[..., dict]


def _context() -> Any:
    from airflow.sdk import get_current_context

    return get_current_context()


def _timed(run: RunContext, fn: Stage, **kwargs: Any) -> dict:
    """Run ``fn(settings, run, **kwargs)`` and record its seconds under the current task id.

    A :class:`DataQualityError` or :class:`UserError` (a missing dataset, an unusable
    input file) fails the task at once (no retries: neither gets better by itself);
    other errors leave retrying to Airflow.
    """
    from airflow.sdk.exceptions import AirflowFailException

    task_id = _context()["ti"].task_id
    start = time.perf_counter()
    try:
        result = fn(load_settings(), run, **kwargs)
    except (DataQualityError, UserError) as exc:
        log.error("%s failed: %s", task_id, exc)
        raise AirflowFailException(f"{task_id}: {exc}") from exc
    elapsed = time.perf_counter() - start
    timings = run.read_json("timings.json") if run.path("timings.json").exists() else {}
    timings[task_id] = round(elapsed, 2)
    run.write_json("timings.json", timings)
    log.info("%s finished in %.1fs: %s", task_id, elapsed, json.dumps(result, default=str)[:2000])
    return result


def triggering_requests(context: Any) -> list[dict]:
    """The ``extra`` of every asset event that triggered the current run (none for a
    cron or manual run)."""
    events = context.get("triggering_asset_events") or {}
    return [dict(event.extra or {}) for batch in events.values() for event in batch]


def start_run(ingest: Stage) -> str:
    """Create the run directory of the current Airflow run and ``ingest`` its data into it;
    return the directory.

    Writes ``airflow_run.json`` (run id and type) and ``params.json``. An empty ``reason``
    param is taken from the asset events that triggered the run (a drift check's retrain
    request says ``drift`` and names its report and batches), else from the run type
    (scheduled, manual, asset_triggered, ...).
    """
    context = _context()
    airflow_run_id, run_type = context["run_id"], str(context["dag_run"].run_type)
    params = dict(context["params"])
    run = RunContext.create(load_settings(), airflow_run_id)
    requests = triggering_requests(context)
    if requests and not params.get("reason"):
        newest = requests[-1]
        params = {
            **params,
            "reason": newest.get("reason") or "asset_triggered",
            "drift_report": params.get("drift_report") or newest.get("drift_report"),
            "drift_batches": sorted({b for r in requests for b in r.get("batches", [])}),
            "drift_decisions": [r.get("monitor_run_id") for r in requests],
        }
    params = {**params, "reason": params.get("reason") or run_type.rsplit(".", 1)[-1].lower()}
    run.write_json("airflow_run.json", {"run_id": airflow_run_id, "run_type": run_type})
    run.write_json("params.json", params)
    _timed(
        run,
        ingest,
        dataset=params.get("dataset", "ml-100k"),
        synthetic_events=int(params.get("synthetic_events", 0)),
        seed=int(params.get("seed", 0)),
        landed=bool(params.get("landed", True)),
    )
    return str(run.root)


def run_stage(fn: Stage, run_dir: str) -> str:
    """Run ``fn(settings, run)`` on ``run_dir``; return ``run_dir`` for the next task."""
    _timed(RunContext.open(run_dir), fn)
    return run_dir


def check_drift(check: Stage) -> dict:
    """Run the drift ``check`` (params ``current`` and ``force``) in a run directory of its
    own; return its summary. Its decision and the report's location go to the task log."""
    context = _context()
    run = RunContext.create(load_settings(), context["run_id"])
    params = context["params"]
    report = _timed(
        run,
        check,
        current=params.get("current") or "",
        force=bool(params.get("force", False)),
        airflow_run_id=context["run_id"],
    )
    log.info("drift decision: %s (%s); batches: %s", report["decision"], report["reason"], report.get("batches"))
    if report.get("html_path"):
        log.info("Evidently drift report: %s (MLflow run %s)", report["html_path"], report.get("mlflow_run_id"))
    return report


def request_retraining(report: dict, retrain_asset: Any) -> None:
    """Update ``retrain_asset`` (waking ``recsys_training``) with the batches and the report
    when ``report`` decided to retrain; otherwise skip, so no asset event is emitted."""
    from airflow.sdk.exceptions import AirflowSkipException

    context = _context()
    if not report.get("retrain"):
        raise AirflowSkipException(f"no retrain: {report['decision']} ({report['reason']})")
    context["outlet_events"][retrain_asset].extra = {
        "reason": "drift",
        "drift_report": report["json_path"],
        "drift_report_html": report["html_path"],
        "batches": report["batches"],
        "monitor_run_id": context["run_id"],
        "mlflow_drift_run_id": report.get("mlflow_run_id"),
    }
    log.info("retraining requested: %s", report["reason"])
