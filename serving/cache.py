"""Per-user recommendation cache in Redis, invalidated by the user's events.

An entry lives at ``<ns>:rec:{<user>}:<gen>:<fingerprint>`` for ``ttl_s`` seconds, where

- ``gen`` is the user's generation counter ``<ns>:gen:<user>`` (absent = 0), bumped by every
  accepted event of the user (:meth:`RecommendationCache.queue_invalidate`);
- ``fingerprint`` names the model version and every query parameter that shapes the list.

A request reads the generation, the entry and (on a miss) the user's live history in one
round trip (a Lua script), computes the list, and writes it under the generation it read. An
event arriving meanwhile bumps the generation, so that list is never read: a cached list is
always one computed from the user's current events. The generation key expires
``2·ttl_s + 60`` s after the last event, when no entry written under any older generation is
left, so a restart at 0 cannot revive one.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

_LOOKUP = """
local gen = redis.call('GET', KEYS[1]) or '0'
if ARGV[2] == '1' then
  local body = redis.call('GET', ARGV[1] .. gen .. ':' .. ARGV[3])
  if body then return {gen, body} end
end
return {gen, false, unpack(redis.call('LRANGE', KEYS[2], 0, -1))}
"""


def params_digest(params: dict[str, Any]) -> str:
    """16 hex digits of the SHA-1 of the canonical JSON of ``params``."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:16]


def fingerprint(version: str, params: dict[str, Any]) -> str:
    """``<version>:<digest>``: the model version and :func:`params_digest` of ``params``."""
    return f"{version}:{params_digest(params)}"


@dataclass
class Lookup:
    """What one lookup returns: the user's generation, the cached body (None on a miss) and,
    on a miss, the user's live history (oldest first)."""

    generation: str
    body: bytes | None
    recent: list[str] = field(default_factory=list)

    @property
    def hit(self) -> bool:
        return self.body is not None


class RecommendationCache:
    """The cache over ``client`` (a ``redis.asyncio`` client returning bytes); ``ttl_s == 0``
    disables storing and reading entries (lookups still return generation and history)."""

    def __init__(self, client: aioredis.Redis, namespace: str, ttl_s: int) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s}")
        self.client = client
        self.namespace = namespace
        self.ttl_s = ttl_s
        self._lookup = client.register_script(_LOOKUP)

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    def gen_key(self, user_id: str) -> str:
        return f"{self.namespace}:gen:{user_id}"

    def _prefix(self, user_id: str) -> str:
        # Braces cannot occur in a user id (serving.schemas.USER_ID_PATTERN): keys are unambiguous.
        return f"{self.namespace}:rec:{{{user_id}}}:"

    def entry_key(self, user_id: str, generation: str, fp: str) -> str:
        return f"{self._prefix(user_id)}{generation}:{fp}"

    async def lookup(self, user_id: str, fp: str, recent_key: str) -> Lookup:
        """One round trip: generation, entry and (on a miss) the list at ``recent_key``."""
        reply = await self._lookup(
            keys=[self.gen_key(user_id), recent_key], args=[self._prefix(user_id), "1" if self.enabled else "0", fp]
        )
        generation = _text(reply[0])
        if len(reply) > 1 and reply[1] is not None:
            return Lookup(generation, bytes(reply[1]))
        return Lookup(generation, None, [_text(item) for item in reply[2:]])

    async def store(self, user_id: str, generation: str, fp: str, body: bytes) -> None:
        if self.enabled:
            await self.client.set(self.entry_key(user_id, generation, fp), body, ex=self.ttl_s)

    def queue_invalidate(self, pipe: Any, user_id: str) -> None:
        """Add the generation bump of ``user_id`` to a pipeline/transaction."""
        key = self.gen_key(user_id)
        pipe.incr(key)
        pipe.expire(key, 2 * self.ttl_s + 60)

    async def flush(self) -> int:
        """Delete every cached list (all users, all versions); return how many were deleted."""
        deleted = 0
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=f"{self.namespace}:rec:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self.client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await self.client.unlink(*batch)
        return deleted


class HotKeys:
    """The (at most) ``capacity`` keys hit most recently, each with the monotonic time of its
    last hit; ``capacity == 0`` records nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._last: dict[Hashable, float] = {}

    def touch(self, key: Hashable) -> None:
        """Record a hit of ``key`` now (dropping the least recently hit key when full)."""
        if not self.capacity:
            return
        last = self._last
        last.pop(key, None)
        last[key] = time.monotonic()
        if len(last) > self.capacity:
            del last[next(iter(last))]

    def recent(self, window_s: float) -> list[Any]:
        """The keys hit within the last ``window_s`` seconds, most recent first."""
        since = time.monotonic() - window_s
        out = []
        for key, at in reversed(list(self._last.items())):
            if at < since:
                break
            out.append(key)
        return out

    def __len__(self) -> int:
        return len(self._last)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
