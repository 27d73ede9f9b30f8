"""What a scheduled run does: both DAGs with their default params (``conf`` empty), as
the scheduler starts them. ``recsys_training`` then trains on MovieLens-100k alone
(explicit ratings only) and ``recsys_drift_monitor`` has no current batch; neither may
fail by design."""

import pytest

from core.datasets import RawDataset
from core.run_context import RunContext
from hyperrec.orchestration import configure_airflow, dag_runs, migrate_db, run_dag, task_states

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def own_settings(settings, tmp_path_factory):
    """The session's settings under a home of their own (runs, MLflow registry, bundles)
    sharing the session's Airflow DB: the row-count gate compares a run with the previous
    run of its home, so these runs must neither see nor be seen by other tests' runs."""
    home = tmp_path_factory.mktemp("scheduled-home")
    airflow = settings.airflow.model_copy(update={"sql_alchemy_conn": settings.airflow_conn})
    own = settings.model_copy(update={"home": home, "airflow": airflow})
    configure_airflow(own)
    migrate_db()  # the first test counts DAG runs before running one
    yield own
    configure_airflow(settings)  # later tests' tasks read the session's settings again


def test_scheduled_drift_monitor_without_a_batch_succeeds_and_retrains_nothing(own_settings):
    before = len(dag_runs("recsys_training"))
    state, run_id = run_dag(own_settings, "recsys_drift_monitor", {})  # current="": no batch
    assert state == "success"
    states = {
        task: str(s).rpartition(".")[2].lower() for task, s in task_states("recsys_drift_monitor", run_id).items()
    }
    assert states == {"drift_report": "success", "drift_detected": "success", "trigger_retraining": "skipped"}
    # Skipped before looking for a champion: this home has none yet.
    drift = RunContext.of_airflow_run(own_settings, run_id).read_json("drift.json")
    assert drift["retrain"] is False and drift["skipped"].startswith("no current batch")
    assert len(dag_runs("recsys_training")) == before


def test_scheduled_training_on_ml100k_alone_succeeds(own_settings):
    state, run_id = run_dag(own_settings, "recsys_training", {})  # dataset="ml-100k", synthetic_events=0
    run = RunContext.of_airflow_run(own_settings, run_id)
    assert state == "success", (
        run.read_json("validation-attempt.json") if run.path("validation-attempt.json").exists() else state
    )
    params = run.read_json("params.json")
    assert (params["dataset"], params["synthetic_events"]) == ("ml-100k", 0)
    parts = sorted(p.name for p in RawDataset(run.raw_dir).interactions.glob("*.parquet"))
    assert parts and all(name.startswith("ml100k-") for name in parts)  # MovieLens alone
    assert set(run.read_json("timings.json")) == {
        "ingest",
        "preprocess",
        "validate",
        "build_features",
        "segment",
        "train",
        "evaluate",
        "register",
        "promote",
        "publish_champion",
    }
    report = run.read_json("report.json")
    assert report["clean"] > 99_000  # MovieLens-100k's ratings, no synthetic sample
    validation = run.read_json("validation.json")
    assert all(g["success"] for g in validation["gates"].values())
    # The dwell/scroll mean checks were recorded as not applicable, not dropped.
    pages = list((run.gx_dir / "validations" / "interactions_clean").rglob("*.html"))
    assert pages and "Not applicable: the mean of dwell_time_s" in pages[0].read_text()
    registration, promotion = run.read_json("registration.json"), run.read_json("promotion.json")
    assert registration["version"] >= 1 and promotion["promoted"]
    assert run.read_json("publish.json")["current"] == f"v{registration['version']}"
