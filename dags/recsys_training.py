"""Training: ingest → preprocess → validate → build_features → segment → train → evaluate →
register → promote → publish, one task per stage passing the run directory on. It runs
nightly and whenever the drift monitor requests a retrain (asset ``hyperrec_retrain_request``),
on its dataset plus the batches landed within ``landing.window_days``. A failed data-quality
gate fails its task at once; other failures are retried."""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from core.settings import load_settings
from hyperrec.assets import RETRAIN_NAME, schedule
from hyperrec.tasks import run_stage, start_run

SETTINGS = load_settings()

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(seconds=30)}


@dag(
    dag_id="recsys_training",
    schedule=schedule(SETTINGS.airflow.training_schedule, RETRAIN_NAME),
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
        "landed": Param(
            True, type="boolean", description="add the batches landed within landing.window_days to the dataset"
        ),
        "reason": Param(
            None,
            type=["null", "string"],
            description="why this run started; empty: the triggering retrain request's reason (drift), "
            "else the run type (scheduled, manual)",
        ),
        "drift_report": Param(
            None, type=["null", "string"], description="the drift report that triggered this run, if any"
        ),
        "force_search": Param(
            False,
            type="boolean",
            description="search the hyperparameters and blend weights again instead of reusing the champion's "
            "(training.search: warm reuses them until training.research_every_days)",
        ),
    },
    tags=["hyperrec", "training"],
    doc_md=__doc__,
)
def recsys_training():
    # Stage modules are imported inside the tasks: parsing this file stays cheap.
    @task
    def ingest() -> str:
        from pipelines import ingest

        return start_run(ingest.ingest)

    @task
    def preprocess(run_dir: str) -> str:
        from pipelines import stage

        return run_stage(stage.preprocess, run_dir)

    @task
    def validate(run_dir: str) -> str:
        from pipelines import stage

        return run_stage(stage.validate, run_dir)

    @task
    def build_features(run_dir: str) -> str:
        from feature_store import stage

        return run_stage(stage.build_features, run_dir)

    @task
    def segment(run_dir: str) -> str:
        from feature_store import stage

        return run_stage(stage.segment, run_dir)

    @task
    def train(run_dir: str) -> str:
        from training import stage

        return run_stage(stage.train, run_dir)

    @task
    def evaluate(run_dir: str) -> str:
        from training import stage

        return run_stage(stage.evaluate, run_dir)

    @task
    def register(run_dir: str) -> str:
        from serving import publish  # registers the serving tier's pyfunc

        return run_stage(publish.register, run_dir)

    @task
    def promote(run_dir: str) -> str:
        from training import stage

        return run_stage(stage.promote, run_dir)

    @task
    def publish(run_dir: str) -> str:
        from serving import publish

        return run_stage(publish.publish_champion, run_dir)

    run_dir = ingest()
    for stage_task in (preprocess, validate, build_features, segment, train, evaluate, register, promote, publish):
        run_dir = stage_task(run_dir)


recsys_training()
