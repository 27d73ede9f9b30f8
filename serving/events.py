"""The real-time path: accepted events go to a Redis Stream and to each user's live history.

``POST /v1/events`` → :meth:`RedisEvents.publish`, one MULTI transaction that runs a Lua
script and bumps the user's cache generation. The script, given the event's id
(:class:`core.events.Event`, an idempotency key),

- does nothing but return the stream id recorded for that id when ``<ns>:event-id:<id>``
  exists: the event is a retry (a duplicate) and is not appended again;
- otherwise appends the event to the stream ``<ns>:events`` (``XADD``, approximate
  ``MAXLEN``), which downstream consumers (``feature_store.consumer``: the landing zone and
  fresh online profiles; monitoring) read, records the new stream id under
  ``<ns>:event-id:<id>`` for ``event_id_ttl_s``, and appends the item to the user's live
  history ``<ns>:recent:<user>`` (a list trimmed to the last ``max_per_user`` items,
  expiring ``history_ttl_s`` after the last event), which every serving worker reads, so
  all workers agree on what the user just did.

The check and the appends run atomically, so two concurrent deliveries of one id append it
once. The generation bump (:class:`serving.cache.RecommendationCache`) runs for retries too,
which only costs a cache miss; cached lists made before the event are never served again.
"""

from __future__ import annotations

from typing import NamedTuple

import redis.asyncio as aioredis

from core.events import Event
from core.events import stream_key as events_stream_key
from serving.cache import RecommendationCache

# KEYS: event-id key, stream, live history. ARGV: event-id TTL, stream MAXLEN, history
# length, history TTL, item id, then the stream entry's field/value pairs.
_PUBLISH = """
local first = redis.call('GET', KEYS[1])
if first then return {0, first} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 6))
redis.call('SET', KEYS[1], id, 'EX', ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[5])
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[3], ARGV[4])
return {1, id}
"""


class Published(NamedTuple):
    """What :meth:`RedisEvents.publish` did: the event's stream id (the first delivery's for a
    retry) and whether it was a retry of an event already appended."""

    stream_id: str
    duplicate: bool


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
        event_id_ttl_s: int = 86400,
    ) -> None:
        if min(max_per_user, history_ttl_s, stream_maxlen, event_id_ttl_s) < 1:
            raise ValueError("max_per_user, history_ttl_s, stream_maxlen and event_id_ttl_s must be >= 1")
        self.client = client
        self.namespace = namespace
        self.cache = cache
        self.max_per_user = max_per_user
        self.history_ttl_s = history_ttl_s
        self.stream_maxlen = stream_maxlen
        self.event_id_ttl_s = event_id_ttl_s
        self._publish = client.register_script(_PUBLISH)

    @property
    def stream_key(self) -> str:
        return events_stream_key(self.namespace)

    def recent_key(self, user_id: str) -> str:
        return f"{self.namespace}:recent:{user_id}"

    def event_id_key(self, event_id: str) -> str:
        return f"{self.namespace}:event-id:{event_id}"

    async def publish(self, event: Event) -> Published:
        """Record ``event`` (stream, live history, cache generation) unless its ``event_id``
        was recorded within ``event_id_ttl_s`` (see the module docstring)."""
        if not event.event_id:
            raise ValueError("an event needs an event_id to be published")
        flat = [part for pair in event.fields().items() for part in pair]
        keys = [self.event_id_key(event.event_id), self.stream_key, self.recent_key(event.user_id)]
        limits = [self.event_id_ttl_s, self.stream_maxlen, self.max_per_user, self.history_ttl_s]
        args: list[str | int] = [*limits, event.item_id, *flat]
        pipe = self.client.pipeline(transaction=True)
        await self._publish(keys=keys, args=args, client=pipe)
        self.cache.queue_invalidate(pipe, event.user_id)
        results = await pipe.execute()
        appended, stream_id = results[0]
        return Published(_text(stream_id), not int(appended))

    async def recent_items(self, user_id: str) -> list[str]:
        """Item ids of the user's live history, oldest first (possibly repeated)."""
        return [_text(item) for item in await self.client.lrange(self.recent_key(user_id), 0, -1)]

    async def read_stream(self, count: int = 100) -> list[dict[str, str]]:
        """The oldest ``count`` entries of the stream (for consumers and tests)."""
        entries = await self.client.xrange(self.stream_key, count=count) or []
        return [{_text(k): _text(v) for k, v in (fields or {}).items()} for _id, fields in entries]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
