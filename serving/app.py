"""The FastAPI serving app: recommendations from the published bundle, live event intake,
health/readiness probes, Prometheus metrics and token-protected admin routes.

Routes (:mod:`serving.api`): ``GET /v1/recommendations/{user_id}``, ``POST /v1/events``,
``GET /healthz``, ``GET /readyz``, ``GET /metrics``, ``POST /admin/reload``,
``POST /admin/cache/flush``; OpenAPI at ``/docs``.

:func:`create_app` builds the app and its per-app singletons on ``app.state`` (settings,
metrics, the model holder, the recommendations' query parser and recently hit cache keys);
:func:`lifespan` adds the Redis client, the recommendation cache and the event store, loads
the bundle ``CURRENT`` points at (the app starts without one and answers 503 until one is
published), polls ``CURRENT`` every ``serving.reload_interval_s`` and, before each swap,
warms the cache for the new version (:func:`serving.api.recommendations.cache_warmer`).

Redis (``online_store.url``; None starts an embedded Valkey server for this app,
:func:`feature_store.online.open_redis`) holds the recommendation cache
(:mod:`serving.cache`), the event stream and the users' live histories
(:mod:`serving.events`), so several workers agree on both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import multiprocessing
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from fastapi import FastAPI

from core.object_store import ObjectStore
from core.processes import die_with_parent, exit_on_signals, watch_parent
from core.settings import Settings, load_settings
from feature_store.online import open_redis
from serving import redis_client
from serving.api import admin, events, guard, health, recommendations
from serving.api.metrics import MULTIPROC_ENV, MetricsMiddleware, ServingMetrics, prepare_multiprocess_dir
from serving.api.recommendations import QueryParser, RecommendationsFastPath, cache_warmer
from serving.api.state import ServingState
from serving.cache import HotKeys, RecommendationCache
from serving.events import RedisEvents
from serving.experiment import ExperimentLog

log = logging.getLogger(__name__)
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_TIMEOUT_S = 5.0
# Seconds a stopping worker waits for requests in flight before it closes their connections.
GRACEFUL_SHUTDOWN_S = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
HTTP_PROTOCOL = "serving.http1:CoalescingHttpToolsProtocol"
"""uvicorn's httptools protocol sending each response in one write (:mod:`serving.http1`)."""


@contextmanager
def _compute_threads(threads: int) -> Iterator[None]:
    """Limit torch, faiss and BLAS to ``threads`` threads: one request is small, so more
    threads only add synchronization. The previous limits come back afterwards."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    before = (torch.get_num_threads(), faiss.omp_get_max_threads())
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    blas = threadpool_limits(limits=threads)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
        blas.restore_original_limits()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start-up and shutdown of an app made by :func:`create_app`: Redis (the configured
    server or an embedded one), cache and event store on ``app.state``, the first bundle
    load and the hot-reload poller."""
    settings: Settings = app.state.settings
    cfg = settings.serving
    state: ServingState = app.state.serving
    with _compute_threads(cfg.compute_threads), open_redis(settings.online_store.url) as server:
        # A command that finds the server gone fails within seconds (events: 503) and the next
        # one reconnects: a restarted embedded server (same URL) is used again at once.
        client = redis_client.connect(server.url, REDIS_CONNECT_TIMEOUT_S, REDIS_TIMEOUT_S)
        poller = flusher = None
        try:
            app.state.cache = cache = RecommendationCache(client, cfg.namespace, cfg.cache_ttl_s)
            app.state.events = event_store = RedisEvents(
                client,
                cfg.namespace,
                cache,
                max_per_user=cfg.live_history,
                history_ttl_s=cfg.live_history_ttl_s,
                stream_maxlen=cfg.stream_maxlen,
            )
            app.state.experiment_log = experiment_log = ExperimentLog(
                client, cfg.namespace, settings.experiment.stream_maxlen
            )
            flusher = asyncio.create_task(experiment_log.run())
            state.before_swap = cache_warmer(
                asyncio.get_running_loop(),
                app.state.hot_keys,
                cfg.warm_cache_window_s,
                app.state.queries,
                cache,
                event_store,
                experiment=lambda: state.experiment,
            )
            if await asyncio.to_thread(state.refresh) is None:
                log.warning("serving starts without a bundle: %s", state.error)
            await asyncio.to_thread(state.refresh_experiment)
            if cfg.reload_interval_s > 0:
                poller = asyncio.create_task(state.poll(cfg.reload_interval_s))
            yield
        finally:
            state.before_swap = None
            if poller is not None:
                poller.cancel()
            if flusher is not None:
                flusher.cancel()
                try:
                    await app.state.experiment_log.flush()  # the impressions still buffered
                except Exception as exc:
                    log.warning("experiment impressions lost at shutdown: %s", exc)
            await client.aclose()
            app.state.metrics.close()


