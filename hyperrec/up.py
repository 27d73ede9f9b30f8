"""``hyperrec up``: the long-running services on one machine, supervised.

The supervisor (``hyperrec up --foreground``, started in the background by ``hyperrec up``)
runs each service as a child process in its own process group, with its log under
``<home>/logs/``: the embedded Valkey (unless ``online_store.url`` names a server), the
MLflow tracking server, Airflow's API server, scheduler (LocalExecutor), DAG processor and
triggerer, the serving API, the event-stream consumer (``hyperrec consume``) and the
champion publisher (``hyperrec publisher``). A service that exits is restarted after a back-off that
doubles per crash. The supervisor serves the platform metrics (:mod:`hyperrec.platform_metrics`)
on ``services.metrics_port``, records what it runs in ``<home>/up/state.json`` and stops every
child when it receives SIGTERM/SIGINT, when its owner process (``--owner-pid``) dies, and
(through ``PR_SET_PDEATHSIG``) when it is killed itself.

While the supervisor runs, every client talks to the MLflow server over HTTP:
:func:`client_settings` points the CLI at it, and the services get a settings file
(``<home>/up/settings.yaml``) that names it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from core.files import write_text_atomic
from core.processes import die_with_parent
from core.processes import pid_alive as _alive
from core.settings import Settings
from hyperrec.airflow_api import AirflowClient
from hyperrec.orchestration import airflow_env, write_settings

BIN = Path(sys.executable).parent
STOP_TIMEOUT_S = 30.0
# Crash-free seconds after which a service's back-off starts from the beginning again.
STABLE_AFTER_S = 300.0
MAX_BACKOFF_S = 60.0
# Restarts after which `up` stops waiting for a service and reports it.
CRASH_LOOP = 3
REQUIRED = ("airflow", "mlflow", "serving")
EVENTS_TOKEN_ENV = "HYPERREC_SERVING__EVENTS_TOKEN"


# --------------------------------------------------------------------------- locations


def up_dir(settings: Settings) -> Path:
    return settings.home / "up"


def logs_dir(settings: Settings) -> Path:
    return settings.home / "logs"


def state_path(settings: Settings) -> Path:
    return up_dir(settings) / "state.json"


def _local_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def airflow_url(settings: Settings) -> str:
    return f"http://{_local_host(settings.airflow.host)}:{settings.airflow.port}"


def mlflow_url(settings: Settings) -> str:
    return f"http://{_local_host(settings.mlflow.host)}:{settings.mlflow.port}"


def serving_url(settings: Settings) -> str:
    return f"http://{_local_host(settings.serving.host)}:{settings.serving.port}"


def online_store_url(settings: Settings) -> str:
    return settings.online_store.url or f"redis://127.0.0.1:{settings.online_store.embedded_port}/0"


# --------------------------------------------------------------------------- credentials


def _secrets(settings: Settings) -> dict[str, str]:
    """The Airflow secrets every component must share (JWT, API secret key, Fernet key),
    generated once and kept in ``<airflow_home>/hyperrec-secrets.json`` (mode 0600)."""
    path = settings.airflow_home / "hyperrec-secrets.json"
    known = json.loads(path.read_text()) if path.exists() else {}
    if not {"jwt_secret", "api_secret_key", "fernet_key"} <= known.keys():
        from cryptography.fernet import Fernet

        known = {
            "jwt_secret": secrets.token_urlsafe(48),
            "api_secret_key": secrets.token_urlsafe(48),
            "fernet_key": Fernet.generate_key().decode(),
            **known,
        }
        _write_private(path, json.dumps(known, indent=2))
    return known


def passwords_file(settings: Settings) -> Path:
    return settings.airflow_home / "simple_auth_manager_passwords.json"


def airflow_login(settings: Settings) -> tuple[str, str]:
    """The UI/REST login: ``airflow.username`` and ``airflow.password``, or the password
    generated the first time (kept in the SimpleAuthManager passwords file)."""
    user = settings.airflow.username
    if settings.airflow.password:
        return user, settings.airflow.password
    path = passwords_file(settings)
    known = json.loads(path.read_text()) if path.exists() else {}
    return user, known.get(user) or secrets.token_urlsafe(12)


def airflow_client(settings: Settings) -> AirflowClient:
    """A REST client of the Airflow API server of ``settings``, logged in as :func:`airflow_login`."""
    user, password = airflow_login(settings)
    return AirflowClient(airflow_url(settings), user, password)


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text, mode=0o600)


def events_token_path(settings: Settings) -> Path:
    return settings.home / "secrets" / "events_token"


def read_events_token(settings: Settings) -> str | None:
    """The bearer token of ``POST /v1/events`` under ``up``: ``serving.events_token`` when
    configured, else the one :func:`ensure_events_token` generated (None before the first up)."""
    if settings.serving.events_token:
        return settings.serving.events_token
    try:
        return events_token_path(settings).read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_events_token(settings: Settings) -> str:
    """:func:`read_events_token`, generated the first time (``secrets.token_urlsafe(32)``)
    and kept in ``<home>/secrets/events_token`` (directory 0700, file 0600, written
    atomically). The serving service gets it as ``HYPERREC_SERVING__EVENTS_TOKEN``."""
    token = read_events_token(settings)
    if token:
        return token
    token = secrets.token_urlsafe(32)
    path = events_token_path(settings)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    write_text_atomic(path, token + "\n", mode=0o600)
    return token


# --------------------------------------------------------------------------- the services


@dataclass
class Service:
    """One supervised process: its command, extra environment, and where it answers."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"


