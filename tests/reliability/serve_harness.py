"""``hyperrec serve`` as an operator runs it: the real command line in a subprocess, with a
settings file of the test's own (home, bundle store), and what it started (psutil)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

HYPERREC = str(Path(sys.executable).parent / "hyperrec")


def serve_config(tmp_path: Path, **serving: Any) -> Path:
    """A settings file: home and bundle store under ``tmp_path``, a tiny bundle published."""
    from fixtures_serving import tiny_bundle

    from core.object_store import ObjectStore
    from serving.store import publish

    store = tmp_path / "store"
    if not store.exists():
        publish(tiny_bundle(tmp_path / "build", "v1"), ObjectStore(str(store)), "v1")
    config = tmp_path / "serve.yaml"
    overlay = {"home": str(tmp_path / "home"), "object_store": {"uri": str(store)}}
    overlay["serving"] = {"reload_interval_s": 0, **serving}
    config.write_text(yaml.safe_dump(overlay))
    return config


class Serve:
    """One ``hyperrec serve`` process (its own session, so the test's signals reach it alone)."""

    def __init__(self, config: Path, port: int, workers: int = 1, log: Path | None = None) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        self.log = log or config.with_name(f"serve-{port}-{time.monotonic_ns()}.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYPERREC_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        argv = [HYPERREC, "serve", "--port", str(port), "--workers", str(workers), "--config", str(config)]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 120, path: str = "/readyz") -> float:
        """Seconds until ``path`` answers 200."""
        started = time.monotonic()
        while True:
            assert self.process.poll() is None, f"serve exited {self.process.returncode}:\n{self.text()[-3000:]}"
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            assert time.monotonic() - started < timeout, f"serve not ready after {timeout} s:\n{self.text()[-3000:]}"
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def valkey(self) -> tuple[psutil.Process, str]:
        """The embedded valkey-server child and its URL."""
        child = next(p for p in self.descendants() if p.name() == "valkey-server")
        port = next(c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
        return child, f"redis://127.0.0.1:{port}/0"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        """Kill whatever is left (the test's cleanup)."""
        for proc in self._safe_descendants():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def _safe_descendants(self) -> list[psutil.Process]:
        try:
            return self.descendants()
        except psutil.NoSuchProcess:
            return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie is not)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_for(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> float:
    """Seconds until ``check()`` is truthy; AssertionError naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s: {what}"
        time.sleep(poll)
    return time.monotonic() - started


def post_event(client: httpx.Client, user: str, item: str, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return client.post("/v1/events", json={"user_id": user, "item_id": item, "event_type": "view"}, headers=headers)
