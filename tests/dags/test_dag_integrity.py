"""Both DAG files import cleanly, wire the stages in order, and retry their tasks."""

import pytest

from hyperrec.orchestration import load_dags

TRAINING_ORDER = [
    "ingest",
    "preprocess",
    "validate",
    "build_features",
    "segment",
    "train",
    "evaluate",
    "register",
    "promote",
    "publish",
]


@pytest.fixture(scope="module")
def bag():
    return load_dags()


def test_no_import_errors_and_both_dags_present(bag):
    assert not bag.import_errors
    assert {"recsys_training", "recsys_drift_monitor"} <= set(bag.dag_ids)


@pytest.mark.parametrize("dag_id", ["recsys_training", "recsys_drift_monitor"])
def test_every_task_has_retries(bag, dag_id):
    dag = bag.dags[dag_id]
    assert dag.tasks
    for task in dag.tasks:
        assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_training_stages_run_in_order(bag):
    dag = bag.dags["recsys_training"]
    assert sorted(t.task_id for t in dag.tasks) == sorted(TRAINING_ORDER)
    for upstream, downstream in zip(TRAINING_ORDER, TRAINING_ORDER[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}


def test_drift_monitor_triggers_training(bag):
    dag = bag.dags["recsys_drift_monitor"]
    trigger = dag.get_task("trigger_retraining")
    assert trigger.trigger_dag_id == "recsys_training"
    assert trigger.upstream_task_ids == {"drift_detected"}
