"""What a scheduled ``recsys_drift_monitor`` run does with its default params (``conf``
empty) when nothing has landed: it records "no new batch", and the run may not fail by design. The scheduled
``recsys_training`` run with its defaults (MovieLens-100k alone) runs under the real
scheduler in ``tests/e2e/test_up_stack.py``."""

import pytest

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
    from hyperrec.assets import RETRAIN_NAME
    from hyperrec.orchestration import asset_events
    from monitoring.trigger import read_decisions

    before, requests = len(dag_runs("recsys_training")), len(asset_events(RETRAIN_NAME))
    state, run_id = run_dag(own_settings, "recsys_drift_monitor", {})  # the landing zone is empty
    assert state == "success"
    states = {
        task: str(s).rpartition(".")[2].lower() for task, s in task_states("recsys_drift_monitor", run_id).items()
    }
    assert states == {"drift_report": "success", "retrain_request": "skipped"}
    # Decided before looking for a champion: this home has none yet.
    drift = RunContext.of_airflow_run(own_settings, run_id).read_json("drift.json")
    assert drift["retrain"] is False and drift["decision"] == "no new batch" and drift["batches"] == []
    assert [d["action"] for d in read_decisions(own_settings)] == ["no new batch"]
    assert len(dag_runs("recsys_training")) == before and len(asset_events(RETRAIN_NAME)) == requests
