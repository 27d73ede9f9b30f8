"""The real-time path: accepted events go to a Redis Stream and to each user's live history.

``POST /v1/events`` → :meth:`RedisEvents.publish`, one MULTI transaction that runs a Lua
script and bumps the user's cache generation. The script, given the event's id
(:class:`core.events.Event`, an idempotency key),

- does nothing but return the stream id recorded for that id when the hash
  ``<ns>:event-ids`` holds it: the event is a retry (a duplicate) and is not appended again;
- otherwise appends the event to the stream ``<ns>:events`` (``XADD``, approximate
  ``MAXLEN``), which downstream consumers (``feature_store.consumer``: the landing zone and
  fresh online profiles; monitoring) read, records the new stream id under the event id in
  ``<ns>:event-ids`` (and the id in the sorted set ``<ns>:event-ids:by-time``, scored by the
  stream id's milliseconds; ids older than ``event_id_ttl_s`` are dropped from both, a few
  per publish), and appends the item to the user's live history ``<ns>:recent:<user>`` (a
  list trimmed to the last ``max_per_user`` items, expiring ``history_ttl_s`` after the last
  event), which every serving worker reads, so all workers agree on what the user just did.

Keys and TTLs: the stream and the event-id records carry no TTL, so a ``volatile-*``
``maxmemory-policy`` (``online_store.maxmemory_policy``) can never evict them; the live
histories, cache generations and cached lists (:mod:`serving.cache`) and the rate-limit
buckets (:class:`RateLimiter`) all expire, and are what such a policy evicts: each can be
recomputed (a history evicted early only loses its live personalization).

The check and the appends run atomically, so two concurrent deliveries of one id append it
once. The generation bump (:class:`serving.cache.RecommendationCache`) runs for retries too,
which only costs a cache miss; cached lists made before the event are never served again.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import redis.asyncio as aioredis

from core.events import Event
from core.events import stream_key as events_stream_key
from serving.cache import RecommendationCache

# KEYS: event-id hash, stream, live history, event-id sorted set. ARGV: event-id TTL (s),
# stream MAXLEN, history length, history TTL, event id, item id, then the stream entry's
# field/value pairs.
_PUBLISH = """
local first = redis.call('HGET', KEYS[1], ARGV[5])
if first then return {0, first} end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 7))
local ms = tonumber(string.match(id, '^(%d+)'))
redis.call('HSET', KEYS[1], ARGV[5], id)
redis.call('ZADD', KEYS[4], ms, ARGV[5])
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ms - 1000 * tonumber(ARGV[1]), 'LIMIT', 0, 64)
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[4], unpack(old))
end
redis.call('RPUSH', KEYS[3], ARGV[6])
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

    @property
    def event_ids_key(self) -> str:
        """The hash event id → stream id of the events recorded within ``event_id_ttl_s``."""
        return f"{self.namespace}:event-ids"

    @property
    def event_times_key(self) -> str:
        """The sorted set of the same event ids, scored by their stream id's milliseconds."""
        return f"{self.namespace}:event-ids:by-time"

    async def publish(self, event: Event) -> Published:
        """Record ``event`` (stream, live history, cache generation) unless its ``event_id``
        was recorded within ``event_id_ttl_s`` (see the module docstring)."""
        if not event.event_id:
            raise ValueError("an event needs an event_id to be published")
        flat = [part for pair in event.fields().items() for part in pair]
        keys = [self.event_ids_key, self.stream_key, self.recent_key(event.user_id), self.event_times_key]
        limits = [self.event_id_ttl_s, self.stream_maxlen, self.max_per_user, self.history_ttl_s]
        args: list[str | int] = [*limits, event.event_id, event.item_id, *flat]
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


# KEYS: the bucket. ARGV: refill rate (tokens/s), capacity. Returns {allowed 0/1, seconds
# until a token is available (a string: Lua numbers become integers in replies)}.
_TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local allowed, wait = 0, (1 - tokens) / rate
if tokens >= 1 then allowed, wait, tokens = 1, 0, tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
return {allowed, tostring(wait)}
"""


class RateLimiter:
    """Token buckets in Redis, one per client key, shared by every worker on the server.

    A bucket holds up to ``burst`` tokens and gains ``rate_per_s`` per second; a request
    takes one, or is refused while the bucket is empty. A bucket expires once it would be
    full again (an idle client costs no memory). ``rate_per_s`` or ``burst`` 0 disables it.
    """

    def __init__(self, client: aioredis.Redis, namespace: str, rate_per_s: float, burst: int) -> None:
        self.namespace = namespace
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._take = client.register_script(_TAKE)

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0 and self.burst > 0

    def bucket_key(self, client_key: str) -> str:
        return f"{self.namespace}:ratelimit:{hashlib.sha256(client_key.encode()).hexdigest()[:24]}"

    async def take(self, client_key: str) -> float:
        """Take a token from ``client_key``'s bucket: 0.0 when allowed, else the seconds
        until a token is available."""
        if not self.enabled:
            return 0.0
        allowed, wait = await self._take(keys=[self.bucket_key(client_key)], args=[self.rate_per_s, self.burst])
        return 0.0 if int(allowed) else max(float(_text(wait)), 0.001)