def service_settings(settings: Settings) -> Settings:
    """The settings the services run with: MLflow through its server, the online store
    at the URL ``up`` provides."""
    mlflow = settings.mlflow.model_copy(update={"tracking_uri": mlflow_url(settings)})
    online = settings.online_store.model_copy(update={"url": online_store_url(settings)})
    return settings.model_copy(update={"mlflow": mlflow, "online_store": online})


def client_settings(settings: Settings) -> Settings:
    """``settings`` as a client should use them: when ``hyperrec up`` runs for this home,
    MLflow through its server and the online store it provides; otherwise unchanged."""
    state = read_state(settings)
    if state is None or not _alive(state.get("supervisor_pid")):
        return settings
    return service_settings(settings) if settings.mlflow.tracking_uri is None else settings


def _file_uri(location: str) -> str:
    if "://" in location:
        return location
    Path(location).mkdir(parents=True, exist_ok=True)
    return Path(location).resolve().as_uri()


def build_services(settings: Settings, settings_path: Path) -> list[Service]:
    """The services in start order (stopped in reverse)."""
    user, _ = airflow_login(settings)
    keys = _secrets(settings)
    a_host, a_url = settings.airflow.host, airflow_url(settings)
    airflow = {
        **airflow_env(settings, settings_path),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(settings.airflow.parallelism),
        "AIRFLOW__CORE__FERNET_KEY": keys["fernet_key"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file(settings)),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{a_url}/execution/",
        "AIRFLOW__API__BASE_URL": a_url,
        "AIRFLOW__API__SECRET_KEY": keys["api_secret_key"],
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "15",
        # A killed scheduler's running tasks are reset and retried within about a minute.
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "30",
        "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "30",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "90",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
    }
    services: list[Service] = []
    if settings.online_store.url is None:
        data = settings.home / "online"
        data.mkdir(parents=True, exist_ok=True)
        from feature_store.online import valkey_command

        services.append(
            Service(
                "valkey",
                valkey_command(
                    settings.online_store.embedded_port,
                    data,
                    save="60 1",
                    appendonly=True,
                    appendfsync=settings.online_store.appendfsync,
                    maxmemory_mb=settings.online_store.maxmemory_mb,
                    maxmemory_policy=settings.online_store.maxmemory_policy,
                ),
                url=online_store_url(settings),
                port=settings.online_store.embedded_port,
            )
        )
    m = settings.mlflow
    services.append(
        Service(
            "mlflow",
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                settings.mlflow_backend_store_uri,
                "--default-artifact-root",
                _file_uri(settings.mlflow_artifact_root),
                "--no-serve-artifacts",
                "--host",
                m.host,
                "--port",
                str(m.port),
                "--workers",
                "1",
            ],
            env={"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
            url=mlflow_url(settings),
            port=m.port,
            host=m.host,
        )
    )
    services.append(
        Service(
            "airflow",
            [
                str(BIN / "airflow"),
                "api-server",
                "--host",
                a_host,
                "--port",
                str(settings.airflow.port),
                "--workers",
                "1",
            ],
            env=airflow,
            url=a_url,
            port=settings.airflow.port,
            host=a_host,
        )
    )
    for name, command in (("scheduler", "scheduler"), ("dag-processor", "dag-processor"), ("triggerer", "triggerer")):
        services.append(Service(name, [str(BIN / "airflow"), command], env=airflow))
    s = settings.serving
    services.append(
        Service(
            "serving",
            [str(BIN / "hyperrec"), "serve", "--config", str(settings_path), "--host", s.host, "--port", str(s.port)],
            env={"HYPERREC_CONFIG": str(settings_path), EVENTS_TOKEN_ENV: ensure_events_token(settings)},
            url=serving_url(settings),
            port=s.port,
            host=s.host,
        )
    )
    for name, command in (("consumer", "consume"), ("publisher", "publisher")):
        services.append(
            Service(
                name,
                [str(BIN / "hyperrec"), command, "--config", str(settings_path)],
                env={"HYPERREC_CONFIG": str(settings_path), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"},
            )
        )
    return services


# --------------------------------------------------------------------------- health


def _airflow_health(url: str) -> dict[str, Any] | None:
    try:
        answer = httpx.get(f"{url}/api/v2/monitor/health", timeout=3)
        return answer.json() if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def check_health(
    name: str, url: str | None, airflow_health: dict[str, Any] | None, settings: Settings | None = None
) -> bool:
    """Whether service ``name`` answers as it should right now (the consumer and the
    publisher by their heartbeats, which need ``settings`` as the services run them)."""
    try:
        if name == "consumer":
            from feature_store.consumer import consumer_healthy

            return settings is not None and consumer_healthy(service_settings(settings))
        if name == "publisher":
            from serving.champion_watch import publisher_status

            status = publisher_status(settings) if settings is not None else None
            return bool(status and status["fresh"])
        if name == "valkey":
            import redis

            return bool(redis.Redis.from_url(url, socket_timeout=2).ping())
        if name == "mlflow":
            return httpx.get(f"{url}/health", timeout=3).status_code == 200
        if name == "serving":
            return httpx.get(f"{url}/healthz", timeout=3).status_code == 200
        if name == "airflow":
            return airflow_health is not None and airflow_health.get("metadatabase", {}).get("status") == "healthy"
        component = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}[name]
        return (airflow_health or {}).get(component, {}).get("status") == "healthy"
    except Exception:
        return False


