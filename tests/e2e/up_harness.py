"""Helpers for driving ``hyperrec up`` as an operator does: the real command line in a subprocess,
with a settings file of the test's own (home, ports, databases)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from core.net import free_port
from core.settings import PROJECT_ROOT, Settings, load_settings
from hyperrec.orchestration import write_settings

HYPERREC = str(Path(sys.executable).parent / "hyperrec")
# Small model search, as in tests/conftest.py: the services run whole DAGs on it.
SMALL_MODELS = {
    "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "1g"},
    "training": {
        "validation_folds": 2,
        "ease_lambdas": [100.0, 400.0],
        "temporal_betas": [0.0, 1.0],
        "blend_weight_grid": [0.0, 0.3, 1.0],
    },
    "neural": {"epochs": 4, "hidden": [32], "embedding_dim": 16},
    "tuning": {"optuna_trials": 2, "optuna_startup_trials": 1, "embedding_dims": [16], "min_validation_users": 5},
}


def service_ports() -> dict:
    return {
        "airflow": {"port": free_port()},
        "mlflow": {"port": free_port()},
        "serving": {"port": free_port(), "reload_interval_s": 2.0},
        "services": {"metrics_port": free_port(), "start_timeout_s": 420.0},
        "online_store": {"embedded_port": free_port()},
    }


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the session's Airflow/hyperrec exports (the command
    under test must build its own from its settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "HYPERREC_"))}
    env.update(extra)
    return env


class UpCommand:
    """``hyperrec up|down|status|trigger`` for one settings file."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = env

    @property
    def settings(self) -> Settings:
        return load_settings(self.config)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [HYPERREC, *args, "--config", str(self.config)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"hyperrec {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                f"{done.stderr[-3000:]}\n{self.log_tail('supervisor')}"
            )
        return done

    def up(self, owner_pid: int | None = None) -> subprocess.CompletedProcess:
        return self.run("up", "--owner-pid", str(owner_pid or os.getpid()))

    def status(self) -> dict:
        return json.loads(self.run("status", "--json", check=False).stdout)

    def down(self) -> str:
        return self.run("down", timeout=180).stdout

    def log_tail(self, service: str, lines: int = 40) -> str:
        log = self.settings.home / "logs" / f"{service}.log"
        if not log.exists():
            return f"(no {log})"
        return f"--- {log} ---\n" + "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])

    def client(self):
        from hyperrec.up import airflow_client

        return airflow_client(self.settings)


def write_config(path: Path, base: str | None, **overrides) -> Path:
    """A complete settings file: config/default.yaml, then ``base`` (e.g. config/stack.yaml),
    then ``overrides``."""
    settings = load_settings(PROJECT_ROOT / base if base else None, **overrides)
    return write_settings(settings, path)


def processes_of(home: Path) -> list[psutil.Process]:
    """Live processes started for ``home``: its path is in their command line or environment."""
    mine, needle = [], str(home)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            mentions = needle in cmdline or any(needle in v for v in proc.environ().values())
            if mentions and proc.status() != psutil.STATUS_ZOMBIE:
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return mine


def wait_until(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
