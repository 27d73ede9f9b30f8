"""What the hyperrec containers of docker/compose.yaml run: the services of `hyperrec up`.

`hyperrec up` derives every service it supervises from the settings with
``hyperrec.up.build_services``: one command line and one environment each (the Airflow
configuration, the shared JWT/API/Fernet secrets, the SimpleAuthManager login, ports).
Each compose container runs one of those services, built by the same function from the
same settings (config/stack.yaml plus the HYPERREC_* variables of compose.yaml), so the
commands and settings are the same as on one machine by construction:

    compose_services.py init           what `hyperrec up` does before it starts anything
                                       (``Supervisor.prepare``: the services' settings file,
                                       the Airflow login, missing PostgreSQL databases,
                                       ``airflow db migrate``), plus the shared Airflow secrets
    compose_services.py run NAME       exec service NAME: mlflow, airflow (the API server),
                                       scheduler, dag-processor, triggerer or serving
    compose_services.py health NAME    exit 0 when NAME passes the health check `hyperrec up`
                                       uses (``hyperrec.up.check_health``)
    compose_services.py metrics        the platform metrics of the `hyperrec up` supervisor
                                       (hyperrec_service_up, hyperrec_dag_runs, ...) for the
                                       compose services, on 0.0.0.0:services.metrics_port

Differences from one machine, all about addresses: the containers reach each other by
compose host name (COMPOSE_HOSTS), servers bind 0.0.0.0 (HYPERREC_*__HOST in compose.yaml),
and AIRFLOW__* variables set in the container's environment win over the computed ones
(compose sets the execution API URL that way). Docker, not a supervisor, restarts a
service that exits, so hyperrec_service_restarts_total stays 0 here (`docker compose ps`
shows restarts) and hyperrec_service_pid is 0.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from core.settings import Settings, load_settings
from hyperrec import up
from hyperrec.platform_metrics import metrics_server

# `hyperrec up` service name -> compose service (host name) that runs it.
COMPOSE_HOSTS = {
    "mlflow": "mlflow",
    "airflow": "airflow-api-server",
    "scheduler": "airflow-scheduler",
    "dag-processor": "airflow-dag-processor",
    "triggerer": "airflow-triggerer",
    "serving": "serving",
}
DAG_IDS = ("recsys_training", "recsys_drift_monitor")
METRICS_REFRESH_S = 15.0


def _say(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} compose_services: {message}", flush=True)


def services_settings_path(settings: Settings) -> Path:
    """The settings file ``Supervisor.prepare`` writes for the services (on the shared volume)."""
    return up.up_dir(settings) / "settings.yaml"


def compose_url(settings: Settings, name: str) -> str | None:
    """Where another container reaches service ``name`` (None: no port of its own)."""
    port = {"mlflow": settings.mlflow.port, "airflow": settings.airflow.port, "serving": settings.serving.port}.get(
        name
    )
    if port is None:
        return settings.online_store.url if name == "valkey" else None
    return f"http://{COMPOSE_HOSTS[name]}:{port}"


def init(settings: Settings) -> int:
    """Prepare as `hyperrec up` does, then create the shared Airflow secrets once."""
    try:
        path = up.Supervisor(settings).prepare()
    except Exception as exc:
        _say(f"prepare failed: {exc}")
        log = up.logs_dir(settings) / "airflow-db-migrate.log"
        if log.exists():
            print("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]), flush=True)
        return 1
    names = [service.name for service in up.build_services(settings, path)]
    _say(f"prepared {settings.home} (settings file {path}); services: {', '.join(names)}")
    return 0


def run(settings: Settings, name: str) -> int:
    """Replace this process with service ``name`` exactly as `hyperrec up` would start it."""
    path = services_settings_path(settings)
    if not path.exists():
        _say(f"{path} is missing: the one-shot service hyperrec-init must complete first")
        return 1
    services = {service.name: service for service in up.build_services(settings, path)}
    if name not in services:
        _say(f"unknown service {name!r}; `hyperrec up` runs: {', '.join(services)}")
        return 2
    service = services[name]
    pinned = {key: value for key, value in os.environ.items() if key.startswith("AIRFLOW__")}
    env = {**os.environ, **service.env, **pinned}
    _say(f"starting {name}: {' '.join(service.argv)}")
    os.execve(service.argv[0], service.argv, env)
    return 1  # not reached


def healthy(settings: Settings, name: str) -> bool:
    # The Airflow components report through the API server's health endpoint.
    airflow_health = (
        up._airflow_health(compose_url(settings, "airflow"))
        if name in ("airflow", "scheduler", "dag-processor", "triggerer")
        else None
    )
    return up.check_health(name, compose_url(settings, name), airflow_health)


class _Exporter:
    """The supervisor's PlatformMetrics, fed from health checks over the compose network."""

    def __init__(self, settings: Settings) -> None:
        from hyperrec.platform_metrics import PlatformMetrics

        self.settings = settings
        self.metrics = PlatformMetrics()
        self.names = list(up.build_service_names(settings))

    def refresh(self) -> None:
        airflow_url = compose_url(self.settings, "airflow")
        airflow_health = up._airflow_health(airflow_url)
        for name in self.names:
            ok = up.check_health(name, compose_url(self.settings, name), airflow_health)
            self.metrics.set_service(name, up=ok, restarts=0, pid=None)
        try:
            from hyperrec.airflow_api import AirflowClient

            user, password = up.airflow_login(self.settings)
            with AirflowClient(airflow_url, user, password, timeout=10) as client:
                self.metrics.set_dag_runs(client.dag_run_counts(DAG_IDS, hours=24))
        except Exception as exc:
            _say(f"DAG run metrics not updated: {exc}")

    def loop(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception as exc:
                _say(f"refresh failed: {exc}")
            time.sleep(METRICS_REFRESH_S)


def metrics(settings: Settings) -> int:
    exporter = _Exporter(settings)
    threading.Thread(target=exporter.loop, daemon=True).start()

    port = settings.services.metrics_port
    _say(f"platform metrics of {', '.join(exporter.names)} on 0.0.0.0:{port}/metrics")
    metrics_server("0.0.0.0", port, exporter.metrics.render).serve_forever()
    return 0


def main(argv: list[str]) -> int:
    usage = "usage: compose_services.py init | run NAME | health NAME | metrics"
    if not argv or argv[0] not in ("init", "run", "health", "metrics"):
        print(usage, file=sys.stderr)
        return 2
    settings = load_settings()
    command, rest = argv[0], argv[1:]
    if command in ("run", "health") and len(rest) != 1:
        print(usage, file=sys.stderr)
        return 2
    if command == "init":
        return init(settings)
    if command == "run":
        return run(settings, rest[0])
    if command == "health":
        return 0 if healthy(settings, rest[0]) else 1
    return metrics(settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
