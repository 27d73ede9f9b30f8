"""``POST /v1/events``: live interaction intake (to the event stream and the user's live
history, :mod:`serving.events`). An event keeps the client's ``event_id`` or gets a new one
(uuid4 hex); a retry with a recorded ``event_id`` is answered ``duplicate: true`` and not
recorded again."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from core.events import Event
from serving.api.deps import EventsDep, MetricsDep, StateDep
from serving.schemas import EventAccepted, EventIn

router = APIRouter()


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventAccepted,
    responses={
        422: {"description": "invalid event or unknown item"},
        503: {"description": "no bundle or event store"},
    },
)
async def post_event(
    event: EventIn, state: StateDep, events: EventsDep, metrics: MetricsDep
) -> EventAccepted | JSONResponse:
    """Accept one interaction: it goes to the event stream and the user's live history,
    invalidates the user's cached lists and shapes their next recommendations (once per
    ``event_id``)."""
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
    event_id = event.event_id or uuid.uuid4().hex
    accepted = Event(
        event.user_id,
        event.item_id,
        event.event_type,
        timestamp,
        event.rating,
        event_id,
        device=event.device,
        dwell_time_s=event.dwell_time_s,
        scroll_depth=event.scroll_depth,
        session_id=event.session_id,
    )
    try:
        published = await events.publish(accepted)
    except RedisError as exc:
        raise HTTPException(status_code=503, detail=f"event store unavailable: {exc}") from exc
    if not published.duplicate:
        metrics.events.labels(event.event_type).inc()
    return EventAccepted(
        accepted=True,
        user_id=event.user_id,
        item_id=event.item_id,
        event_type=event.event_type,
        timestamp=timestamp,
        stream_id=published.stream_id,
        event_id=event_id,
        duplicate=published.duplicate,
    )
