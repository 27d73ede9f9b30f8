"""``GET /v1/recommendations/{user_id}``: the route, and the lean handler answering it before
FastAPI's routing.

A request reads the user's cache generation, the cached list and (on a miss) the user's live
history in one Redis round trip (:mod:`serving.cache`); a miss is computed by
:meth:`serving.recommender.ServedModel.recommend`, serialized once and stored under the
generation read. Redis trouble serves uncached rather than fails.

:class:`RecommendationsFastPath` answers the ordinary requests (a valid query, a loaded
model, Redis answering), hits and misses alike, as the route would, without FastAPI's
routing, dependency resolution and query validation per request; the route answers the
rest. :func:`warm_cache` recomputes the lists hit lately for a version about to be swapped
in, so its first requests find them cached.

While an online experiment runs (:attr:`ServingState.experiment`), both the fast path and the
route answer from the user's arm (:mod:`serving.arms`): the arm's own cache entries, the
``X-Experiment``/``X-Arm`` headers, a new impression id per list and the impression recorded
(:func:`served_impression`, stored after the response is sent). Without one, neither does
anything differently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.deps import ContextDep
from serving.api.metrics import ServingMetrics
from serving.api.state import ServingState
from serving.arms import ActiveExperiment
from serving.arms import headers as experiment_headers
from serving.cache import HotKeys, Lookup, RecommendationCache, params_digest
from serving.events import RedisEvents
from serving.experiment import CHALLENGER_ARM, ExperimentLog, Impression, new_impression_id
from serving.recommender import RecommendationRequest, RequestError, ServedModel
from serving.schemas import USER_ID_DESCRIPTION, USER_ID_PATTERN, RecommendationQuery, Recommendations

log = logging.getLogger(__name__)

RECOMMENDATIONS_ROUTE = "/v1/recommendations/{user_id}"
_PREFIX = "/v1/recommendations/"
_USER_ID_RE = re.compile(USER_ID_PATTERN)
_LOOKUP_STATE = "hyperrec_cache_lookup"
QUERY_MEMO_SIZE = 4096
"""Distinct query strings :class:`QueryParser` remembers before it forgets them all."""
QUERY_MEMO_MAX_BYTES = 512
"""Longer query strings are parsed every time and not recorded as hot: the memory a client
can make a worker hold stays below ``(QUERY_MEMO_SIZE + warm_cache_entries) × 512`` bytes."""
WARM_BUDGET_S = 5.0
"""Longest :func:`warm_cache` runs before a swap; the lists left are computed on request."""

router = APIRouter()


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


@dataclass(frozen=True)
class ParsedQuery:
    """A valid query: the recommender's request with an empty user id, and the
    :func:`serving.cache.params_digest` of its cache parameters."""

    request: RecommendationRequest
    digest: str

    def for_user(self, user_id: str) -> RecommendationRequest:
        return replace(self.request, user_id=user_id)


class QueryParser:
    """Parses raw query strings of the route into :class:`ParsedQuery` (None: a query the
    route must answer: a repeated or unknown parameter, an invalid value), validated by the
    same :class:`~serving.schemas.RecommendationQuery`. Results are remembered by query
    string (those of at most :data:`QUERY_MEMO_MAX_BYTES`), up to ``max_entries``, then all
    forgotten."""

    def __init__(self, default_k: int, max_entries: int = QUERY_MEMO_SIZE) -> None:
        self.default_k = default_k
        self.max_entries = max_entries
        self._memo: dict[bytes, ParsedQuery | None] = {}

    def parse(self, query_string: bytes) -> ParsedQuery | None:
        try:
            return self._memo[query_string]
        except KeyError:
            pass
        parsed = self._parse(query_string)
        if len(query_string) > QUERY_MEMO_MAX_BYTES:
            return parsed
        if len(self._memo) >= self.max_entries:
            self._memo.clear()
        self._memo[query_string] = parsed
        return parsed

    def _parse(self, query_string: bytes) -> ParsedQuery | None:
        pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        params = dict(pairs)
        if len(params) != len(pairs) or not params.keys() <= RecommendationQuery.model_fields.keys():
            return None
        try:
            query = RecommendationQuery.model_validate(params)
        except ValueError:
            return None
        request = recommendation_request("", query, self.default_k)
        return ParsedQuery(request, params_digest(request.cache_params()))


@router.get(
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
    context: ContextDep,
    user_id: str = PathParam(pattern=USER_ID_PATTERN, description=USER_ID_DESCRIPTION),
) -> Response:
    """Top-``k`` items for ``user_id`` from the training history and live events; cold
    users get segment (or global) popularity, blended with their session's content."""
    state, settings, cache, events, metrics = (
        context.state,
        context.settings,
        context.cache,
        context.events,
        context.metrics,
    )
    served = await state.require()
    request = recommendation_request(user_id, query, settings.default_k)
    arms = state.experiment
    if arms is not None:
        return await _experiment_route(http, served, arms, request, cache, events, metrics)
    fp = f"{served.version}:{params_digest(request.cache_params())}"
    pre: tuple[str, Lookup] | None = http.scope.get("state", {}).get(_LOOKUP_STATE)
    looked: Lookup | None
    try:
        looked = (
            pre[1] if pre is not None and pre[0] == fp else await cache.lookup(user_id, fp, events.recent_key(user_id))
        )
    except RedisError as exc:  # serve without cache and live history rather than fail
        log.warning("redis lookup failed, serving uncached: %s", exc)
        metrics.cache.labels("error").inc()
        looked = None
    if looked is not None and looked.hit:
        metrics.cache.labels("hit").inc()
        return Response(looked.body, media_type="application/json", headers={"X-Cache": "hit"})
    try:
        recs = served.recommend(request, looked.recent if looked is not None else [])
    except RequestError as exc:
        return JSONResponse(status_code=422, content={"detail": exc.detail})
    data = recs.model_dump_json().encode()
    metrics.recommendations.labels(str(recs.cold_start).lower(), recs.strategy).inc()
    if looked is not None:
        metrics.cache.labels("miss").inc()
        try:
            await cache.store(user_id, looked.generation, fp, data)
        except RedisError as exc:
            log.warning("redis cache write failed: %s", exc)
    return Response(data, media_type="application/json", headers={"X-Cache": "miss"})


