"""Preprocessing on a multi-JVM ``local-cluster`` master gives the same result as in-process
``local[2]``: nothing in the stage assumes a single JVM."""

import json
import subprocess
import sys

import pytest

from core.datasets.synthetic import generate
from pipelines.preprocess import preprocess

pytestmark = [pytest.mark.slow, pytest.mark.spark]


def test_local_cluster_matches_local_mode(spark, settings, tmp_path):
    raw = generate(
        tmp_path / "raw", events=3000, seed=5, malformed_fraction=0.02, duplicate_fraction=0.01, progress=False
    )
    args = dict(users=raw.users, items=raw.items)
    local = preprocess(spark, raw.interactions, tmp_path / "local", settings.preprocess, **args).to_json()

    cli = [
        sys.executable,
        "-m",
        "hyperrec.cli",
        "preprocess",
        "--interactions",
        str(raw.interactions),
        "--users",
        str(raw.users),
        "--items",
        str(raw.items),
        "--out",
        str(tmp_path / "cluster"),
    ]
    env = {
        "HYPERREC_HOME": str(tmp_path / "home"),
        "HYPERREC_SPARK__MASTER": "local-cluster[2,1,1024]",
        "HYPERREC_SPARK__DRIVER_MEMORY": "1g",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    cluster = json.loads((tmp_path / "cluster" / "report.json").read_text())
    for key in ("in", "clean", "duplicates", "quarantined", "imputed", "users", "items", "train", "test"):
        assert cluster[key] == local[key], key
