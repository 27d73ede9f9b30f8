"""The pieces of the serving hot path that need no server: the query parser behind the lean
handler, the recently hit cache keys, the coalescing HTTP transport, the heap freeze at a
model swap and the Redis client's write timeout."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest
from redis.exceptions import RedisError

from serving.api.recommendations import QueryParser, recommendation_request
from serving.api.state import _freeze_heap
from serving.cache import HotKeys, params_digest
from serving.http1 import CoalescingTransport
from serving.redis_client import TimerConnection, connect
from serving.schemas import RecommendationQuery


def test_query_parser_validates_like_the_route_and_remembers() -> None:
    parser = QueryParser(default_k=10, max_entries=3)
    parsed = parser.parse(b"k=4&diversity=0.5&categories=Drama,%20Comedy,Drama&explain=true")
    assert parsed is not None
    expected = recommendation_request(
        "", RecommendationQuery(k=4, diversity=0.5, categories="Drama, Comedy,Drama", explain=True), 10
    )
    assert parsed.request == expected and parsed.request.categories == ("Drama", "Comedy")
    assert parsed.digest == params_digest(expected.cache_params())
    assert parsed.for_user("u7").user_id == "u7" and parsed.for_user("u7").k == 4
    # The same parameters in another order and spelling: another string, the same digest.
    assert parser.parse(b"explain=1&categories=Comedy,Drama&diversity=.5&k=4").digest == parsed.digest  # type: ignore[union-attr]
    assert parser.parse(b"").request.k == 10  # type: ignore[union-attr]
    assert parser.parse(b"k=4&k=5") is None  # repeated: the route decides
    assert parser.parse(b"k=4&utm_source=mail") is None  # unknown: the route's 422
    assert parser.parse(b"k=400") is None and parser.parse(b"diversity=nan") is None
    assert len(parser._memo) <= 3  # forgotten all at once when full
    parser._memo.clear()
    long = b"k=4&exclude_items=" + b",".join(b"item%d" % i for i in range(200))
    assert parser.parse(long) is not None and parser._memo == {}  # parsed, not remembered


def test_hot_keys_keep_the_most_recent_within_capacity_and_window(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("serving.cache.time.monotonic", lambda: now[0])
    hot = HotKeys(capacity=3)
    for key in ("a", "b", "c"):
        hot.touch(key)
        now[0] += 1
    hot.touch("a")  # hit again: now the most recent
    now[0] += 1
    hot.touch("d")  # over capacity: the least recently hit ("b") goes
    assert hot.recent(window_s=100) == ["d", "a", "c"] and len(hot) == 3
    assert hot.recent(window_s=1.5) == ["d", "a"]
    off = HotKeys(capacity=0)
    off.touch("a")
    assert off.recent(60) == [] and len(off) == 0


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


def test_coalescing_transport_sends_headers_and_body_as_one_write() -> None:
    async def scenario() -> _Transport:
        inner = _Transport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        transport.write(b"")
        assert inner.writes == []  # the headers wait for the body
        transport.write(b"{}")
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]  # then both go at once
        await asyncio.sleep(0)
        assert len(inner.writes) == 1
        transport.write(b"alone")
        await asyncio.sleep(0)  # no second write in this step: it goes when the step ends
        assert inner.writes[-1] == b"alone"
        transport.write(b"last")
        transport.close()  # what is held goes out before the close
        assert inner.writes[-1] == b"last" and inner.closed
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1)  # everything else: the wrapped one's
        return inner

    assert len(asyncio.run(scenario()).writes) == 3

    async def aborted() -> _Transport:
        inner = _Transport()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"dropped")
        transport.abort()
        await asyncio.sleep(0)
        return inner

    inner = asyncio.run(aborted())
    assert inner.aborted and inner.writes == []


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_freezing_the_heap_collects_young_garbage_and_keeps_frozen_objects_frozen() -> None:
    gc.freeze()
    frozen = gc.get_freeze_count()
    garbage = weakref.ref(_Node())  # unreachable at once, but alive until a collection
    alive = _Node()  # a live object not frozen yet: frozen by the call
    try:
        assert garbage() is not None
        _freeze_heap()
        assert garbage() is None  # collected, not frozen
        assert gc.get_freeze_count() > frozen  # earlier frozen objects stay frozen, new ones joined them
        assert alive.me is alive
    finally:
        gc.unfreeze()


def test_redis_client_times_out_on_a_server_that_never_answers() -> None:
    """A Redis "server" that accepts and then neither reads nor answers: a command fails with
    redis' TimeoutError (a RedisError, which the routes handle) within the timeout."""

    async def scenario() -> float:
        silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        client = connect(f"redis://127.0.0.1:{port}", 1.0, 0.3)
        assert client.connection_pool.connection_class is TimerConnection
        start = asyncio.get_running_loop().time()
        try:
            with pytest.raises(RedisError):
                await client.set("k", b"x" * (8 << 20))  # more than the socket buffers take
            return asyncio.get_running_loop().time() - start
        finally:
            await client.aclose()
            silent.close()

    assert asyncio.run(scenario()) < 2.0
