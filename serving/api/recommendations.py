"""``GET /v1/recommendations/{user_id}``: the route, and the middleware answering its cache
hits before FastAPI's routing.

A request reads the user's cache generation, the cached list and (on a miss) the user's live
history in one Redis round trip (:mod:`serving.cache`); a miss is computed by
:meth:`serving.recommender.ServedModel.recommend`, serialized once and stored under the
generation read. Redis trouble serves uncached rather than fails.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qsl

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api.deps import ContextDep
from serving.api.metrics import ServingMetrics
from serving.api.state import ServingState
from serving.cache import Lookup, fingerprint
from serving.recommender import RecommendationRequest, RequestError
from serving.schemas import USER_ID_DESCRIPTION, USER_ID_PATTERN, RecommendationQuery, Recommendations

log = logging.getLogger(__name__)

RECOMMENDATIONS_ROUTE = "/v1/recommendations/{user_id}"
_PREFIX = "/v1/recommendations/"
_USER_ID_RE = re.compile(USER_ID_PATTERN)
_LOOKUP_STATE = "hyperrec_cache_lookup"

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
    fp = fingerprint(served.version, request.cache_params())
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


@dataclass(frozen=True)
class _RouteLabel:
    path: str


class CacheHitFastPath:
    """Answers ``GET /v1/recommendations/{user_id}`` cache hits before FastAPI's routing and
    dependency machinery (the lean handler of the hot path).

    The query is validated with the same :class:`~serving.schemas.RecommendationQuery` and
    the same cache fingerprint is computed as in the route. Anything unusual (no model yet, a
    repeated or unknown parameter, a validation error, Redis trouble) passes through to the
    route unchanged, which then answers it (422 details included). A miss passes its lookup on
    in ``scope["state"]``, so the route does not repeat the round trip.
    """

    def __init__(self, app: ASGIApp, state: ServingState, default_k: int, metrics: ServingMetrics) -> None:
        self.app = app
        self.state = state
        self.default_k = default_k
        self.metrics = metrics
        self.label = _RouteLabel(RECOMMENDATIONS_ROUTE)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"].startswith(_PREFIX):
            body = await self._hit(scope)
            if body is not None:
                scope["route"] = self.label  # for the metrics middleware
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
        app_state = scope["app"].state  # cache and events exist once the lifespan started
        cache = getattr(app_state, "cache", None)
        user_id = scope["path"][len(_PREFIX) :]
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
            looked = await cache.lookup(user_id, fp, app_state.events.recent_key(user_id))
        except RedisError:
            return None
        if looked.hit:
            self.metrics.cache.labels("hit").inc()
            return looked.body
        scope.setdefault("state", {})[_LOOKUP_STATE] = (fp, looked)
        return None
