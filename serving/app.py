"""The FastAPI serving app: recommendations from the published bundle, live event intake,
health/readiness probes and Prometheus metrics.

Routes: ``GET /v1/recommendations/{user_id}``, ``POST /v1/events``, ``GET /healthz``,
``GET /readyz``, ``GET /metrics``; OpenAPI at ``/docs``.

The bundle ``CURRENT`` points at is loaded on startup. When nothing is published yet the app
still starts and answers 503 until a bundle appears; ``GET /readyz`` re-reads ``CURRENT``
and hot-swaps in a newly published version (a failed load keeps the old one serving).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from pydantic import BaseModel, Field, model_validator
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hyperrec.schemas import EVENT_TYPES, RATING_MAX, RATING_MIN
from hyperrec.settings import Settings
from serving.store import ObjectStore, current_version, fetch
from training.bundle import Bundle, load_bundle

log = logging.getLogger(__name__)

USER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_K = 100
LIVE_HISTORY_LEN = 200
NO_BUNDLE = "no bundle published: run `make demo` or the recsys_training DAG"


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Event:
    """One accepted interaction event."""

    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime
    rating: float | None = None


class EventSink(ABC):
    """Where accepted events go, and each user's recent items as the serving path sees them."""

    @abstractmethod
    def publish(self, event: Event) -> None:
        """Record ``event``; the user's next :meth:`recent_items` includes its item."""

    @abstractmethod
    def recent_items(self, user_id: str) -> list[str]:
        """Item ids of ``user_id``'s recent events, oldest first (possibly repeated)."""


class InMemoryEventSink(EventSink):
    """Per-process live history: the last ``max_per_user`` items of each of the
    ``max_users`` most recently active users. Thread-safe."""

    def __init__(self, max_per_user: int = LIVE_HISTORY_LEN, max_users: int = 100_000) -> None:
        if max_per_user < 1 or max_users < 1:
            raise ValueError("max_per_user and max_users must be >= 1")
        self.max_per_user = max_per_user
        self.max_users = max_users
        self._history: OrderedDict[str, deque[str]] = OrderedDict()
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        with self._lock:
            items = self._history.pop(event.user_id, None) or deque(maxlen=self.max_per_user)
            items.append(event.item_id)
            self._history[event.user_id] = items
            while len(self._history) > self.max_users:
                self._history.popitem(last=False)

    def recent_items(self, user_id: str) -> list[str]:
        with self._lock:
            return list(self._history.get(user_id, ()))


# --------------------------------------------------------------------------- API models


class EventIn(BaseModel):
    user_id: str = Field(pattern=USER_ID_PATTERN, description="1-128 characters of [A-Za-z0-9_.:-]")
    item_id: str = Field(min_length=1, max_length=256)
    event_type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    timestamp: datetime | None = Field(None, description="event time; default: when received (UTC)")
    rating: float | None = Field(None, ge=RATING_MIN, le=RATING_MAX, description="only for event_type 'rate'")

    @model_validator(mode="after")
    def _rating_only_for_rate(self) -> "EventIn":
        if self.event_type == "rate" and self.rating is None:
            raise ValueError("event_type 'rate' needs a rating")
        if self.event_type != "rate" and self.rating is not None:
            raise ValueError(f"rating is only allowed with event_type 'rate', not {self.event_type!r}")
        return self


class EventAccepted(BaseModel):
    accepted: bool
    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float
    rank: int


class Recommendations(BaseModel):
    user_id: str
    model_version: str
    cold_start: bool
    items: list[RecommendedItem]


# --------------------------------------------------------------------------- metrics


class ServingMetrics:
    """Prometheus metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "hyperrec_request_latency_seconds", "Request latency by route", ["method", "route"], registry=self.registry
        )
        self.requests = Counter(
            "hyperrec_requests", "Requests by route and status", ["method", "route", "status"], registry=self.registry
        )
        self.events = Counter("hyperrec_events", "Accepted events by type", ["event_type"], registry=self.registry)
        self.recommendations = Counter(
            "hyperrec_recommendations", "Recommendation lists served", ["cold_start"], registry=self.registry
        )
        self.model_loaded = Gauge("hyperrec_model_loaded", "1 when a bundle is loaded", registry=self.registry)
        self.model = Info("hyperrec_model", "The bundle being served", registry=self.registry)

    def set_bundle(self, bundle: Bundle) -> None:
        meta = bundle.metadata
        self.model_loaded.set(1)
        self.model.info(
            {
                "version": bundle.version,
                "model_name": str(meta.get("model_name", "")),
                "registered_model_version": str(meta.get("registered_model_version", "")),
            }
        )


class _MetricsMiddleware:
    """Times every HTTP request, labelled by its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

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
            method = scope.get("method", "")
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)
            self.metrics.requests.labels(method, route, str(status)).inc()


