"""``Depends`` providers: the app's singletons, for the route handlers.

:func:`serving.app.create_app` and :func:`serving.app.lifespan` put one of each on
``app.state``; the providers return those objects as they are (each is an ``async def``, so
FastAPI calls it on the event loop rather than in a worker thread). The ``*Dep`` aliases are
the annotations handlers use.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from core.settings import ServingSettings
from serving.api.metrics import ServingMetrics
from serving.api.state import ServingState
from serving.cache import RecommendationCache
from serving.events import RedisEvents

bearer = HTTPBearer(auto_error=False, description="serving.admin_token")
events_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="EventsToken",
    description="serving.events_token (checked by serving.api.guard.EventsGuard before the body is read)",
)
"""Documents the events route's bearer token in the OpenAPI schema; the check itself is the
guard's."""


async def serving_state(request: Request) -> ServingState:
    """The holder of the served model (:class:`serving.api.state.ServingState`)."""
    return request.app.state.serving


async def serving_settings(request: Request) -> ServingSettings:
    return request.app.state.settings.serving


async def serving_metrics(request: Request) -> ServingMetrics:
    return request.app.state.metrics


async def recommendation_cache(request: Request) -> RecommendationCache:
    return request.app.state.cache


async def event_store(request: Request) -> RedisEvents:
    return request.app.state.events


@dataclass(frozen=True)
class ServingContext:
    """Every singleton a hot-path handler uses, resolved as one dependency (each ``Depends``
    costs a resolution per request)."""

    state: ServingState
    settings: ServingSettings
    metrics: ServingMetrics
    cache: RecommendationCache
    events: RedisEvents


async def serving_context(request: Request) -> ServingContext:
    """The app's :class:`ServingContext`, built on first use (cache and events exist once
    the lifespan has started)."""
    app_state = request.app.state
    context = getattr(app_state, "context", None)
    if context is None:
        context = ServingContext(
            app_state.serving, app_state.settings.serving, app_state.metrics, app_state.cache, app_state.events
        )
        app_state.context = context
    return context


StateDep = Annotated[ServingState, Depends(serving_state)]
SettingsDep = Annotated[ServingSettings, Depends(serving_settings)]
MetricsDep = Annotated[ServingMetrics, Depends(serving_metrics)]
CacheDep = Annotated[RecommendationCache, Depends(recommendation_cache)]
EventsDep = Annotated[RedisEvents, Depends(event_store)]
ContextDep = Annotated[ServingContext, Depends(serving_context)]


async def require_admin(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """403 when no ``serving.admin_token`` is configured, 401 unless the request carries it
    as a bearer token."""
    if not settings.admin_token:
        raise HTTPException(status_code=403, detail="admin disabled: no serving.admin_token is configured")
    if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), settings.admin_token.encode()):
        raise HTTPException(
            status_code=401, detail="missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