def read_state(settings: Settings) -> dict[str, Any] | None:
    path = state_path(settings)
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def status(settings: Settings) -> dict[str, Any]:
    """Every service of ``up`` with its URL, pid, health, restarts and log; the Airflow
    login; whether the supervisor runs. The shape of ``hyperrec status --json``."""
    state = read_state(settings) or {}
    running = _alive(state.get("supervisor_pid"))
    recorded = state.get("services", {}) if running else {}
    expected = build_service_names(settings)
    a_health = _airflow_health(airflow_url(settings)) if running else None
    services = {}
    for name, url in expected.items():
        entry = recorded.get(name, {})
        pid = entry.get("pid") if _alive(entry.get("pid")) else None
        services[name] = {
            "url": url,
            "pid": pid,
            "healthy": bool(pid) and check_health(name, url, a_health, settings),
            "restarts": entry.get("restarts", 0),
            "last_exit": entry.get("last_exit"),
            "log": str(logs_dir(settings) / f"{name}.log"),
        }
    user, password = airflow_login(settings)
    return {
        "services": services,
        "running": running,
        "supervisor_pid": state.get("supervisor_pid") if running else None,
        "airflow_user": user,
        "airflow_password": password,
        "events_token": read_events_token(settings),
        "home": str(settings.home),
        "logs": str(logs_dir(settings)),
        "metrics": f"http://127.0.0.1:{settings.services.metrics_port}/metrics",
        "landing": settings.landing_uri,
        "mode": settings.mode,
    }


