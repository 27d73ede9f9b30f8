"""Probes and metrics: ``GET /healthz`` (liveness), ``GET /readyz`` (a model is loaded; reports
only, it never loads one) and ``GET /metrics`` (Prometheus, not in the OpenAPI schema)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from serving.api.deps import MetricsDep, StateDep
from serving.api.state import NO_BUNDLE
from serving.bundle_checks import describe_error

router = APIRouter()

PING_TIMEOUT_S = 0.5


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


async def _event_store_problem(request: Request, state: Any) -> str | None:
    """Why events cannot be written now: the last write failed, or the store does not answer
    a PING within :data:`PING_TIMEOUT_S`; None when it looks writable."""
    if state.event_store_error:
        return f"the last event write failed: {state.event_store_error}"
    events = getattr(request.app.state, "events", None)
    if events is None:
        return "no event store (the app has not started)"
    try:
        await asyncio.wait_for(events.client.ping(), PING_TIMEOUT_S)
    except Exception as exc:
        return f"the event store does not answer: {describe_error(exc)}"
    return None


@router.get("/readyz")
async def readyz(request: Request, state: StateDep) -> JSONResponse:
    """Readiness: 200 while a model is loaded (503 without one), with its description.
    ``degraded: true`` and ``degraded_reason`` when events cannot be written (the model
    still answers); ``reload_error`` when the last reload failed or ``CURRENT`` was refused;
    ``experiment`` while an online experiment runs, ``experiment_error`` when its challenger
    could not be loaded.
    Reports only: loading happens in the poller and ``POST /admin/reload``."""
    served = state.served
    problem = await _event_store_problem(request, state)
    degraded: dict[str, Any] = {"degraded": problem is not None}
    if problem is not None:
        degraded["degraded_reason"] = problem
    if served is None:
        body = {"status": "unavailable", "detail": state.error or NO_BUNDLE, **degraded}
        return JSONResponse(status_code=503, content=body)
    body = {"status": "ready", **served.describe(), **degraded}
    if state.error:
        body["reload_error"] = state.error
    if state.experiment is not None:  # only while an experiment runs: otherwise the body is as before
        running = state.experiment.experiment
        body["experiment"] = {
            "id": running.id,
            "design": running.design,
            "share": running.share,
            "challenger": state.experiment.challenger.version,
        }
    if state.experiment_error:
        body["experiment_error"] = state.experiment_error
    return JSONResponse(status_code=200, content=body)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
