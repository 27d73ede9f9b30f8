"""uvicorn's HTTP/1.1 protocol (httptools) with the writes of one event-loop step sent as one.

uvicorn writes a response's status line and headers when the app sends
``http.response.start`` and the body when it sends ``http.response.body``: two ``send``
system calls (and two TCP segments) per response. :class:`CoalescingHttpToolsProtocol` hands
uvicorn a transport (:class:`CoalescingTransport`) that holds the headers back until the
body follows (or the event loop's current step ends) and passes both on as one write, so a
response the app sends in one go costs one system call. Nothing else changes: the bytes on the wire, their order,
flow control and closing. ``hyperrec serve`` runs uvicorn with it (``http=``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """Wraps ``transport``: :meth:`write` holds a first write back; a second one sends both
    as one write at once, else a callback scheduled with ``call_soon`` sends the first when
    the step ends. :meth:`close` sends what is held first; :meth:`abort` drops it. Every
    other attribute is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._scheduled = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._pending:  # a second write in this step (a response's body): both go now
            self._pending.append(bytes(data))
            self._flush()
            return
        self._pending.append(bytes(data))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush_later)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _flush_later(self) -> None:
        self._scheduled = False
        self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """:class:`uvicorn.protocols.http.httptools_impl.HttpToolsProtocol` over a
    :class:`CoalescingTransport` (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)  # type: ignore[arg-type]
