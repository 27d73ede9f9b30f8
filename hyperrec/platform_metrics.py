"""Prometheus metrics of the platform as ``hyperrec up`` supervises it: the health and restarts
of each long-running service and the Airflow DAG runs of the last 24 hours.

The supervisor sets the values (:meth:`PlatformMetrics.set_service`,
:meth:`PlatformMetrics.set_dag_runs`) and serves :meth:`PlatformMetrics.render` at ``/metrics``
on ``services.metrics_port``. Exported series:

- ``hyperrec_service_up{service}``: 1 while the supervisor sees the service running, else 0;
- ``hyperrec_service_restarts_total{service}``: restarts by the supervisor since it started;
- ``hyperrec_service_pid{service}``: the service's process id, 0 while none runs;
- ``hyperrec_dag_runs{dag_id,state}``: runs of each DAG in the last 24 hours, by state
  (``queued``, ``running``, ``success`` and ``failed`` are always present, 0 when none).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DAG_RUN_STATES = ("queued", "running", "success", "failed")
"""The states every DAG gets a ``hyperrec_dag_runs`` series for (others appear when counted)."""


@dataclass(frozen=True)
class _Service:
    up: bool
    restarts: int
    pid: int | None


class PlatformMetrics(Collector):
    """The supervisor's metrics in their own registry; safe to update from one thread while
    another renders."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._services: dict[str, _Service] = {}
        self._dag_runs: dict[tuple[str, str], int] = {}
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def set_service(self, name: str, *, up: bool, restarts: int, pid: int | None) -> None:
        """Record service ``name``: running or not, the supervisor's restart count (never
        decreasing for one supervisor) and its process id (None while not running)."""
        if restarts < 0:
            raise ValueError(f"restarts must be >= 0, got {restarts}")
        with self._lock:
            self._services[name] = _Service(bool(up), int(restarts), pid)

    def set_dag_runs(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Replace the DAG run counts: ``{(dag_id, state): runs in the last 24 h}``."""
        with self._lock:
            self._dag_runs = {(str(dag), str(state)): int(n) for (dag, state), n in counts.items()}

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the current values (called by the registry)."""
        with self._lock:
            services = dict(self._services)
            dag_runs = dict(self._dag_runs)
        up = GaugeMetricFamily(
            "hyperrec_service_up", "1 while the supervisor sees the service running", labels=["service"]
        )
        restarts = CounterMetricFamily(
            "hyperrec_service_restarts", "Restarts of the service by the supervisor", labels=["service"]
        )
        pid = GaugeMetricFamily(
            "hyperrec_service_pid", "Process id of the service (0 while none runs)", labels=["service"]
        )
        for name, service in sorted(services.items()):
            up.add_metric([name], 1.0 if service.up else 0.0)
            restarts.add_metric([name], float(service.restarts))
            pid.add_metric([name], float(service.pid or 0))
        runs = GaugeMetricFamily(
            "hyperrec_dag_runs", "DAG runs of the last 24 hours, by state", labels=["dag_id", "state"]
        )
        for dag_id in sorted({dag for dag, _ in dag_runs}):
            states = dict.fromkeys(DAG_RUN_STATES, 0)
            states.update({state: n for (dag, state), n in dag_runs.items() if dag == dag_id})
            for state, n in sorted(states.items()):
                runs.add_metric([dag_id, state], float(n))
        yield from (up, restarts, pid, runs)


def metrics_server(host: str, port: int, render: Callable[[], tuple[bytes, str]]) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) answering ``GET /metrics`` with ``render()``'s body and
    content type, 404 elsewhere; raises OSError when the port is taken."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body, content_type = render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    return ThreadingHTTPServer((host, port), Handler)
