"""CLI errors from settings, paths and the registry: one ``error:`` line naming the file,
key or record, exit status 1, no traceback unless ``--debug`` (or HYPERREC_DEBUG=1);
``train`` checks its dataset before it creates a run or starts Airflow."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from core.errors import InputFileError
from core.settings import PROJECT_ROOT
from hyperrec.cli import app


def _invoke(*args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, list(args), env=env)
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result, lines


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("spark:\n  master: [local\n  driver_memory: 1g\n")
    result, lines = _invoke("model", "list", "--config", str(config))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}: invalid YAML at line "), lines


def test_unknown_key_and_bad_value_name_file_and_key(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("preprocess:\n  hash_algoritm: md5\n")
    result, lines = _invoke("drift", "--config", str(config))
    assert result.exit_code == 1 and lines == [f"error: {config}: unknown key preprocess.hash_algoritm"]

    config.write_text("training:\n  k: many\n")
    result, lines = _invoke("train", "--config", str(config))
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {config}: training.k: Input should be a valid integer"), lines

    result, lines = _invoke("model", "list", env={"HYPERREC_TRAINING__K": "-"})
    assert result.exit_code == 1 and lines[0].startswith("error: environment variable HYPERREC_TRAINING__K: training.k")

    result, lines = _invoke("model", "list", "--config", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 1 and lines == [f"error: {tmp_path / 'absent.yaml'}: config file not found"]


def test_train_checks_the_dataset_before_a_run(settings, tmp_path):
    runs_before = sorted(settings.runs_dir.iterdir()) if settings.runs_dir.exists() else []
    result, lines = _invoke("train", "--dataset", str(tmp_path / "nonexistent"))
    assert result.exit_code == 1
    assert lines == [
        f"error: dataset {tmp_path / 'nonexistent'}: no such directory (give 'ml-100k' or a raw dataset directory)"
    ]

    partial = tmp_path / "partial"
    (partial / "interactions").mkdir(parents=True)
    (partial / "users.parquet").write_bytes(b"")
    result, lines = _invoke("train", "--dataset", str(partial))
    assert result.exit_code == 1 and len(lines) == 1
    assert "missing items.parquet" in lines[0] and str(partial) in lines[0]
    after = sorted(settings.runs_dir.iterdir()) if settings.runs_dir.exists() else []
    assert after == runs_before  # no run directory was created


def test_registry_error_is_one_line(settings):
    env = {"HYPERREC_MLFLOW__REGISTERED_MODEL": "never-registered-cli-errors"}
    result, lines = _invoke("model", "rollback", env=env)
    lines = [line for line in lines if " INFO " not in line]  # MLflow creating a fresh store
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith("error: registered model 'never-registered-cli-errors' not found"), lines


def test_debug_shows_the_traceback(tmp_path):
    result, _ = _invoke("--debug", "train", "--dataset", str(tmp_path / "nope"))
    assert isinstance(result.exception, InputFileError)  # raised through: the traceback is printed
    result, _ = _invoke("train", "--dataset", str(tmp_path / "nope"), env={"HYPERREC_DEBUG": "1"})
    assert isinstance(result.exception, InputFileError)


def test_an_unexpected_error_is_two_lines(monkeypatch):
    def explode(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line of detail")

    monkeypatch.setattr("hyperrec.orchestration.run_dag", explode)
    result, lines = _invoke("train")
    assert result.exit_code == 1
    assert lines == [
        "error: ZeroDivisionError: division by zero",
        "(unexpected: run again with --debug or HYPERREC_DEBUG=1 for the traceback)",
    ]


@pytest.mark.parametrize("argv", [["train", "--dataset", "/nonexistent"]])
def test_the_real_command_fails_fast_without_traceback(argv):
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hyperrec.cli", *argv],
        cwd=PROJECT_ROOT,
        env={**os.environ, "HYPERREC_DEBUG": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: dataset /nonexistent: no such directory (give 'ml-100k' or a raw dataset directory)"
    ]
    assert elapsed < 30, elapsed
