"""What stands between a hostile client and the routes: the body limit, the events token and
rate limit, and a 422 handler that never echoes more than a short excerpt of the input.

:func:`serving.app.create_app` installs them (:func:`install`):

- :class:`BodyLimit` (every route): a body larger than ``serving.max_body_bytes`` gets 413
  before it is parsed: at once when ``Content-Length`` says so, else as soon as the
  streamed (chunked) bytes exceed it;
- :class:`EventsGuard` (``POST /v1/events`` only, so the recommendation path pays nothing):
  401 with ``WWW-Authenticate: Bearer`` unless the request carries one of the
  ``serving.events_token`` tokens (when configured), then 429 with ``Retry-After`` when the
  client's token bucket (:class:`serving.events.RateLimiter`; client = its token when tokens
  are configured, else its IP) is empty. Both run before the body is read;
- :func:`validation_error`: the ``RequestValidationError`` handler (422) listing at most
  :data:`MAX_ERRORS` errors, each ``input`` a truncated repr (NaN and Infinity included,
  which FastAPI's own handler cannot encode).
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import reprlib
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import ServingSettings
from serving.events import RateLimiter

log = logging.getLogger(__name__)

EVENTS_PATH = "/v1/events"
MAX_ERRORS = 10
"""Validation errors listed in a 422 body; the rest are counted in ``more_errors``."""
EXCERPT_CHARS = 100
"""Longest excerpt of the input (or of a message) a 422 body carries."""

_repr = reprlib.Repr()  # bounded: a 100k-element or 10k-deep input costs a few elements
_repr.maxlevel, _repr.maxdict, _repr.maxlist, _repr.maxtuple, _repr.maxset = 3, 5, 5, 5, 5
_repr.maxstring, _repr.maxlong, _repr.maxother = 60, 40, 60


def events_tokens(settings: ServingSettings) -> tuple[str, ...]:
    """The accepted event-producer tokens: ``serving.events_token`` split at commas."""
    return tuple(t.strip() for t in (settings.events_token or "").split(",") if t.strip())


def events_auth_required(settings: ServingSettings) -> bool:
    """True when ``POST /v1/events`` needs a bearer token (one is configured). Without one the
    events route is open, which is only safe on a loopback address."""
    return bool(events_tokens(settings))


def bearer_token(scope: Scope) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header, else None."""
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return (credentials.strip() or None) if scheme.lower() == "bearer" else None
    return None


def token_matches(given: str | None, accepted: tuple[str, ...]) -> bool:
    """Constant-time comparison of ``given`` with every accepted token."""
    if given is None:
        return False
    matches = [hmac.compare_digest(given.encode(), token.encode()) for token in accepted]
    return any(matches)


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """413 for request bodies over ``max_bytes``, before anything parses them (module docstring)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self) -> str:
        return f"request body larger than {self.max_bytes} bytes (serving.max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "invalid Content-Length"})
                    return
                if declared > self.max_bytes:
                    await _send_json(send, 413, {"detail": self._detail()})
                    return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # FastAPI passes an HTTPException from here on as it is
                    raise HTTPException(status_code=413, detail=self._detail())
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except HTTPException as exc:  # raised outside a route's error handling
            if exc.status_code != 413 or started:
                raise
            await _send_json(send, 413, {"detail": self._detail()})


class EventsGuard:
    """Token check and rate limit of ``POST /v1/events`` (module docstring). The limiter is
    made on first use over the event store's Redis client (it exists once the lifespan ran);
    Redis trouble lets the request through (the route then answers 503 itself)."""

    def __init__(self, app: ASGIApp, settings: ServingSettings) -> None:
        self.app = app
        self.settings = settings
        self.tokens = events_tokens(settings)
        self.limiter: RateLimiter | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != EVENTS_PATH:
            await self.app(scope, receive, send)
            return
        token = bearer_token(scope)
        if self.tokens and not token_matches(token, self.tokens):
            detail = "missing events token" if token is None else "wrong events token"
            await _send_json(send, 401, {"detail": f"{detail} (serving.events_token)"}, {"WWW-Authenticate": "Bearer"})
            return
        wait = await self._take(scope, token if self.tokens else None)
        if wait > 0:
            await _send_json(
                send,
                429,
                {
                    "detail": f"rate limit: {self.settings.events_rate_per_s:g} events/s per client, burst "
                    f"{self.settings.events_burst}"
                },
                {"Retry-After": str(max(1, math.ceil(wait)))},
            )
            return
        await self.app(scope, receive, send)

    async def _take(self, scope: Scope, token: str | None) -> float:
        if self.limiter is None:
            events = getattr(scope["app"].state, "events", None)
            if events is None:
                return 0.0
            cfg = self.settings
            self.limiter = RateLimiter(events.client, cfg.namespace, cfg.events_rate_per_s, cfg.events_burst)
        if not self.limiter.enabled:
            return 0.0
        client = scope.get("client")
        key = f"token:{token}" if token is not None else f"ip:{client[0] if client else 'unknown'}"
        try:
            return await self.limiter.take(key)
        except RedisError as exc:
            log.warning("rate limiter unavailable, letting the event through: %s", exc)
            return 0.0


def excerpt(value: Any) -> Any:
    """``value`` as a JSON-safe excerpt: finite numbers, booleans and None as they are,
    strings cut to :data:`EXCERPT_CHARS`, anything else (NaN, containers, bytes) as a
    truncated repr."""
    if value is None or isinstance(value, bool | int) and abs(value) < 2**53:
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    text = value if isinstance(value, str) else _repr.repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _short_error(error: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": str(error.get("type", "")),
        "loc": [excerpt(part) for part in error.get("loc", ())][:8],
        "msg": excerpt(str(error.get("msg", ""))),
    }
    if "input" in error:
        out["input"] = excerpt(error["input"])
    if error.get("ctx"):
        out["ctx"] = {
            str(k): excerpt(v if isinstance(v, int | float | str) else str(v)) for k, v in error["ctx"].items()
        }
    return out


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 with at most :data:`MAX_ERRORS` short errors (module docstring)."""
    errors = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
    body: dict[str, Any] = {"detail": [_short_error(e) for e in errors[:MAX_ERRORS]]}
    if len(errors) > MAX_ERRORS:
        body["more_errors"] = len(errors) - MAX_ERRORS
    return JSONResponse(status_code=422, content=body)


def install(app: FastAPI, settings: ServingSettings) -> None:
    """Add the guards of this module to ``app`` (call before the outermost middleware)."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_middleware(EventsGuard, settings=settings)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
