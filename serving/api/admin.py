"""Token-protected admin routes (``serving.admin_token``, :func:`serving.api.deps.require_admin`):
``POST /admin/reload`` and ``POST /admin/cache/flush``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException

from serving.api.deps import CacheDep, StateDep, require_admin
from serving.api.state import NO_BUNDLE
from serving.schemas import Flushed, Reloaded

AUTH_RESPONSES: dict[int | str, dict[str, str]] = {
    401: {"description": "missing or wrong token"},
    403: {"description": "admin disabled"},
}

router = APIRouter(dependencies=[Depends(require_admin)])


@router.post("/admin/reload", response_model=Reloaded, responses={**AUTH_RESPONSES, 503: {"description": "no bundle"}})
async def admin_reload(state: StateDep) -> Reloaded:
    """Re-read ``CURRENT`` now and swap in the version it names (after its checks; a bundle
    refused earlier is tried again)."""
    before = state.served.version if state.served else None
    served = await asyncio.to_thread(state.refresh, retry_refused=True)
    if served is None:
        raise HTTPException(status_code=503, detail=state.error or NO_BUNDLE)
    return Reloaded(
        model_version=served.version,
        previous_version=before,
        reloaded=served.version != before,
        reload_error=state.error,
    )


@router.post("/admin/cache/flush", response_model=Flushed, responses=AUTH_RESPONSES)
async def admin_cache_flush(cache: CacheDep) -> Flushed:
    """Delete every cached recommendation list."""
    return Flushed(deleted=await cache.flush())
