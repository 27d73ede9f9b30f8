"""Test-session wiring: one settings object under a temporary home, exported to Airflow
before anything imports airflow, and one Spark session for every Spark test."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from hyperrec.orchestration import configure_airflow
from hyperrec.settings import Settings, load_settings

_HOME = Path(tempfile.mkdtemp(prefix="hyperrec-test-"))
SETTINGS = load_settings(
    home=str(_HOME),
    spark={"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g"},
)


def pytest_configure(config):
    configure_airflow(SETTINGS)


def pytest_unconfigure(config):
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return SETTINGS


@pytest.fixture(scope="session")
def spark(settings):
    from pipelines.spark import get_spark

    return get_spark(settings)