def create_app(settings: Settings, bundle_store: ObjectStore | None = None) -> FastAPI:
    """The serving app over ``bundle_store`` (default: the store in ``settings``)."""
    store = bundle_store or ObjectStore(settings.object_store_uri, settings.object_store.s3_endpoint_url)
    metrics = ServingMetrics()
    state = ServingState(store, settings.home / "serving" / "bundles", settings, metrics)
    app = FastAPI(title="hyperrec serving", version="1", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.serving = state
    app.state.queries = queries = QueryParser(settings.serving.default_k)
    app.state.hot_keys = hot = HotKeys(settings.serving.warm_cache_entries)
    for module in (recommendations, events, health, admin):
        app.include_router(module.router)
    app.add_middleware(RecommendationsFastPath, state=state, queries=queries, hot=hot, metrics=metrics)
    guard.install(app, settings.serving)  # body limit, events token and rate limit, short 422s
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: times the fast path too
    return app


def app_from_environment() -> FastAPI:
    """Uvicorn factory for ``hyperrec serve`` workers: settings from ``HYPERREC_CONFIG`` and
    ``HYPERREC_*`` variables (the CLI exports them). With several workers, each stops with
    the server process that started it, even one killed with SIGKILL: the kernel's death
    signal, and a thread that notices when the worker has been reparented."""
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
        die_with_parent(parent.pid)()
        watch_parent(parent.pid)
    return create_app(load_settings())


def run_server(
    config: Path | None = None, *, host: str | None = None, port: int | None = None, workers: int | None = None
) -> None:
    """Run uvicorn with ``workers`` processes of :func:`app_from_environment`.

    Workers read their settings from ``config`` (exported as ``HYPERREC_CONFIG``). Without
    ``online_store.url`` an embedded Valkey server is started here, in the parent, and its
    URL exported, so every worker shares one cache, event stream and set of live histories.
    That server is durable: its data is ``<home>/serving/valkey`` (append-only file,
    ``online_store.appendfsync``), so an event acknowledged with 202 survives a crash of
    Valkey or of this process, and a watchdog restarts it on the same port when it dies.
    With more than one worker, Prometheus runs in multiprocess mode over
    ``$PROMETHEUS_MULTIPROC_DIR`` (default ``<home>/serving/prometheus``, emptied first), so
    ``/metrics`` on any worker reports all of them.

    Without ``serving.events_token`` it binds 127.0.0.1 whatever ``host`` says, and says so.
    SIGTERM/SIGHUP/Ctrl-C stop the workers (requests in flight get
    :data:`GRACEFUL_SHUTDOWN_S`), then Valkey; the exit status is 128 + the signal. Killed
    with SIGKILL, its workers and Valkey stop by themselves (:mod:`core.processes`).
    """
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
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
    options = {
        "factory": True,
        "host": bind_host(host or settings.serving.host, settings),
        "port": port or settings.serving.port,
        "workers": workers,
        "http": HTTP_PROTOCOL,
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
    }
    online = settings.online_store
    with (
        exit_on_signals(),
        open_redis(
            online.url,
            data_dir=settings.home / "serving" / "valkey",
            durable=True,
            appendfsync=online.appendfsync,
            maxmemory_mb=online.maxmemory_mb,
            maxmemory_policy=online.maxmemory_policy,
            restart=True,
        ) as server,
    ):
        os.environ["HYPERREC_ONLINE_STORE__URL"] = server.url
        if workers == 1:
            uvicorn.run("serving.app:app_from_environment", **options)  # type: ignore[arg-type]
        else:
            uv_config = uvicorn.Config("serving.app:app_from_environment", **options)  # type: ignore[arg-type]
            _supervise_workers(uv_config)


def bind_host(host: str, settings: Settings) -> str:
    """The address to serve on: ``host``, or 127.0.0.1 (with a WARNING) when no
    ``serving.events_token`` guards ``POST /v1/events`` and ``host`` is not loopback."""
    if settings.serving.events_token:
        return host
    if not _loopback(host):
        log.warning(
            "serving.events_token is not set: POST /v1/events would be open to anyone who can reach %s, "
            "so serving binds 127.0.0.1 only (set serving.events_token to serve on %s)",
            host,
            host,
        )
        return "127.0.0.1"
    log.warning("serving.events_token is not set: POST /v1/events takes events without a token; bound to %s only", host)
    return host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _supervise_workers(config: object) -> None:
    """uvicorn's worker supervisor (what ``uvicorn.run`` runs for several workers), logging
    a worker's death and its replacement at WARNING (uvicorn logs them at INFO)."""
    from uvicorn.supervisors.multiprocess import Multiprocess

    class Workers(Multiprocess):
        def keep_subprocess_alive(self) -> None:
            before = list(self.processes)
            super().keep_subprocess_alive()
            for old, new in zip(before, self.processes):
                if new is not old:
                    log.warning(
                        "serving worker %s died (exit status %s); started worker %s in its place",
                        old.pid,
                        old.exitcode,
                        new.pid,
                    )

    Workers(config, sockets=[config.bind_socket()]).run()  # type: ignore[arg-type,attr-defined]
