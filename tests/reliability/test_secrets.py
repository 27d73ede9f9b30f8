"""Secrets never land in world-readable files: the settings file written for Airflow task
processes (``<home>/airflow/hyperrec-settings.yaml``) leaves tokens and passwords out and
is mode 0600; the task processes get the secrets through their environment."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from core.settings import PROJECT_ROOT, Settings, load_settings, public_dump, secret_fields, section_fields
from hyperrec.orchestration import configure_airflow, settings_file

ADMIN_TOKEN = "admin-tok-3f9c1a7e55d04b"
EVENTS_TOKEN = "events-tok-9b2e4c6a1f"
PASSWORD = "airflow-pw-71c0d9e2"
DB_PASSWORD = "db-pw-5a8e3f"


@pytest.fixture
def restored_environ():
    """configure_airflow exports to os.environ: put the session's environment back after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _secret_settings(home) -> Settings:
    serving = {"admin_token": ADMIN_TOKEN}
    if "events_token" in type(load_settings().serving).model_fields:
        serving["events_token"] = EVENTS_TOKEN
    return load_settings(
        home=str(home),
        serving=serving,
        airflow={"password": PASSWORD},
        mlflow={"backend_store_uri": f"postgresql+psycopg2://hyperrec:{DB_PASSWORD}@db.example:5432/mlflow"},
    )


def _files_holding(root, values: list[str]) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path}: {v}" for v in values if v.encode() in data]
    return hits


def test_settings_for_task_processes_hold_no_secret(tmp_path, restored_environ):
    settings = _secret_settings(tmp_path / "home")
    values = list(secret_fields(settings).values())
    assert {ADMIN_TOKEN, PASSWORD} <= set(values) and any(DB_PASSWORD in v for v in values)

    configure_airflow(settings)

    path = settings_file(settings)
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _files_holding(settings.home, [ADMIN_TOKEN, EVENTS_TOKEN, PASSWORD, DB_PASSWORD]) == []
    # A task process rebuilds the same settings, secrets included, from the file plus its
    # inherited environment.
    probe = (
        "from core.settings import load_settings; s = load_settings(); "
        "print(s.serving.admin_token, s.airflow.password, s.mlflow.backend_store_uri)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=PROJECT_ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [ADMIN_TOKEN, PASSWORD, settings.mlflow.backend_store_uri]


def test_a_secret_cleared_in_settings_does_not_survive_in_the_environment(tmp_path, restored_environ):
    settings = _secret_settings(tmp_path / "a")
    configure_airflow(settings)
    assert os.environ["HYPERREC_SERVING__ADMIN_TOKEN"] == ADMIN_TOKEN
    cleared = settings.model_copy(update={"serving": settings.serving.model_copy(update={"admin_token": None})})
    configure_airflow(cleared)
    assert "HYPERREC_SERVING__ADMIN_TOKEN" not in os.environ and os.environ["HYPERREC_AIRFLOW__PASSWORD"] == PASSWORD


def test_every_credential_field_is_marked_secret():
    """A new token/password/secret field must be declared with core.settings.SECRET."""
    fields = section_fields()
    assert ("serving", "admin_token", True) in fields and ("serving", "port", False) in fields
    credentials = ("token", "password", "secret")
    unmarked = [f"{s}.{k}" for s, k, secret in fields if any(w in k for w in credentials) and not secret]
    assert unmarked == []


def test_public_dump_keeps_urls_without_a_password(tmp_path):
    settings = load_settings(home=str(tmp_path), online_store={"url": "redis://127.0.0.1:6379/0"})
    assert public_dump(settings)["online_store"]["url"] == "redis://127.0.0.1:6379/0"
    assert ("online_store", "url") not in secret_fields(settings)
