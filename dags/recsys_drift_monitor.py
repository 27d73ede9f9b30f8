"""Drift monitor: hourly and whenever a batch lands (asset ``hyperrec_landing``). It checks
the batches landed since the last check against the champion's training data (Evidently:
KS for numeric features, a categorical test for the others, and the champion's own output),
records its decision (retrain / skipped: cool-down / no drift / no new batch) and, to retrain,
updates the asset ``hyperrec_retrain_request``, which wakes recsys_training with the batches
and the report."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from core.settings import load_settings
from hyperrec.assets import LANDING_NAME, RETRAIN_NAME, asset, schedule
from hyperrec.tasks import check_drift, request_retraining

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30)}
RETRAIN_REQUEST = asset(RETRAIN_NAME)


@dag(
    dag_id="recsys_drift_monitor",
    schedule=schedule(load_settings().airflow.drift_schedule, LANDING_NAME),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "current": Param(
            None,
            type=["null", "string"],
            description="check this batch (a landed batch name or a raw dataset directory) instead of "
            "the batches landed since the last check",
        ),
        "force": Param(False, type="boolean", description="retrain on drift even within the cool-down"),
    },
    tags=["hyperrec", "monitoring"],
    doc_md=__doc__,
)
def recsys_drift_monitor():
    @task
    def drift_report() -> dict:
        from monitoring import stage  # inside the task: parsing this file stays cheap

        return check_drift(stage.check_drift)

    @task(outlets=[RETRAIN_REQUEST])
    def retrain_request(report: dict) -> None:
        request_retraining(report, RETRAIN_REQUEST)

    retrain_request(drift_report())


recsys_drift_monitor()
