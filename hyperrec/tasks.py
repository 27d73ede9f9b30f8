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

from core.errors import DataQualityError
from core.run_context import RunContext
from core.settings import load_settings

log = logging.getLogger("hyperrec")

Stage = Callable[..., dict]


def _context() -> Any:
    from airflow.sdk import get_current_context

    return get_current_context()


def _timed(run: RunContext, fn: Stage, **kwargs: Any) -> dict:
    """Run ``fn(settings, run, **kwargs)`` and record its seconds under the current task id.

    A :class:`DataQualityError` fails the task at once (no retries: the data will not
    get better by itself); other errors leave retrying to Airflow.
    """
    from airflow.sdk.exceptions import AirflowFailException

    task_id = _context()["ti"].task_id
    start = time.perf_counter()
    try:
        result = fn(load_settings(), run, **kwargs)
    except DataQualityError as exc:
        log.error("data quality gate failed in %s: %s", task_id, exc)
        raise AirflowFailException(f"{task_id}: {exc}") from exc
    elapsed = time.perf_counter() - start
    timings = run.read_json("timings.json") if run.path("timings.json").exists() else {}
    timings[task_id] = round(elapsed, 2)
    run.write_json("timings.json", timings)
    log.info("%s finished in %.1fs: %s", task_id, elapsed, json.dumps(result, default=str)[:2000])
    return result


def start_run(ingest: Stage) -> str:
    """Create the run directory of the current Airflow run and ``ingest`` its data into it;
    return the directory.

    Writes ``airflow_run.json`` (run id and type) and ``params.json``, where an empty
    ``reason`` param is filled from the run type (scheduled, manual, asset_triggered, ...).
    """
    context = _context()
    airflow_run_id, run_type = context["run_id"], str(context["dag_run"].run_type)
    params = dict(context["params"])
    run = RunContext.create(load_settings(), airflow_run_id)
    params = {**params, "reason": params.get("reason") or run_type.rsplit(".", 1)[-1].lower()}
    run.write_json("airflow_run.json", {"run_id": airflow_run_id, "run_type": run_type})
    run.write_json("params.json", params)
    _timed(
        run,
        ingest,
        dataset=params.get("dataset", "ml-100k"),
        synthetic_events=int(params.get("synthetic_events", 0)),
        seed=int(params.get("seed", 0)),
    )
    return str(run.root)


def run_stage(fn: Stage, run_dir: str) -> str:
    """Run ``fn(settings, run)`` on ``run_dir``; return ``run_dir`` for the next task."""
    _timed(RunContext.open(run_dir), fn)
    return run_dir


def check_drift(check: Stage) -> dict:
    """Run the drift ``check`` on the current run's ``current`` param, in a run directory
    of its own; return its report.

    With no current batch (a scheduled run's empty ``current``) nothing is compared: the
    report says ``"skipped"`` with ``retrain`` false, so the run succeeds and retrains nothing.
    """
    context = _context()
    run = RunContext.create(load_settings(), context["run_id"])
    report = _timed(run, check, current=context["params"]["current"])
    if report.get("skipped"):
        log.info("drift check skipped: %s", report["skipped"])
    return report