_NO_HEADERS: list[tuple[bytes, bytes]] = []
_Answer = tuple[bytes, bytes, list[tuple[bytes, bytes]], Impression | None]
"""What the fast path answers: body, ``X-Cache`` value, extra headers, the impression to record."""


def served_impression(
    arms: ActiveExperiment, entry: bytes, user_id: str, arm: str, start: float, metrics: ServingMetrics
) -> tuple[bytes, Impression]:
    """The body of an experiment's cache ``entry`` with a new impression id, and the impression
    to record (counted and timed per arm here; stored by :func:`store_impression` once the
    response is sent)."""
    seconds = time.perf_counter() - start
    body, impression = arms.impression(entry, user_id, arm, new_impression_id(), seconds * 1000.0)
    impressions, latency = metrics.experiment_arm(arms.id, arm)
    impressions.inc()
    latency.observe(seconds)
    return body, impression


async def store_impression(experiment_log: ExperimentLog | None, impression: Impression) -> None:
    """Append ``impression`` to its experiment's stream; a failed write is logged (the list
    was served)."""
    if experiment_log is None:
        return
    try:
        await experiment_log.impression(impression)
    except RedisError as exc:
        log.warning("experiment %s: impression not recorded: %s", impression.experiment_id, exc)


async def _experiment_route(
    http: Request,
    served: ServedModel,
    arms: ActiveExperiment,
    request: RecommendationRequest,
    cache: RecommendationCache,
    events: RedisEvents,
    metrics: ServingMetrics,
) -> Response:
    """The route's answer inside an experiment (what the fast path passed on: a query it
    could not parse, Redis trouble, a :class:`RequestError`)."""
    start = time.perf_counter()
    user_id = request.user_id
    arm = arms.arm(user_id)
    fp = arms.fingerprint(served, arm, params_digest(request.cache_params()))
    pre: tuple[str, Lookup] | None = http.scope.get("state", {}).get(_LOOKUP_STATE)
    looked: Lookup | None
    try:
        looked = (
            pre[1] if pre is not None and pre[0] == fp else await cache.lookup(user_id, fp, events.recent_key(user_id))
        )
    except RedisError as exc:
        log.warning("redis lookup failed, serving uncached: %s", exc)
        metrics.cache.labels("error").inc()
        looked = None
    result = "hit"
    if looked is not None and looked.hit:
        metrics.cache.labels("hit").inc()
        entry = looked.body
    else:
        try:
            entry = arms.compute(served, arm, request, looked.recent if looked is not None else [])
        except RequestError as exc:
            return JSONResponse(status_code=422, content={"detail": exc.detail})
        result = "miss"
        if looked is not None:
            metrics.cache.labels("miss").inc()
            try:
                await cache.store(user_id, looked.generation, fp, entry)
            except RedisError as exc:
                log.warning("redis cache write failed: %s", exc)
    body, impression = served_impression(arms, entry, user_id, arm, start, metrics)  # type: ignore[arg-type]
    return Response(
        body,
        media_type="application/json",
        headers={"X-Cache": result, "X-Experiment": arms.id, "X-Arm": arm},
        background=BackgroundTask(store_impression, getattr(http.app.state, "experiment_log", None), impression),
    )


