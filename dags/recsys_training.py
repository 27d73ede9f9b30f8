"""Nightly training: ingest → preprocess → validate → build_features → segment →
train → evaluate → register → promote → publish. Wiring only: every task calls
one stage function and passes the run directory on."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, get_current_context, task

from core.settings import load_settings
from hyperrec.tasks import run_stage, start_run

SETTINGS = load_settings()

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30)}

# task id → the stage function it runs, in pipeline order after ingest.
STAGES = {
    "preprocess": "pipelines.stage:preprocess",
    "validate": "pipelines.stage:validate",
    "build_features": "feature_store.stage:build_features",
    "segment": "feature_store.stage:segment",
    "train": "training.stage:train",
    "evaluate": "training.stage:evaluate",
    "register": "training.stage:register",
    "promote": "training.stage:promote",
    "publish": "serving.publish:publish_champion",
}


@dag(
    dag_id="recsys_training",
    schedule=SETTINGS.airflow.training_schedule,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        "dataset": Param(
            SETTINGS.training.dataset,
            type="string",
            description="'ml-100k' (bundled MovieLens-100k), a raw dataset directory, or '' for none; "
            "default: the setting training.dataset",
        ),
        "synthetic_events": Param(
            0, type="integer", minimum=0, description="add a seeded synthetic sample of this many events (0: none)"
        ),
        "seed": Param(0, type="integer", description="seed of the synthetic sample"),
        "reason": Param(
            None,
            type=["null", "string"],
            description="why this run started; empty: taken from the run type (scheduled, manual, asset)",
        ),
        "drift_report": Param(
            None, type=["null", "string"], description="the drift report that triggered this run, if any"
        ),
    },
    tags=["hyperrec", "training"],
    doc_md=__doc__,
)
def recsys_training():
    @task
    def ingest() -> str:
        context = get_current_context()
        return start_run(context["run_id"], dict(context["params"]), run_type=str(context["dag_run"].run_type))

    run_dir = ingest()
    for task_id, target in STAGES.items():
        run_dir = task(task_id=task_id)(run_stage)(target, run_dir)


recsys_training()
