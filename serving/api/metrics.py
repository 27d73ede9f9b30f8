"""Prometheus metrics of the serving app, and the middleware that times every request.

Each app has its own registry (two apps in one process do not share counts). With
``PROMETHEUS_MULTIPROC_DIR`` set (``hyperrec serve --workers N``) ``GET /metrics`` on any
worker reports all of them.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from serving.recommender import ServedModel

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's switch to multiprocess mode: metric values live in mmap files in this
directory, and ``/metrics`` aggregates the files of every worker (:func:`serving.app.run_server`
sets it)."""
MODEL_INFO_LABELS = ("version", "model_name", "registered_model_version", "quantized", "ann")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    """Prometheus metrics of one app, in their own registry.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the worker imported
    ``prometheus_client``) ``exposition()`` merges every worker's values: counters and
    histograms are summed over all workers that ever ran, and the model gauges carry a ``pid``
    label per live worker (so a scrape shows which version each worker serves).
    """

    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "hyperrec_request_latency_seconds",
            "Request latency by route",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "hyperrec_requests", "Requests by route and status", ["method", "route", "status"], registry=self.registry
        )
        self.events = Counter("hyperrec_events", "Accepted events by type", ["event_type"], registry=self.registry)
        self.recommendations = Counter(
            "hyperrec_recommendations",
            "Recommendation lists computed",
            ["cold_start", "strategy"],
            registry=self.registry,
        )
        self.cache = Counter(
            "hyperrec_cache_requests",
            "Recommendation cache lookups (hit rate = hit / all)",
            ["result"],
            registry=self.registry,
        )
        self.reloads = Counter("hyperrec_model_reloads", "Bundle loads by outcome", ["outcome"], registry=self.registry)
        self.model_loaded = Gauge(
            "hyperrec_model_loaded", "1 when a bundle is loaded", registry=self.registry, multiprocess_mode="liveall"
        )
        self.model_loaded_at = Gauge(
            "hyperrec_model_loaded_timestamp_seconds",
            "When the served bundle was swapped in",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.model_created_at = Gauge(
            "hyperrec_model_created_timestamp_seconds",
            "When the served bundle was created (its metadata.json created_at: when training wrote it), unix "
            "seconds; model age = time() - this; 0 when the metadata has no parseable created_at",
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        # A gauge rather than an Info: Info metrics do not work in multiprocess mode.
        self.model = Gauge(
            "hyperrec_model_info",
            "The bundle being served (value 1; 0 for one swapped out)",
            MODEL_INFO_LABELS,
            registry=self.registry,
            multiprocess_mode="liveall",
        )
        self.experiment_impressions = Counter(
            "hyperrec_experiment_impressions",
            "Lists served inside an online experiment, by experiment and arm",
            ["experiment", "arm"],
            registry=self.registry,
        )
        self.experiment_outcomes = Counter(
            "hyperrec_experiment_outcomes",
            "Events attributed to an experiment's impressions, by arm (interleaving: 'interleaved') and event type",
            ["experiment", "arm", "event_type"],
            registry=self.registry,
        )
        self.experiment_latency = Histogram(
            "hyperrec_experiment_latency_seconds",
            "Time to answer a list inside an online experiment (cache lookup to response), by arm",
            ["experiment", "arm"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._model_labels: tuple[str, ...] | None = None
        self._experiment_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def experiment_arm(self, experiment: str, arm: str) -> tuple[Any, Any]:
        """The impressions counter and latency histogram children of one arm (looked up once)."""
        key = (experiment, arm)
        children = self._experiment_children.get(key)
        if children is None:
            if len(self._experiment_children) > 64:
                self._experiment_children.clear()
            children = self._experiment_children[key] = (
                self.experiment_impressions.labels(experiment, arm),
                self.experiment_latency.labels(experiment, arm),
            )
        return children

    def set_model(self, served: ServedModel) -> None:
        meta = served.bundle.metadata
        self.model_loaded.set(1)
        self.model_loaded_at.set(time.time())
        self.model_created_at.set(_created_timestamp(meta.get("created_at")))
        labels = (
            served.version,
            str(meta.get("model_name", "")),
            str(meta.get("registered_model_version", "")),
            str(served.quantized).lower(),
            served.ann_source,
        )
        if self._model_labels is not None and self._model_labels != labels:
            if self.multiprocess:  # series cannot be removed from the shared files: mark it swapped out
                self.model.labels(*self._model_labels).set(0)
            else:
                self.model.remove(*self._model_labels)
        self.model.labels(*labels).set(1)
        self._model_labels = labels

    def exposition(self) -> bytes:
        """The text format of this worker's metrics, or of every worker's in multiprocess mode."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        return generate_latest(merged)

    def close(self) -> None:
        """In multiprocess mode, drop this worker's live gauges (its counters stay counted)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def _created_timestamp(value: Any) -> float:
    """A bundle's ``created_at`` (ISO-8601; naive means UTC) as unix seconds, 0.0 if unparseable."""
    try:
        created = datetime.fromisoformat(str(value))
    except ValueError:
        return 0.0
    return (created if created.tzinfo else created.replace(tzinfo=UTC)).timestamp()


def prepare_multiprocess_dir(directory: Path) -> Path:
    """Create ``directory`` and delete the metric files a previous server left there (stale
    values would otherwise be added to the new server's)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory


_MAX_LABEL_SETS = 256
"""Label combinations :class:`MetricsMiddleware` keeps its metric children for."""


class MetricsMiddleware:
    """Times every HTTP request, labelled by its route template (not the raw path). The
    histogram and counter children of the first :data:`_MAX_LABEL_SETS` label combinations
    are kept, so a request does not look its labels up again."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def _observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.metrics.latency.labels(method, route),
                self.metrics.requests.labels(method, route, str(status)),
            )
            if len(self._children) < _MAX_LABEL_SETS:
                self._children[key] = children
        children[0].observe(seconds)
        children[1].inc()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self._observe(scope.get("method", ""), route, status, time.perf_counter() - start)