@dataclass(frozen=True)
class _RouteLabel:
    path: str


class RecommendationsFastPath:
    """Answers ``GET /v1/recommendations/{user_id}`` before FastAPI's routing and dependency
    machinery: a cache hit with the stored bytes, a miss by computing, storing and sending
    the list, exactly as the route does (same validation, fingerprint, headers, metrics).

    Anything unusual passes through to the route unchanged, which then answers it: no model
    yet, a query :class:`QueryParser` rejects (422 details included), Redis trouble, or a
    :class:`~serving.recommender.RequestError` (whose lookup goes along in
    ``scope["state"]``, so the route does not repeat the round trip). Each hit is recorded in
    ``hot`` for :func:`warm_cache`.
    """

    def __init__(
        self, app: ASGIApp, state: ServingState, queries: QueryParser, hot: HotKeys, metrics: ServingMetrics
    ) -> None:
        self.app = app
        self.state = state
        self.queries = queries
        self.hot = hot
        self.metrics = metrics
        self.label = _RouteLabel(RECOMMENDATIONS_ROUTE)
        self._hits = metrics.cache.labels("hit")
        self._misses = metrics.cache.labels("miss")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(_PREFIX):
            answer = await self._answer(scope)
            if answer is not None:
                body, result, extra, impression = answer
                scope["route"] = self.label  # for the metrics middleware
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-length", str(len(body)).encode()),
                            (b"content-type", b"application/json"),
                            (b"x-cache", result),
                            *extra,
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                if impression is not None:  # recorded once the answer is on its way
                    await store_impression(scope["app"].state.experiment_log, impression)
                return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope) -> _Answer | None:
        served = self.state.served
        arms = self.state.experiment
        app_state = scope["app"].state  # cache and events exist once the lifespan started
        cache: RecommendationCache | None = getattr(app_state, "cache", None)
        user_id: str = scope["path"][len(_PREFIX) :]
        if served is None or cache is None or not _USER_ID_RE.fullmatch(user_id):
            return None
        query_string: bytes = scope.get("query_string", b"")
        parsed = self.queries.parse(query_string)
        if parsed is None:
            return None
        if arms is not None:
            return await self._answer_experiment(scope, served, arms, cache, user_id, parsed, query_string)
        fp = f"{served.version}:{parsed.digest}"
        try:
            looked = await cache.lookup(user_id, fp, app_state.events.recent_key(user_id))
        except RedisError:
            return None
        if looked.hit:
            self._hits.inc()
            if len(query_string) <= QUERY_MEMO_MAX_BYTES:
                self.hot.touch((user_id, query_string))
            return looked.body, b"hit", _NO_HEADERS, None  # type: ignore[return-value]
        try:
            recs = served.recommend(parsed.for_user(user_id), looked.recent)
        except RequestError:
            scope.setdefault("state", {})[_LOOKUP_STATE] = (fp, looked)
            return None
        data = recs.model_dump_json().encode()
        self.metrics.recommendations.labels(str(recs.cold_start).lower(), recs.strategy).inc()
        self._misses.inc()
        try:
            await cache.store(user_id, looked.generation, fp, data)
        except RedisError as exc:
            log.warning("redis cache write failed: %s", exc)
        return data, b"miss", _NO_HEADERS, None

    async def _answer_experiment(
        self,
        scope: Scope,
        served: ServedModel,
        arms: ActiveExperiment,
        cache: RecommendationCache,
        user_id: str,
        parsed: ParsedQuery,
        query_string: bytes,
    ) -> _Answer | None:
        """The fast path inside an experiment: the user's arm, its cached (or computed) entry,
        the impression recorded; None (the route answers) as the plain path does."""
        start = time.perf_counter()
        app_state = scope["app"].state
        arm = arms.arm(user_id)
        fp = arms.fingerprint(served, arm, parsed.digest)
        try:
            looked = await cache.lookup(user_id, fp, app_state.events.recent_key(user_id))
        except RedisError:
            return None
        if looked.hit:
            self._hits.inc()
            if len(query_string) <= QUERY_MEMO_MAX_BYTES:
                self.hot.touch((user_id, query_string))
            entry, result = looked.body, b"hit"
        else:
            try:
                entry = arms.compute(served, arm, parsed.for_user(user_id), looked.recent)
            except RequestError:
                scope.setdefault("state", {})[_LOOKUP_STATE] = (fp, looked)
                return None
            self._misses.inc()
            result = b"miss"
            try:
                await cache.store(user_id, looked.generation, fp, entry)
            except RedisError as exc:
                log.warning("redis cache write failed: %s", exc)
        body, impression = served_impression(arms, entry, user_id, arm, start, self.metrics)  # type: ignore[arg-type]
        return body, result, experiment_headers(arms.id, arm), impression


