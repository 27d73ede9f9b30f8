"""Hourly drift monitor: an Evidently KS report of recent events (param ``current``)
against the champion's training data; drift past the threshold triggers
recsys_training with reason "drift". No ``current`` batch: the check skips."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, task

from core.settings import load_settings
from hyperrec.tasks import check_drift

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="recsys_drift_monitor",
    schedule=load_settings().airflow.drift_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "current": Param(
            None,
            type=["null", "string"],
            description="raw dataset directory holding the recent events; empty: none (the run skips)",
        )
    },
    tags=["hyperrec", "monitoring"],
    doc_md=__doc__,
)
def recsys_drift_monitor():
    @task
    def drift_report() -> dict:
        from monitoring import stage  # inside the task: parsing this file stays cheap

        return check_drift(stage.check_drift)

    @task.short_circuit
    def drift_detected(report: dict) -> bool:
        return bool(report["retrain"])

    trigger_retraining = TriggerDagRunOperator(
        task_id="trigger_retraining",
        trigger_dag_id="recsys_training",
        conf={"reason": "drift", "drift_report": "{{ ti.xcom_pull(task_ids='drift_report')['json_path'] }}"},
        wait_for_completion=False,
    )
    drift_detected(drift_report()) >> trigger_retraining


recsys_drift_monitor()
