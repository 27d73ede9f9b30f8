"""The serving app's Redis client: ``redis.asyncio`` with connect, read and write timeouts,
where the write timeout costs a timer rather than a task per command.

redis-py bounds each command's write with ``asyncio.wait_for``, which on Python 3.11 wraps
the write in a new task: one more task and event-loop step per command, about a third of the
CPU of a cache lookup. :class:`TimerConnection` bounds the write with ``asyncio.timeout``
instead (reads already are), with the same outcome when it expires: the connection is
dropped and :class:`redis.exceptions.TimeoutError` raised.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError


class TimerConnection(Connection):
    """A TCP connection whose writes are bounded by ``asyncio.timeout(socket_timeout)``."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        limit = self.socket_timeout
        if not limit:
            await super().send_packed_command(command, check_health)
            return
        self.socket_timeout = None  # the parent then writes without asyncio.wait_for
        try:
            async with asyncio.timeout(limit):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = limit


def connect(url: str, connect_timeout_s: float, timeout_s: float) -> aioredis.Redis:
    """A client of ``url`` returning bytes; ``redis://`` connections are
    :class:`TimerConnection` (``rediss://`` and ``unix://`` keep redis-py's own)."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        connection_class=TimerConnection,
    )
