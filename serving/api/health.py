"""Probes and metrics: ``GET /healthz`` (liveness), ``GET /readyz`` (a model is loaded; also
picks up a newly published ``CURRENT``) and ``GET /metrics`` (Prometheus, not in the OpenAPI
schema)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from serving.api.deps import MetricsDep, StateDep
from serving.api.state import NO_BUNDLE

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Readiness: a model is loaded. Also picks up a newly published ``CURRENT``."""
    served = await asyncio.to_thread(state.refresh)
    if served is None:
        return JSONResponse(status_code=503, content={"status": "unavailable", "detail": state.error or NO_BUNDLE})
    body: dict[str, Any] = {"status": "ready", **served.describe()}
    if state.error:
        body["reload_error"] = state.error
    return JSONResponse(status_code=200, content=body)


@router.get("/metrics", include_in_schema=False)
def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