def build_service_names(settings: Settings) -> dict[str, str | None]:
    """Service name → URL (None for the Airflow components without a port of their own)."""
    names: dict[str, str | None] = {}
    if settings.online_store.url is None:
        names["valkey"] = online_store_url(settings)
    names.update(
        {
            "mlflow": mlflow_url(settings),
            "airflow": airflow_url(settings),
            "scheduler": None,
            "dag-processor": None,
            "triggerer": None,
            "serving": serving_url(settings),
            "consumer": None,
            "publisher": None,
        }
    )
    return names


# --------------------------------------------------------------------------- preparing the stores


def ensure_postgres_database(url: str) -> None:
    """Create the PostgreSQL database ``url`` names when it does not exist yet."""
    parsed = urlparse(url)
    if not parsed.scheme.startswith("postgresql"):
        return
    import psycopg2
    from psycopg2 import sql

    name = parsed.path.lstrip("/")
    connect = {
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 5432,
        "user": parsed.username or "postgres",
        "password": parsed.password,
        "dbname": "postgres",
    }
    conn = psycopg2.connect(**connect)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# --------------------------------------------------------------------------- the supervisor


@dataclass
class _Running:
    service: Service
    process: subprocess.Popen | None = None
    restarts: int = 0
    last_exit: int | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.0


