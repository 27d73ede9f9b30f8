"""The serving API's request and response models (pydantic).

They define the OpenAPI schema of :mod:`serving.app`, and :class:`Recommendations` is also
what :meth:`serving.recommender.ServedModel.recommend` returns, so a computed list is
validated once, when it is built, and serialized as it is.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.events import EVENT_ID_DESCRIPTION, EVENT_ID_PATTERN
from core.schemas import DEVICES, EARLIEST_EVENT_TIME, EVENT_TYPES, RATING_MAX, RATING_MIN

USER_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
USER_ID_DESCRIPTION = "1-128 characters of [A-Za-z0-9_.:-]"
MAX_K = 100
MAX_LIST = 4096


def as_utc(moment: datetime) -> datetime:
    """``moment`` with a time zone: a naive one is read as UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class EventIn(BaseModel):
    """One interaction posted to ``POST /v1/events``. Unknown fields are rejected (422); the
    latest allowed timestamp (now + ``preprocess.future_tolerance_s``) is checked by the route."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(pattern=USER_ID_PATTERN, description=USER_ID_DESCRIPTION)
    item_id: str = Field(min_length=1, max_length=256)
    event_type: Literal[EVENT_TYPES]  # type: ignore[valid-type]
    timestamp: datetime | None = Field(
        None, description="event time, from 1995-01-01 to a day ahead; naive means UTC; default: when received"
    )
    rating: float | None = Field(
        None, ge=RATING_MIN, le=RATING_MAX, allow_inf_nan=False, description="only for event_type 'rate'"
    )
    event_id: str | None = Field(
        None,
        pattern=EVENT_ID_PATTERN,
        description=f"{EVENT_ID_DESCRIPTION}: a retry with the same id is not recorded twice; default: assigned",
    )
    device: Literal[DEVICES] | None = Field(None, description="the client's device")  # type: ignore[valid-type]
    dwell_time_s: float | None = Field(None, ge=0, le=86400, allow_inf_nan=False, description="seconds on the item")
    scroll_depth: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="share of the item scrolled")
    session_id: str | None = Field(None, min_length=1, max_length=256, description="the client's session")
    impression_id: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="the impression_id of the served list this event answers: attributes it to an experiment's arm",
    )

    @field_validator("timestamp")
    @classmethod
    def _not_before_earliest(cls, value: datetime | None) -> datetime | None:
        if value is not None and as_utc(value) < EARLIEST_EVENT_TIME:
            raise ValueError(f"timestamp is before {EARLIEST_EVENT_TIME.date().isoformat()}")
        return value

    @model_validator(mode="after")
    def _rating_only_for_rate(self) -> EventIn:
        if self.event_type == "rate" and self.rating is None:
            raise ValueError("event_type 'rate' needs a rating")
        if self.event_type != "rate" and self.rating is not None:
            raise ValueError(f"rating is only allowed with event_type 'rate', not {self.event_type!r}")
        return self


class RecommendationQuery(BaseModel):
    """Query parameters of ``GET /v1/recommendations/{user_id}`` (validated as one model);
    an unknown parameter is rejected (422)."""

    model_config = ConfigDict(extra="forbid")

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
    stream_id: str = Field(description="the event's stream entry (for a duplicate: the first delivery's)")
    event_id: str = Field(description="the client's event_id, or the one assigned (uuid4 hex)")
    duplicate: bool = Field(description="true when this event_id was already recorded: nothing was appended")


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
