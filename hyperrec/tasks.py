"""What the DAG tasks call: settings are rebuilt from ``HYPERREC_CONFIG`` (written by
:func:`hyperrec.orchestration.configure_airflow`) and each stage runs on the run directory.

Stage functions are named as ``"package.module:function"`` and imported on call, so
parsing a DAG file stays cheap.
"""

from __future__ import annotations

import importlib
import json
import logging
import time

from core.errors import DataQualityError
from core.run_context import RunContext
from core.settings import load_settings

log = logging.getLogger("hyperrec")


def _call(target: str, *args, **kwargs):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


def _timed(run: RunContext, stage: str, target: str, *args, **kwargs):
    start = time.perf_counter()
    result = _call(target, load_settings(), run, *args, **kwargs)
    elapsed = time.perf_counter() - start
    timings = run.read_json("timings.json") if run.path("timings.json").exists() else {}
    timings[stage] = round(elapsed, 2)
    run.write_json("timings.json", timings)
    log.info("%s finished in %.1fs: %s", stage, elapsed, json.dumps(result, default=str)[:2000])
    return result


def start_run(airflow_run_id: str, params: dict, run_type: str = "manual") -> str:
    """Create the run directory for an Airflow run and ingest its data; return the directory.

    An empty ``reason`` param is filled from the run type (scheduled, manual, asset_triggered).
    """
    run = RunContext.create(load_settings(), airflow_run_id)
    params = {**params, "reason": params.get("reason") or run_type.rsplit(".", 1)[-1].lower()}
    run.write_json("airflow_run.json", {"run_id": airflow_run_id, "run_type": run_type})
    run.write_json("params.json", params)
    _timed(
        run,
        "ingest",
        "pipelines.ingest:ingest",
        dataset=params.get("dataset", "ml-100k"),
        synthetic_events=int(params.get("synthetic_events", 0)),
        seed=int(params.get("seed", 0)),
    )
    return str(run.root)


def run_stage(target: str, run_dir: str) -> str:
    """Run ``target(settings, run)`` on ``run_dir``; return ``run_dir`` for the next task.

    A :class:`DataQualityError` fails the task at once (no retries: the data will not
    get better by itself); other errors leave retrying to Airflow.
    """
    from airflow.sdk.exceptions import AirflowFailException

    run = RunContext.open(run_dir)
    try:
        _timed(run, target.rpartition(":")[2], target)
    except DataQualityError as exc:
        log.error("data quality gate failed in %s: %s", target, exc)
        raise AirflowFailException(f"{target}: {exc}") from exc
    return run_dir


def check_drift(airflow_run_id: str, current: str = "") -> dict:
    """Run the drift check of ``recsys_drift_monitor`` into a run directory of its own.

    With no current batch (a scheduled run's empty ``current``) nothing is compared: the
    report says ``"skipped"`` with ``retrain`` false, so the run succeeds and retrains nothing.
    """
    run = RunContext.create(load_settings(), airflow_run_id)
    report = _timed(run, "drift", "monitoring.stage:check_drift", current=current)
    if report.get("skipped"):
        log.info("drift check skipped: %s", report["skipped"])
    return report
