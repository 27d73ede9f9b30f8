"""What a scheduled ``recsys_drift_monitor`` run does with its default params (``conf``
empty): there is no current batch, and the run may not fail by design. The scheduled
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
