"""One interaction event as the serving tier accepts it, and its encodings: the fields of a
Redis Stream entry (written by ``serving.events``, read by ``feature_store.consumer``) and
an INTERACTIONS row (what the consumer lands).

Stream fields are strings: ``user_id``, ``item_id``, ``event_type``, ``timestamp`` (ISO 8601
with offset), ``rating`` (``repr`` of the float, ``""`` when absent), ``event_id`` (the
idempotency key; absent in entries written before event ids existed) and, only when the
client sent them, the context fields ``device``, ``dwell_time_s``, ``scroll_depth`` (``repr``
of the float) and ``session_id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from core.schemas import INTERACTIONS

EVENT_ID_PATTERN = r"^[!-~]{1,128}$"
EVENT_ID_DESCRIPTION = "1-128 printable ASCII characters without spaces (idempotency key)"


def stream_key(namespace: str) -> str:
    """The serving tier's event stream in Redis key namespace ``namespace``."""
    return f"{namespace}:events"


@dataclass(frozen=True)
class Event:
    """One accepted interaction event; ``event_id`` identifies it across retries."""

    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime
    rating: float | None = None
    event_id: str | None = None
    device: str | None = None
    dwell_time_s: float | None = None
    scroll_depth: float | None = None
    session_id: str | None = None

    def fields(self) -> dict[str, str]:
        """The stream entry's fields (``rating`` empty when absent; ``event_id`` and the
        context fields only when set)."""
        out = {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "timestamp": self.timestamp.isoformat(),
            "rating": "" if self.rating is None else repr(float(self.rating)),
        }
        for name in ("event_id", "device", "session_id"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("dwell_time_s", "scroll_depth"):
            if getattr(self, name) is not None:
                out[name] = repr(float(getattr(self, name)))
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[Any, Any]) -> Event:
        """The event a stream entry's fields (str or bytes) encode; the inverse of :meth:`fields`."""
        text = {_text(k): _text(v) for k, v in fields.items()}
        missing = [f for f in ("user_id", "item_id", "event_type", "timestamp") if f not in text]
        if missing:
            raise ValueError(f"stream entry lacks fields {missing}")
        timestamp = datetime.fromisoformat(text["timestamp"])
        if timestamp.tzinfo is None:
            timestamp = timestamp.replace(tzinfo=UTC)
        rating = text.get("rating", "")
        return cls(
            user_id=text["user_id"],
            item_id=text["item_id"],
            event_type=text["event_type"],
            timestamp=timestamp,
            rating=float(rating) if rating else None,
            event_id=text.get("event_id") or None,
            device=text.get("device") or None,
            dwell_time_s=float(text["dwell_time_s"]) if text.get("dwell_time_s") else None,
            scroll_depth=float(text["scroll_depth"]) if text.get("scroll_depth") else None,
            session_id=text.get("session_id") or None,
        )

    def row(self) -> dict[str, Any]:
        """The event as an INTERACTIONS row (columns the serving tier does not receive are None)."""
        row: dict[str, Any] = dict.fromkeys(INTERACTIONS.names)
        row.update(
            user_id=self.user_id,
            item_id=self.item_id,
            event_type=self.event_type,
            rating=self.rating,
            timestamp=self.timestamp.astimezone(UTC),
            event_id=self.event_id,
            device=self.device,
            dwell_time_s=self.dwell_time_s,
            scroll_depth=self.scroll_depth,
            session_id=self.session_id,
        )
        return row


def interactions_table(events: Sequence[Event]) -> pa.Table:
    """``events`` as an INTERACTIONS table, in the order given."""
    schema = INTERACTIONS.arrow()
    rows = [e.row() for e in events]
    return pa.Table.from_pylist(rows, schema=schema)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
