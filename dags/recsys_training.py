"""Nightly training: ingest → preprocess → validate → build_features → segment →
train → evaluate → register → promote → publish. Wiring only: every task calls
one stage function and passes the run directory on."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from hyperrec.tasks import run_stage, start_run

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="recsys_training",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "dataset": Param("ml-100k", type="string", description="'ml-100k', a raw dataset directory, or '' for none"),
        "synthetic_events": Param(0, type="integer", minimum=0, description="add a synthetic sample of this many events"),
        "seed": Param(0, type="integer"),
        "reason": Param("scheduled", type="string", description="why this run started (scheduled, manual, drift)"),
        "drift_report": Param("", type="string", description="the drift report that triggered this run, if any"),
    },
    tags=["hyperrec", "training"],
)
def recsys_training():
    @task
    def ingest() -> str:
        context = get_current_context()
        return start_run(context["run_id"], dict(context["params"]))

    @task
    def preprocess(run_dir: str) -> str:
        return run_stage("pipelines.stage:preprocess", run_dir)

    @task
    def validate(run_dir: str) -> str:
        return run_stage("pipelines.stage:validate", run_dir)

    @task
    def build_features(run_dir: str) -> str:
        return run_stage("feature_store.stage:build_features", run_dir)

    @task
    def segment(run_dir: str) -> str:
        return run_stage("feature_store.stage:segment", run_dir)

    @task
    def train(run_dir: str) -> str:
        return run_stage("training.stage:train", run_dir)

    @task
    def evaluate(run_dir: str) -> str:
        return run_stage("training.stage:evaluate", run_dir)

    @task
    def register(run_dir: str) -> str:
        return run_stage("training.stage:register", run_dir)

    @task
    def promote(run_dir: str) -> str:
        return run_stage("training.stage:promote", run_dir)

    @task
    def publish(run_dir: str) -> str:
        return run_stage("serving.publish:publish_champion", run_dir)

    run_dir = ingest()
    publish(promote(register(evaluate(train(segment(build_features(validate(preprocess(run_dir)))))))))


recsys_training()
