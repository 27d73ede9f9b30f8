"""Run the project's Airflow DAGs in-process (``dag.test()``) against the configured
metadata DB: SQLite under ``<home>/airflow`` when embedded, PostgreSQL in stack mode."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from core.files import write_text_atomic
from core.settings import PROJECT_ROOT, Settings, public_dump, secret_env, secret_env_names

DAGS_FOLDER = PROJECT_ROOT / "dags"


def settings_file(settings: Settings) -> Path:
    return settings.airflow_home / "hyperrec-settings.yaml"


def write_settings(settings: Settings, path: Path, *, include_secrets: bool = True) -> Path:
    """Write ``settings`` as one YAML file (mode 0600, atomically) for child processes to
    rebuild the same object from ``HYPERREC_CONFIG``.

    Without ``include_secrets`` the tokens and passwords (:func:`core.settings.secret_fields`)
    are left out: the child gets them from :func:`airflow_env` (``HYPERREC_*`` variables).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = settings.model_dump(mode="json") if include_secrets else public_dump(settings)
    return write_text_atomic(path, yaml.safe_dump(data, sort_keys=False), mode=0o600)


def airflow_env(settings: Settings, settings_path: Path) -> dict[str, str]:
    """Environment every Airflow process of this project shares: home, metadata DB, DAG
    folder, ``HYPERREC_CONFIG`` naming the settings file tasks rebuild settings from, and
    the configured secrets as ``HYPERREC_*`` variables (the file may leave them out)."""
    return {
        **secret_env(settings),
        "HYPERREC_CONFIG": str(settings_path),
        "AIRFLOW_HOME": str(settings.airflow_home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.airflow_conn,
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(settings.airflow.dags_paused_at_creation),
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "AIRFLOW__CORE__ALLOWED_DESERIALIZATION_CLASSES_REGEXP": r"(airflow|hyperrec)\..*",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING"),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    }


def configure_airflow(settings: Settings) -> None:
    """Export this process's settings to Airflow and its tasks, before airflow is imported:
    ``<airflow_home>/hyperrec-settings.yaml`` without secrets (mode 0600), the secrets in
    this process's environment, which task processes inherit."""
    settings.airflow_home.mkdir(parents=True, exist_ok=True)
    for name in secret_env_names():  # a secret this settings object does not hold
        os.environ.pop(name, None)
    path = write_settings(settings, settings_file(settings), include_secrets=False)
    os.environ.update(airflow_env(settings, path))


def migrate_db() -> None:
    """Create or upgrade the Airflow metadata DB (idempotent)."""
    from airflow.utils.db import upgradedb

    upgradedb()


def load_dags():
    """Parse ``dags/`` and return the DagBag; raises if any file fails to import."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag


def get_dag(settings: Settings, dag_id: str):
    """Export ``settings`` to Airflow, create or upgrade its metadata DB, parse ``dags/``
    and return the DAG ``dag_id``."""
    configure_airflow(settings)
    migrate_db()
    dag = load_dags().dags.get(dag_id)
    if dag is None:
        raise KeyError(f"no DAG named {dag_id!r} in {DAGS_FOLDER}")
    return dag


def task_order(dag) -> list[str]:
    """The DAG's task ids, each after every task upstream of it: the stage list."""
    return [task.task_id for task in dag.topological_sort()]


def execute_dag(dag, conf: dict | None = None) -> tuple[str, str]:
    """Run a DAG from :func:`get_dag` to completion in this process; return ``(state, run_id)``."""
    dag_run = dag.test(run_conf=conf or {})
    return str(dag_run.state), dag_run.run_id


def run_dag(settings: Settings, dag_id: str, conf: dict | None = None) -> tuple[str, str]:
    """Run one DAG to completion in this process; return ``(state, run_id)``."""
    return execute_dag(get_dag(settings, dag_id), conf)


def dag_runs(dag_id: str) -> list[dict]:
    """Runs of ``dag_id`` recorded in the metadata DB, oldest first."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == dag_id).order_by(DagRun.id).all()
        return [
            {"run_id": r.run_id, "state": str(r.state), "run_type": str(r.run_type), "conf": dict(r.conf or {})}
            for r in runs
        ]


def task_states(dag_id: str, run_id: str) -> dict[str, str]:
    """task_id → state of one DAG run's task instances."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        tis = session.query(TaskInstance).filter(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id).all()
        return {ti.task_id: str(ti.state) for ti in tis}


def asset_events(name: str) -> list[dict]:
    """Events of the asset called ``name`` recorded in the metadata DB, oldest first."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.name == name)
            .order_by(AssetEvent.id)
            .all()
        )
        return [
            {"extra": dict(r.extra or {}), "source_run_id": r.source_run_id, "timestamp": r.timestamp} for r in rows
        ]
