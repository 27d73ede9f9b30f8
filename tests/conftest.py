"""Test-session wiring: one settings object under a temporary home, exported to Airflow
before anything imports airflow, and one Spark session for every Spark test."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from core.net import free_port
from core.settings import Settings, load_settings
from hyperrec.orchestration import configure_airflow

_HOME = Path(tempfile.mkdtemp(prefix="hyperrec-test-"))
BASE_OVERRIDES = {"home": str(_HOME), "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g"}}
# Small model searches keep the pipeline tests fast; the benchmark test uses the full
# configured search (FULL_SETTINGS) because it proves the accuracy target.
SETTINGS = load_settings(
    **BASE_OVERRIDES,
    training={
        "validation_folds": 2,
        "ease_lambdas": [100.0, 400.0],
        "temporal_betas": [0.0, 1.0],
        "blend_weight_grid": [0.0, 0.3, 1.0],
    },
    neural={"epochs": 4, "hidden": [32], "embedding_dim": 16},
    tuning={"optuna_trials": 2, "optuna_startup_trials": 1, "embedding_dims": [16], "min_validation_users": 5},
)
FULL_SETTINGS = load_settings(**BASE_OVERRIDES)


def pytest_configure(config):
    configure_airflow(SETTINGS)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return SETTINGS


@pytest.fixture(scope="session")
def full_settings() -> Settings:
    """The configured (full) model search, for tests that prove accuracy targets."""
    return FULL_SETTINGS


@pytest.fixture(scope="session")
def spark(settings):
    from pipelines.spark import get_spark

    return get_spark(settings)


S3_BUCKETS = ("bundles", "models", "raw")


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch):
    """moto's S3 server (server mode, real HTTP) on a free local port, with buckets
    :data:`S3_BUCKETS` and dummy credentials; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for bucket in S3_BUCKETS:
            s3.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