# --------------------------------------------------------------------------- state


class ServingState:
    """The served bundle and why there is none (or why the last reload failed)."""

    def __init__(self, store: ObjectStore, cache_dir: Path, metrics: ServingMetrics) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.metrics = metrics
        self.bundle: Bundle | None = None
        self.error: str | None = NO_BUNDLE
        self._lock = threading.Lock()

    def refresh(self) -> Bundle | None:
        """Load the version ``CURRENT`` points at if it is not the one served; return the
        served bundle. Errors are kept in :attr:`error`, and the old bundle stays."""
        with self._lock:
            try:
                version = current_version(self.store)
            except Exception as exc:  # a store outage must not take serving down
                self.error = f"cannot read CURRENT from {self.store.uri}: {exc}"
                log.warning(self.error)
                return self.bundle
            if version is None:
                self.error = None if self.bundle else NO_BUNDLE
                return self.bundle
            if self.bundle is not None and self.bundle.version == version:
                self.error = None
                return self.bundle
            try:
                bundle = load_bundle(fetch(self.store, version, self.cache_dir / version))
            except Exception as exc:
                self.error = f"cannot load bundle {version!r} from {self.store.uri}: {exc}"
                log.error(self.error)
                return self.bundle
            self.bundle, self.error = bundle, None
            self.metrics.set_bundle(bundle)
            log.info("serving bundle %s (%s) from %s", bundle.version, bundle.model.name, self.store.uri)
            return bundle

    def require(self) -> Bundle:
        """The served bundle (loading one if none is yet); 503 when there is none."""
        bundle = self.bundle or self.refresh()
        if bundle is None:
            raise HTTPException(status_code=503, detail=self.error or NO_BUNDLE)
        return bundle


# --------------------------------------------------------------------------- app


def create_app(
    settings: Settings,
    bundle_store: ObjectStore | None = None,
    event_sink: EventSink | None = None,
) -> FastAPI:
    """The serving app over ``bundle_store`` (default: the store in ``settings``) with
    ``event_sink`` (default: an :class:`InMemoryEventSink`)."""
    store = bundle_store or ObjectStore(settings.object_store_uri, settings.object_store.s3_endpoint_url)
    sink = event_sink or InMemoryEventSink()
    metrics = ServingMetrics()
    state = ServingState(store, settings.home / "serving" / "bundles", metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.refresh() is None:
            log.warning("serving starts without a bundle: %s", state.error)
        yield

    app = FastAPI(title="hyperrec serving", version="1", lifespan=lifespan)
    app.state.serving = state
    app.state.events = sink
    app.state.metrics = metrics
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.get("/v1/recommendations/{user_id}", response_model=Recommendations)
    def recommendations(
        user_id: str = PathParam(pattern=USER_ID_PATTERN, description="1-128 characters of [A-Za-z0-9_.:-]"),
        k: int = Query(settings.serving.default_k, ge=1, le=MAX_K),
        exclude_seen: bool = Query(True),
    ) -> dict[str, Any]:
        """Top-``k`` items for ``user_id``, using the training history and live events."""
        bundle = state.require()
        items, cold_start = bundle.recommend(user_id, k, sink.recent_items(user_id), exclude_seen)
        metrics.recommendations.labels(str(cold_start).lower()).inc()
        return {"user_id": user_id, "model_version": bundle.version, "cold_start": cold_start, "items": items}

    @app.post("/v1/events", status_code=202, response_model=EventAccepted)
    def post_event(event: EventIn) -> Any:
        """Accept one interaction; it shapes the user's next recommendations."""
        bundle = state.require()
        if not bundle.has_item(event.item_id):
            detail = [
                {
                    "loc": ["body", "item_id"],
                    "msg": f"unknown item_id {event.item_id!r}: not in model version {bundle.version}",
                    "type": "unknown_item",
                }
            ]
            return JSONResponse(status_code=422, content={"detail": detail})
        timestamp = event.timestamp or datetime.now(timezone.utc)
        sink.publish(Event(event.user_id, event.item_id, event.event_type, timestamp, event.rating))
        metrics.events.labels(event.event_type).inc()
        return {
            "accepted": True,
            "user_id": event.user_id,
            "item_id": event.item_id,
            "event_type": event.event_type,
            "timestamp": timestamp,
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: a bundle is loaded. Also picks up a newly published ``CURRENT``."""
        bundle = state.refresh()
        if bundle is None:
            return JSONResponse(status_code=503, content={"status": "unavailable", "detail": state.error or NO_BUNDLE})
        body = {"status": "ready", "model_version": bundle.version, "model_name": bundle.model.name}
        if state.error:
            body["reload_error"] = state.error
        return JSONResponse(status_code=200, content=body)

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
