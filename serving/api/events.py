"""``POST /v1/events``: live interaction intake (to the event stream and the user's live
history, :mod:`serving.events`). An event keeps the client's ``event_id`` or gets a new one
(uuid4 hex); a retry with a recorded ``event_id`` is answered ``duplicate: true`` and not
recorded again.

Before the body is read, :class:`serving.api.guard.EventsGuard` checks the producer's bearer
token (``serving.events_token``, when configured: else 401) and its rate limit (else 429). A
failed write to the event store answers 503 and marks the store degraded in ``/readyz``
until a write succeeds."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from core.events import Event
from core.schemas import EARLIEST_EVENT_TIME
from serving.api.deps import EventsDep, MetricsDep, StateDep, events_bearer
from serving.api.metrics import ServingMetrics
from serving.api.state import ServingState
from serving.schemas import EventAccepted, EventIn, as_utc

log = logging.getLogger(__name__)
router = APIRouter()


async def _attribute(
    request: Request, state: ServingState, metrics: ServingMetrics, event: Event, impression_id: str
) -> None:
    """Record an event posted with an impression id in the running experiment's outcome
    stream (:class:`serving.experiment.ExperimentLog`); the report joins it to the impression.
    Without a running experiment the impression id is not recorded. A failed write is logged:
    the event itself is accepted already."""
    arms = state.experiment
    experiment_log = getattr(request.app.state, "experiment_log", None)
    if arms is None or experiment_log is None:
        return
    fields = {
        "impression_id": impression_id,
        "event_id": event.event_id,
        "user_id": event.user_id,
        "item_id": event.item_id,
        "event_type": event.event_type,
        "rating": event.rating,
        "dwell_time_s": event.dwell_time_s,
        "timestamp": event.timestamp.isoformat(),
    }
    try:
        await experiment_log.outcome(arms.id, fields)
    except RedisError as exc:
        log.warning("experiment %s: outcome of impression %s not recorded: %s", arms.id, impression_id, exc)
        return
    metrics.experiment_outcomes.labels(arms.id, arms.arm(event.user_id), event.event_type).inc()


def _unprocessable(field: str, kind: str, msg: str) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": [{"loc": ["body", field], "type": kind, "msg": msg}]})


@router.post(
    "/v1/events",
    status_code=202,
    response_model=EventAccepted,
    dependencies=[Depends(events_bearer)],
    responses={
        401: {"description": "missing or wrong events token (when serving.events_token is set)"},
        413: {"description": "body larger than serving.max_body_bytes"},
        422: {"description": "invalid event, unknown field or item, timestamp out of range"},
        429: {"description": "rate limit of the client exceeded (Retry-After)"},
        503: {"description": "no bundle or event store"},
    },
)
async def post_event(
    event: EventIn, request: Request, state: StateDep, events: EventsDep, metrics: MetricsDep
) -> EventAccepted | JSONResponse:
    """Accept one interaction: it goes to the event stream and the user's live history,
    invalidates the user's cached lists and shapes their next recommendations (once per
    ``event_id``). The timestamp must lie between 1995-01-01 and now plus
    ``preprocess.future_tolerance_s`` (as preprocessing requires)."""
    served = await state.require()
    arms = state.experiment  # an experiment's challenger may know items the champion does not
    if not served.bundle.has_item(event.item_id) and not (arms and arms.challenger.bundle.has_item(event.item_id)):
        return _unprocessable(
            "item_id", "unknown_item", f"unknown item_id {event.item_id[:64]!r}: not in model version {served.version}"
        )
    now = datetime.now(UTC)
    if event.timestamp is not None:
        horizon = now + timedelta(seconds=request.app.state.settings.preprocess.future_tolerance_s)
        if as_utc(event.timestamp) > horizon:
            return _unprocessable(
                "timestamp",
                "timestamp_out_of_range",
                f"timestamp is later than now + preprocess.future_tolerance_s ({horizon.isoformat()}); "
                f"allowed: {EARLIEST_EVENT_TIME.date().isoformat()} to then",
            )
    timestamp = event.timestamp or now
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
        state.event_store_failed(f"{type(exc).__name__}: {exc}")
        raise HTTPException(status_code=503, detail=f"event store unavailable: {exc}") from exc
    state.event_store_ok()
    if not published.duplicate:
        metrics.events.labels(event.event_type).inc()
        if event.impression_id is not None:
            await _attribute(request, state, metrics, accepted, event.impression_id)
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