class Supervisor:
    """Starts, watches, restarts and stops the services of ``up``."""

    def __init__(self, settings: Settings, *, owner_pid: int | None = None) -> None:
        self.settings = settings
        self.owner_pid = owner_pid
        self.stopping = threading.Event()
        self.running: dict[str, _Running] = {}
        self._metrics_server: ThreadingHTTPServer | None = None

    def log(self, message: str, level: str = "INFO") -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {level} {message}", flush=True)

    def prepare(self) -> Path:
        """Write the services' settings file, create missing databases, migrate Airflow's."""
        settings = self.settings
        for directory in (up_dir(settings), logs_dir(settings), settings.airflow_home):
            directory.mkdir(parents=True, exist_ok=True)
        user, password = airflow_login(settings)
        _write_private(passwords_file(settings), json.dumps({user: password}))
        path = write_settings(service_settings(settings), up_dir(settings) / "settings.yaml")
        ensure_postgres_database(settings.airflow_conn)
        ensure_postgres_database(settings.mlflow_backend_store_uri)
        env = {**os.environ, **airflow_env(settings, path)}
        self.log(f"migrating the Airflow metadata DB ({_redact(settings.airflow_conn)})")
        with (logs_dir(settings) / "airflow-db-migrate.log").open("ab") as out:
            done = subprocess.run(
                [str(BIN / "airflow"), "db", "migrate"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        if done.returncode != 0:
            raise RuntimeError(
                f"airflow db migrate failed (exit {done.returncode}); see "
                f"{logs_dir(settings) / 'airflow-db-migrate.log'}"
            )
        return path

    def start(self, entry: _Running) -> None:
        service = entry.service
        if service.port is not None and not _port_free(service.host, service.port):
            raise RuntimeError(
                f"{service.name}: port {service.host}:{service.port} is already in use "
                f"(set another port in the settings, or stop what holds it)"
            )
        log = (logs_dir(self.settings) / f"{service.name}.log").open("ab")
        env = {**os.environ, **service.env}
        entry.process = subprocess.Popen(
            service.argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,  # its own group, which dies with this process
            preexec_fn=die_with_parent(),
            close_fds=True,
        )
        log.close()
        entry.started_at = time.time()
        self.log(f"started {service.name} (pid {entry.process.pid}): {' '.join(service.argv[:3])} ...")

    def stop(self, entry: _Running, *, timeout: float = STOP_TIMEOUT_S) -> None:
        process = entry.process
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.log(f"{entry.service.name} did not stop within {timeout:.0f} s: killing it", "WARNING")
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        _signal_group(process.pid, signal.SIGKILL)  # whatever it left in its group
        entry.process = None

    def write_state(self) -> None:
        services = {}
        for name, entry in self.running.items():
            services[name] = {
                "pid": entry.process.pid if entry.process else None,
                "url": entry.service.url,
                "restarts": entry.restarts,
                "last_exit": entry.last_exit,
                "started_at": entry.started_at,
            }
        payload = {
            "supervisor_pid": os.getpid(),
            "started_at": self.started_at,
            "services": services,
            "settings": str(up_dir(self.settings) / "settings.yaml"),
        }
        _write_private(state_path(self.settings), json.dumps(payload, indent=2))

    def watch_once(self) -> None:
        now = time.time()
        for name, entry in self.running.items():
            process = entry.process
            if process is not None and process.poll() is not None:
                entry.last_exit = process.returncode
                _signal_group(process.pid, signal.SIGKILL)  # its orphans (e.g. a killed scheduler's task runners)
                entry.process = None
                stable = now - entry.started_at > STABLE_AFTER_S
                entry.backoff = (
                    self.settings.services.restart_backoff_s
                    if stable or not entry.backoff
                    else min(entry.backoff * 2, MAX_BACKOFF_S)
                )
                entry.restart_at = now + entry.backoff
                self.log(
                    f"{name} (pid {process.pid}) exited with {process.returncode}; restarting in "
                    f"{entry.backoff:.0f} s (log: {logs_dir(self.settings) / (name + '.log')})",
                    "WARNING",
                )
                self.write_state()
            elif process is None and now >= entry.restart_at:
                try:
                    self.start(entry)
                    entry.restarts += 1
                    self.log(f"restarted {name} (pid {entry.process.pid}, restart {entry.restarts})", "WARNING")
                except RuntimeError as exc:
                    entry.restart_at = now + max(entry.backoff, self.settings.services.restart_backoff_s)
                    self.log(f"could not restart {name}: {exc}", "WARNING")
                self.write_state()

    def serve_metrics(self) -> None:
        """Prometheus metrics of the platform on ``services.metrics_port`` (best effort)."""
        from hyperrec.platform_metrics import PlatformMetrics, metrics_server

        metrics = PlatformMetrics()
        cache: dict[str, float] = {"at": 0.0}

        def render() -> tuple[bytes, str]:
            self.update_metrics(metrics, cache)
            return metrics.render()

        try:
            self._metrics_server = metrics_server("127.0.0.1", self.settings.services.metrics_port, render)
        except OSError as exc:
            self.log(f"platform metrics not served: port {self.settings.services.metrics_port}: {exc}")
            return
        threading.Thread(target=self._metrics_server.serve_forever, daemon=True).start()

    def update_metrics(self, metrics: Any, cache: dict[str, float]) -> None:
        for name, entry in self.running.items():
            alive = entry.process is not None and entry.process.poll() is None
            metrics.set_service(
                name, up=alive, restarts=entry.restarts, pid=entry.process.pid if entry.process else None
            )
        if time.time() - cache["at"] < 15:
            return
        cache["at"] = time.time()
        try:
            client = airflow_client(self.settings)
            metrics.set_dag_runs(client.dag_run_counts(("recsys_training", "recsys_drift_monitor"), hours=24))
        except Exception as exc:
            self.log(f"DAG run metrics not updated: {exc}")

    def run(self) -> int:
        """Prepare, start every service, supervise until told to stop; return the exit status."""
        self.started_at = time.time()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            settings_path = self.prepare()
            services = build_services(self.settings, settings_path)
            self.running = {s.name: _Running(s) for s in services}
            for entry in self.running.values():
                if self.stopping.is_set():
                    break
                self.start(entry)
            self.write_state()
            self.serve_metrics()
            while not self.stopping.wait(1.0):
                if self.owner_pid is not None and not _alive(self.owner_pid):
                    self.log(f"owner process {self.owner_pid} is gone: stopping")
                    break
                self.watch_once()
            return 0
        except Exception as exc:
            self.log(f"error: {exc}", "ERROR")
            return 1
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.log("stopping services")
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        for entry in reversed(list(self.running.values())):
            self.stop(entry)
        state_path(self.settings).unlink(missing_ok=True)
        self.log("stopped")


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return f"({path} not written)"
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


# --------------------------------------------------------------------------- up / down


def spawn_supervisor(settings: Settings, config: Path | None, *, owner_pid: int | None = None) -> int:
    """Start ``hyperrec up --foreground`` detached from this terminal; return its pid."""
    logs_dir(settings).mkdir(parents=True, exist_ok=True)
    argv = [str(BIN / "hyperrec"), "up", "--foreground"]
    if config is not None:
        argv += ["--config", str(Path(config).resolve())]
    if owner_pid is not None:
        argv += ["--owner-pid", str(owner_pid)]
    with (logs_dir(settings) / "supervisor.log").open("ab") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True
        )
    return process.pid


def wait_healthy(settings: Settings, supervisor_pid: int, timeout: float, on_tick=None) -> dict[str, Any]:
    """Poll :func:`status` until every service is healthy; raise if the supervisor dies
    or ``timeout`` passes."""
    deadline = time.time() + timeout
    while True:
        report = status(settings)
        if on_tick is not None:
            on_tick(report)
        if report["running"] and all(s["healthy"] for s in report["services"].values()):
            return report
        if not _alive(supervisor_pid):
            raise RuntimeError(f"the supervisor stopped; see {logs_dir(settings) / 'supervisor.log'}")
        looping = [n for n, s in report["services"].items() if s["restarts"] >= CRASH_LOOP and not s["healthy"]]
        if looping:
            name = looping[0]
            raise RuntimeError(
                f"{name} keeps crashing ({report['services'][name]['restarts']} restarts, last exit "
                f"{report['services'][name]['last_exit']}); the end of its log:\n"
                + _tail(logs_dir(settings) / f"{name}.log")
            )
        if time.time() > deadline:
            sick = [n for n, s in report["services"].items() if not s["healthy"]]
            raise TimeoutError(
                f"not healthy after {timeout:.0f} s: {', '.join(sick)} (logs under {logs_dir(settings)})"
            )
        time.sleep(1.0)


def down(settings: Settings, timeout: float = 90.0) -> list[str]:
    """Stop what ``up`` started for this home; return the names of what was stopped."""
    state = read_state(settings)
    if state is None:
        return []
    pid = state.get("supervisor_pid")
    stopped = []
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.3)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        stopped.append("supervisor")
    for name, entry in state.get("services", {}).items():  # children of a supervisor that was killed
        child = entry.get("pid")
        if _alive(child):
            _signal_group(child, signal.SIGTERM)
            time.sleep(1.0)
            _signal_group(child, signal.SIGKILL)
            stopped.append(name)
    state_path(settings).unlink(missing_ok=True)
    return stopped
