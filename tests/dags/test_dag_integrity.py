"""Both DAG files import cleanly and cheaply, chain their stages, hand each task's stage
function to the shared bookkeeping, and retry their tasks."""

import inspect
import json
import subprocess
import sys

import pytest

from hyperrec.orchestration import load_dags, task_order

# What parsing a DAG file must not import: the stage packages and their heavy libraries
# are imported inside the tasks.
STAGE_PACKAGES = {"pipelines", "feature_store", "training", "serving", "monitoring"}
HEAVY = {"pyspark", "torch", "mlflow", "great_expectations", "evidently", "sklearn", "faiss"}
BOOKKEEPING = {"start_run", "run_stage", "check_drift"}


@pytest.fixture(scope="module")
def bag():
    return load_dags()


def _stage_tasks(dag) -> list:
    """The tasks that run a stage: those calling one of the bookkeeping helpers."""
    code = [(t, getattr(getattr(t, "python_callable", None), "__code__", None)) for t in dag.tasks]
    return [t for t, c in code if c is not None and BOOKKEEPING & set(c.co_names)]


def test_no_import_errors_and_both_dags_present(bag):
    assert not bag.import_errors
    assert {"recsys_training", "recsys_drift_monitor"} <= set(bag.dag_ids)


def test_parsing_imports_no_stage_code(tmp_path):
    script = tmp_path / "parse.py"
    script.write_text(
        "import json, sys, time\n"
        "import airflow.dag_processing.dagbag\n"
        "from hyperrec.orchestration import load_dags\n"
        "start = time.perf_counter()\n"
        "load_dags()\n"
        "print(json.dumps({'seconds': time.perf_counter() - start, 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    imported = sorted({m.split(".")[0] for m in parsed["modules"]} & (STAGE_PACKAGES | HEAVY))
    assert not imported, f"parsing dags/ imported {imported}"
    assert parsed["seconds"] < 20, f"parsing dags/ took {parsed['seconds']:.1f}s"


@pytest.mark.parametrize("dag_id", ["recsys_training", "recsys_drift_monitor"])
def test_every_task_has_retries(bag, dag_id):
    dag = bag.dags[dag_id]
    assert dag.tasks
    for task in dag.tasks:
        assert task.retries >= 1, f"{dag_id}.{task.task_id} has no retries"


def test_training_is_one_chain_of_stage_tasks(bag):
    dag = bag.dags["recsys_training"]
    order = task_order(dag)
    assert sorted(order) == sorted(dag.task_ids)
    assert (order[0], order[-1]) == ("ingest", "publish")
    assert dag.get_task(order[0]).upstream_task_ids == set()
    for upstream, downstream in zip(order, order[1:]):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}
    assert {t.task_id for t in _stage_tasks(dag)} == set(order)


@pytest.mark.parametrize("dag_id", ["recsys_training", "recsys_drift_monitor"])
def test_each_stage_task_runs_a_stage_function(bag, dag_id, monkeypatch):
    """Calling a task's body imports its stage module and hands the stage function on:
    a renamed or moved stage fails here, not in a DAG run."""
    handed = {}

    def bookkeeping(name):
        def record(fn, *args):
            handed[name] = fn
            return args[0] if args else ({"retrain": False} if name == "check_drift" else "run-dir")

        return record

    tasks = _stage_tasks(bag.dags[dag_id])
    assert tasks
    for task in tasks:
        handed.clear()
        body = task.python_callable
        for name in BOOKKEEPING & set(body.__globals__):
            monkeypatch.setitem(body.__globals__, name, bookkeeping(name))
        args = ["/runs/r1"] * len(inspect.signature(body).parameters)
        result = body(*args)
        assert len(handed) == 1, f"{task.task_id} called {sorted(handed)}"
        (fn,) = handed.values()
        assert list(inspect.signature(fn).parameters)[:2] == ["settings", "run"], f"{task.task_id}: {fn}"
        assert fn.__module__.split(".")[0] in STAGE_PACKAGES
        if args:
            assert result == args[0], f"{task.task_id} must pass the run directory on"


def test_the_loop_is_wired_through_assets(bag):
    """A landed batch wakes the drift monitor; its retrain request wakes training; both
    keep their cron schedules too."""
    from airflow.sdk import CronTriggerTimetable
    from airflow.sdk.definitions.timetables.assets import AssetOrTimeSchedule

    from core.settings import load_settings
    from hyperrec.assets import LANDING_NAME, RETRAIN_NAME

    monitor, training = bag.dags["recsys_drift_monitor"], bag.dags["recsys_training"]
    assert [t.task_id for t in _stage_tasks(monitor)] == ["drift_report"]
    request = monitor.get_task("retrain_request")
    assert request.upstream_task_ids == {"drift_report"}
    assert [o.name for o in request.outlets] == [RETRAIN_NAME]
    settings = load_settings()
    for dag, asset_name, cron in (
        (monitor, LANDING_NAME, settings.airflow.drift_schedule),
        (training, RETRAIN_NAME, settings.airflow.training_schedule),
    ):
        timetable = dag.timetable
        assert isinstance(timetable, AssetOrTimeSchedule), (dag.dag_id, timetable)
        assert [a.name for a in timetable.asset_condition.objects] == [asset_name]
        assert timetable.timetable.expression == CronTriggerTimetable(cron, timezone="UTC").expression
