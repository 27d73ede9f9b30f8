"""``hyperrec up`` in embedded mode (SQLite, embedded Valkey): the supervisor's lifecycle.

No DAG runs here (schedules off); ``test_up_stack.py`` runs DAGs under the scheduler.
"""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from up_harness import UpCommand, child_env, processes_of, service_ports, wait_until, write_config

pytestmark = [pytest.mark.slow]

SERVICES = {
    "valkey",
    "mlflow",
    "airflow",
    "scheduler",
    "dag-processor",
    "triggerer",
    "serving",
    "consumer",
    "publisher",
}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    home = tmp_path_factory.mktemp("up-embedded")
    ports = service_ports()
    ports["airflow"].update(training_schedule=None, drift_schedule=None, password="up-test-password")
    config = write_config(home / "settings.yaml", None, home=str(home), **ports)
    command = UpCommand(config, child_env())
    yield command
    command.run("down", check=False, timeout=180)
    wait_until(lambda: not processes_of(home), 60, f"no process left for {home}")


def test_up_starts_every_service_healthy_and_status_reports_them(embedded, owner):
    out = embedded.up(owner.pid).stdout
    assert "Airflow login: admin / up-test-password" in out
    report = embedded.status()
    assert report["running"] and set(report["services"]) == SERVICES
    for name, service in report["services"].items():
        assert service["healthy"] and service["pid"], (name, service, embedded.log_tail(name))
    settings = embedded.settings
    assert report["services"]["airflow"]["url"] == f"http://127.0.0.1:{settings.airflow.port}"
    assert report["services"]["serving"]["url"] == f"http://127.0.0.1:{settings.serving.port}"
    assert (report["airflow_user"], report["airflow_password"]) == ("admin", "up-test-password")
    assert report["landing"] == str(settings.home / "landing")  # the landing zone, a path here
    # Every service binds to 127.0.0.1 only.
    for name in ("airflow", "mlflow", "serving"):
        assert all(c.laddr.ip == "127.0.0.1" for c in _listening(report["services"][name]["pid"])), name
    # The login works against the REST API, and both DAGs are parsed and unpaused.
    with embedded.client() as client:
        dags = {d: client.dag(d) for d in ("recsys_training", "recsys_drift_monitor")}
    assert all(not d["is_paused"] for d in dags.values())
    # MLflow answers as a tracking server; the serving API answers (no bundle published yet).
    assert httpx.get(f"{report['services']['mlflow']['url']}/health").text.strip() == "OK"
    assert httpx.get(f"{report['services']['serving']['url']}/readyz").status_code == 503
    metrics = httpx.get(report["metrics"]).text
    assert 'hyperrec_service_up{service="scheduler"} 1.0' in metrics
    # up generated the events token once, in a 0600 file of a 0700 directory, and serving requires it.
    token_file = settings.home / "secrets" / "events_token"
    assert report["events_token"] and token_file.read_text().strip() == report["events_token"]
    assert (token_file.stat().st_mode & 0o777, token_file.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    event = {"user_id": "u1", "item_id": "i1", "event_type": "view"}
    assert httpx.post(f"{report['services']['serving']['url']}/v1/events", json=event).status_code == 401


def test_a_second_up_is_idempotent(embedded, owner):
    before = embedded.status()
    embedded.up(owner.pid)
    after = embedded.status()
    assert after["supervisor_pid"] == before["supervisor_pid"]
    assert {n: s["pid"] for n, s in after["services"].items()} == {n: s["pid"] for n, s in before["services"].items()}


def test_a_crashed_service_is_reported_and_restarted(embedded, owner):
    old = embedded.status()["services"]["serving"]["pid"]
    os.kill(old, signal.SIGKILL)

    def restarted():
        serving = embedded.status()["services"]["serving"]
        return serving if serving["pid"] not in (None, old) and serving["healthy"] else None

    serving = wait_until(restarted, 90, "serving restarted")
    assert serving["restarts"] == 1 and serving["last_exit"] == -signal.SIGKILL


def test_killing_the_supervisor_stops_every_service(embedded, owner):
    report = embedded.status()
    children = [s["pid"] for s in report["services"].values()]
    os.kill(report["supervisor_pid"], signal.SIGKILL)
    wait_until(lambda: not any(psutil_alive(p) for p in children), 60, "the services to stop with their supervisor")
    assert embedded.status()["running"] is False
    assert embedded.run("status", check=False).returncode == 1


def test_up_again_then_the_owner_exits_and_nothing_is_left(embedded, owner):
    embedded.up(owner.pid)
    report = embedded.status()
    assert report["running"] and all(s["healthy"] for s in report["services"].values())
    owner.kill()
    owner.wait()
    home = embedded.settings.home
    wait_until(lambda: not processes_of(home), 90, f"every process of {home} to stop after its owner exited")
    assert embedded.run("down", check=False).stdout.strip() == "nothing was running"


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _listening(pid: int):
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return [c for p in procs for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
