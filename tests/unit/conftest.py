"""The unit tier: no Spark session, server or subprocess is started here (those tests live
in tests/integration and tests/e2e), so ``make test-fast`` stays quick. The fixtures below
turn a slip into a clear failure instead of a slow tier."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture
def spark():
    pytest.fail("tests/unit may not start Spark: move this test to tests/integration/")


@pytest.fixture
def s3_endpoint():
    pytest.fail("tests/unit may not start moto's S3 server: move this test to tests/integration/")


# Programs whose start makes a test an integration test: interpreters, the project's CLIs
# and servers. (Libraries may still run short probes such as ``file -b`` for platform info.)
REFUSED_PROGRAMS = (
    "python",
    "hyperrec",
    "airflow",
    "mlflow",
    "torchrun",
    "valkey-server",
    "redis-server",
    "java",
    "spark-submit",
    "uvicorn",
    "gunicorn",
    "chromium",
)


@pytest.fixture(autouse=True)
def no_servers_or_interpreters(monkeypatch: pytest.MonkeyPatch) -> None:
    start = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
        program = Path(os.fsdecode(argv[0]).split()[0]).name if argv else ""
        if program.startswith(REFUSED_PROGRAMS):
            raise AssertionError(f"tests/unit may not start {program} ({argv!r}): move this test to tests/integration/")
        start(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
