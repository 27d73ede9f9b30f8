"""MLflow tracking setup shared by every stage that logs (validation, training, registry)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from core.settings import Settings


def configure(settings: Settings, experiment: str | None = None) -> MlflowClient:
    """Point MLflow at the configured backend and make ``experiment`` (default:
    ``mlflow.experiment``) the active one, creating it under the artifact root if needed."""
    name = experiment or settings.mlflow.experiment
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if settings.mlflow.tracking_uri is None and settings.mlflow.backend_store_uri is None:
        (settings.home / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    if client.get_experiment_by_name(name) is None:
        location = settings.mlflow_artifact_root
        if "://" not in location:
            Path(location).mkdir(parents=True, exist_ok=True)
            location = Path(location).as_uri()
        client.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return client


def log_artifact_run(settings: Settings, *, run_name: str, artifact_dirs: dict[str, Path], tags: dict[str, str]) -> str:
    """Log directories as artifacts of a run of their own (e.g. a validation that failed
    and so never reaches the training run); return the MLflow run id."""
    configure(settings)
    with mlflow.start_run(run_name=run_name, tags=tags) as run:
        for artifact_path, directory in artifact_dirs.items():
            if directory.exists():
                mlflow.log_artifacts(str(directory), artifact_path=artifact_path)
    return run.info.run_id