async def warm_cache(
    served: ServedModel,
    keys: list[tuple[str, bytes]],
    queries: QueryParser,
    cache: RecommendationCache,
    events: RedisEvents,
    budget_s: float = WARM_BUDGET_S,
    arms: ActiveExperiment | None = None,
) -> int:
    """Compute and store the lists of ``keys`` (user id, raw query string) for ``served``,
    as a miss would, unless one is cached already (another worker's); stops after
    ``budget_s``. Returns how many it stored. Keys go in an order of this process's own,
    so that workers warming the same keys mostly find each other's results. While an
    experiment runs (``arms``), each user's arm entry is warmed (the challenger's lists do
    not change with the champion: those users are skipped)."""
    if not cache.enabled:
        return 0
    order = list(keys)
    random.Random(os.getpid()).shuffle(order)
    deadline = time.monotonic() + budget_s
    stored = 0
    for user_id, query_string in order:
        if time.monotonic() > deadline:
            break
        parsed = queries.parse(query_string)
        if parsed is None:
            continue
        arm = arms.arm(user_id) if arms is not None else ""
        if arm == CHALLENGER_ARM:
            continue
        fp = arms.fingerprint(served, arm, parsed.digest) if arms is not None else f"{served.version}:{parsed.digest}"
        looked = await cache.lookup(user_id, fp, events.recent_key(user_id))
        if looked.hit:
            continue
        try:
            if arms is not None:
                entry = arms.compute(served, arm, parsed.for_user(user_id), looked.recent)
            else:
                entry = served.recommend(parsed.for_user(user_id), looked.recent).model_dump_json().encode()
        except RequestError:
            continue
        await cache.store(user_id, looked.generation, fp, entry)
        stored += 1
    return stored


def cache_warmer(
    loop: asyncio.AbstractEventLoop,
    hot: HotKeys,
    window_s: float,
    queries: QueryParser,
    cache: RecommendationCache,
    events: RedisEvents,
    experiment: Callable[[], ActiveExperiment | None] | None = None,
) -> Callable[[ServedModel], None]:
    """A :attr:`serving.api.state.ServingState.before_swap` hook: from the loading thread, runs
    :func:`warm_cache` on ``loop`` (between requests) over the keys hit within the last
    ``window_s`` seconds, and waits for it. Failures are logged; the swap goes ahead."""

    def warm(served: ServedModel) -> None:
        keys = hot.recent(window_s)
        if not keys:
            return
        try:
            asyncio.get_running_loop()
            return  # called on an event loop: waiting here would block it
        except RuntimeError:
            pass
        start = time.perf_counter()
        arms = experiment() if experiment is not None else None
        future = asyncio.run_coroutine_threadsafe(warm_cache(served, keys, queries, cache, events, arms=arms), loop)
        try:
            stored = future.result(timeout=WARM_BUDGET_S + 30)
        except Exception as exc:
            future.cancel()
            log.warning("cache warming for %s failed: %s", served.version, exc)
            return
        log.info(
            "warmed %d of %d recently hit lists for %s in %.2fs",
            stored,
            len(keys),
            served.version,
            time.perf_counter() - start,
        )

    return warm
