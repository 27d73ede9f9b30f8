"""The real-time path: accepted events go to a Redis Stream and to each user's live history.

``POST /v1/events`` → :meth:`RedisEvents.publish`, one MULTI transaction that

- appends the event to the stream ``<ns>:events`` (``XADD``, approximate ``MAXLEN``), which
  downstream consumers (online profile materialization, monitoring) read;
- appends the item to the user's live history ``<ns>:recent:<user>`` (a list trimmed to the
  last ``max_per_user`` items, expiring ``history_ttl_s`` after the last event), which every
  serving worker reads, so all workers agree on what the user just did;
- bumps the user's cache generation (:class:`serving.cache.RecommendationCache`), so cached
  lists made before the event are never served again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from serving.cache import RecommendationCache


@dataclass(frozen=True)
class Event:
    """One accepted interaction event."""

    user_id: str
    item_id: str
    event_type: str
    timestamp: datetime
    rating: float | None = None

    def fields(self) -> dict[FieldT, EncodableT]:
        """The stream entry's fields (``rating`` empty when absent)."""
        return {
            "user_id": self.user_id,
            "item_id": self.item_id,
            "event_type": self.event_type,
            "timestamp": self.timestamp.isoformat(),
            "rating": "" if self.rating is None else repr(float(self.rating)),
        }


class RedisEvents:
    """Event stream plus per-user live histories in one Redis server (see module docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        namespace: str,
        cache: RecommendationCache,
        *,
        max_per_user: int = 200,
        history_ttl_s: int = 7 * 86400,
        stream_maxlen: int = 100_000,
    ) -> None:
        if max_per_user < 1 or history_ttl_s < 1 or stream_maxlen < 1:
            raise ValueError("max_per_user, history_ttl_s and stream_maxlen must be >= 1")
        self.client = client
        self.namespace = namespace
        self.cache = cache
        self.max_per_user = max_per_user
        self.history_ttl_s = history_ttl_s
        self.stream_maxlen = stream_maxlen

    @property
    def stream_key(self) -> str:
        return f"{self.namespace}:events"

    def recent_key(self, user_id: str) -> str:
        return f"{self.namespace}:recent:{user_id}"

    async def publish(self, event: Event) -> str:
        """Record ``event`` (stream, live history, cache generation); return its stream id."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(self.stream_key, event.fields(), maxlen=self.stream_maxlen, approximate=True)
        key = self.recent_key(event.user_id)
        pipe.rpush(key, event.item_id)
        pipe.ltrim(key, -self.max_per_user, -1)
        pipe.expire(key, self.history_ttl_s)
        self.cache.queue_invalidate(pipe, event.user_id)
        results = await pipe.execute()
        return _text(results[0])

    async def recent_items(self, user_id: str) -> list[str]:
        """Item ids of the user's live history, oldest first (possibly repeated)."""
        return [_text(item) for item in await self.client.lrange(self.recent_key(user_id), 0, -1)]

    async def read_stream(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest ``count`` entries of the stream (for consumers and tests)."""
        entries = await self.client.xrange(self.stream_key, count=count) or []
        return [{_text(k): _text(v) for k, v in (fields or {}).items()} for _id, fields in entries]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
