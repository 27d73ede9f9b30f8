# ruff: noqa: E501  (one request per line reads best as a table)
"""The hostile HTTP corpus of ``test_serving_hostile.py``: requests a hostile or careless
client sends to the serving API, each with the statuses it may get.

Every case is ``(name, method, path, request kwargs for httpx, allowed statuses)``. The app it
targets has ``serving.events_token`` = :data:`TOKEN` (plus a second token), ``admin_token`` =
:data:`ADMIN`, the default body limit and the tiny bundle of ``fixtures_serving``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

TOKEN = "events-token-a"
SECOND_TOKEN = "events-token-b"
ADMIN = "admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json", **AUTH}
GOOD = {"user_id": "u1", "item_id": "i4", "event_type": "click"}

Case = tuple[str, str, str, dict[str, Any], set[int]]


def _event(**changes: Any) -> dict[str, Any]:
    return {"headers": AUTH, "json": {**GOOD, **changes}}


def _raw(body: bytes | str, content_type: str = "application/json") -> dict[str, Any]:
    return {"headers": {**AUTH, "content-type": content_type}, "content": body}


def _nested(depth: int) -> bytes:
    return ("[" * depth + "]" * depth).encode()


def cases() -> list[Case]:
    """The corpus (more than 60 requests)."""
    now = datetime.now(UTC)
    good = json.dumps(GOOD)
    out: list[Case] = [
        # --- authentication
        ("event without token", "POST", "/v1/events", {"json": GOOD}, {401}),
        ("event, wrong token", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": "Bearer nope"}}, {401}),
        ("event, empty bearer", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": "Bearer "}}, {401}),
        ("event, basic auth", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": "Basic dTpw"}}, {401}),
        ("event, token prefix", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}}, {401}),
        ("event, 10k-char token", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": "Bearer " + "x" * 10_000}}, {401}),
        ("event, no token, invalid json", "POST", "/v1/events", {"content": b"{nope", "headers": {"content-type": "application/json"}}, {401}),
        ("event, no token, 20 MB", "POST", "/v1/events", {"content": b"x" * 20_000_000}, {401, 413}),
        ("event, good", "POST", "/v1/events", _event(), {202}),
        ("event, second token", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": f"Bearer {SECOND_TOKEN}"}}, {202}),
        ("event, lower-case scheme", "POST", "/v1/events", {"json": GOOD, "headers": {"Authorization": f"bearer {TOKEN}"}}, {202}),
        ("admin reload without token", "POST", "/admin/reload", {}, {401}),
        ("admin reload, events token", "POST", "/admin/reload", {"headers": AUTH}, {401}),
        ("admin flush, wrong token", "POST", "/admin/cache/flush", {"headers": {"Authorization": "Bearer x"}}, {401}),
        ("admin flush, good token", "POST", "/admin/cache/flush", {"headers": {"Authorization": f"Bearer {ADMIN}"}}, {200}),
        # --- sizes
        ("20 MB body", "POST", "/v1/events", _raw(b" " * 20_000_000), {413}),
        ("20 MB chunked body", "POST", "/v1/events", {"headers": JSON, "content": iter([b" " * 1_000_000] * 20)}, {413}),
        ("1 MB + 1 body", "POST", "/v1/events", _raw(b" " * 1_000_001), {413}),
        ("100k-event array", "POST", "/v1/events", _raw(("[" + ",".join([good] * 100_000) + "]").encode()), {413}),
        ("100k-number array", "POST", "/v1/events", _raw(("[" + ",".join(["1"] * 100_000) + "]").encode()), {422}),
        ("100k-key object", "POST", "/v1/events", _raw(json.dumps({f"k{i}": i for i in range(50_000)})), {413, 422}),
        ("10k-deep arrays", "POST", "/v1/events", _raw(_nested(10_000)), {400, 422}),
        ("10k-deep objects", "POST", "/v1/events", _raw(('{"a":' * 10_000 + "1" + "}" * 10_000).encode()), {400, 422}),
        ("deep item_id", "POST", "/v1/events", _raw(good[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}"), {400, 422}),
        ("bad Content-Length", "POST", "/v1/events", {"headers": {**JSON, "content-length": "abc"}, "content": b"{}"}, {400}),
        # --- NaN, Infinity
        ("NaN dwell", "POST", "/v1/events", _raw(good[:-1] + ', "dwell_time_s": NaN}'), {422}),
        ("Infinity dwell", "POST", "/v1/events", _raw(good[:-1] + ', "dwell_time_s": Infinity}'), {422}),
        ("-Infinity scroll", "POST", "/v1/events", _raw(good[:-1] + ', "scroll_depth": -Infinity}'), {422}),
        ("NaN rating", "POST", "/v1/events", _raw('{"user_id":"u1","item_id":"i4","event_type":"rate","rating":NaN}'), {422}),
        ("Infinity rating", "POST", "/v1/events", _raw('{"user_id":"u1","item_id":"i4","event_type":"rate","rating":Infinity}'), {422}),
        ("NaN user id", "POST", "/v1/events", _raw('{"user_id":NaN,"item_id":"i4","event_type":"view"}'), {422}),
        ("NaN timestamp", "POST", "/v1/events", _raw(good[:-1] + ', "timestamp": NaN}'), {422}),
        ("NaN body", "POST", "/v1/events", _raw("NaN"), {422}),
        ("1e999 dwell", "POST", "/v1/events", _raw(good[:-1] + ', "dwell_time_s": 1e999}'), {422}),
        ("NaN diversity", "GET", "/v1/recommendations/u1?diversity=NaN", {}, {422}),
        ("inf diversity", "GET", "/v1/recommendations/u1?diversity=inf", {}, {422}),
        # --- content types and encodings
        ("text/plain body", "POST", "/v1/events", _raw(good, "text/plain"), {415, 422}),
        ("form body", "POST", "/v1/events", {"headers": AUTH, "data": GOOD}, {415, 422}),
        ("xml body", "POST", "/v1/events", _raw("<event/>", "application/xml"), {415, 422}),
        ("no content type", "POST", "/v1/events", {"headers": AUTH, "content": good.encode()}, {202, 415, 422}),
        ("bad UTF-8", "POST", "/v1/events", _raw(b'{"user_id":"\xff\xfe","item_id":"i4","event_type":"view"}'), {400, 422}),
        ("UTF-16 body", "POST", "/v1/events", _raw(good.encode("utf-16")), {202, 400, 422}),
        ("invalid JSON", "POST", "/v1/events", _raw("{nope"), {422}),
        ("truncated JSON", "POST", "/v1/events", _raw(good[:-3]), {422}),
        ("empty body", "POST", "/v1/events", _raw(b""), {422}),
        ("JSON null", "POST", "/v1/events", _raw("null"), {422}),
        ("JSON string", "POST", "/v1/events", _raw('"event"'), {422}),
        # --- fields
        ("unknown field", "POST", "/v1/events", _event(admin=True), {422}),
        ("many unknown fields", "POST", "/v1/events", _raw(json.dumps({**GOOD, **{f"x{i}": "y" * 500 for i in range(500)}})), {422}),
        ("unknown item", "POST", "/v1/events", _event(item_id="nope" * 60), {422}),
        ("10k-char item id", "POST", "/v1/events", _event(item_id="i" * 10_000), {422}),
        ("10k-char user id", "POST", "/v1/events", _event(user_id="u" * 10_000), {422}),
        ("traversal user id", "POST", "/v1/events", _event(user_id="../../etc/passwd"), {422}),
        ("10k-char session", "POST", "/v1/events", _event(session_id="s" * 10_000), {422}),
        ("unknown event type", "POST", "/v1/events", _event(event_type="purchase"), {422}),
        ("rating on view", "POST", "/v1/events", _event(rating=3), {422}),
        ("negative dwell", "POST", "/v1/events", _event(dwell_time_s=-1), {422}),
        ("year 1", "POST", "/v1/events", _event(timestamp="0001-01-01T00:00:00Z"), {422}),
        ("1994", "POST", "/v1/events", _event(timestamp="1994-12-31T23:59:59Z"), {422}),
        ("year 9999", "POST", "/v1/events", _event(timestamp="9999-12-31T23:59:59Z"), {422}),
        ("two days ahead", "POST", "/v1/events", _event(timestamp=(now + timedelta(days=2)).isoformat()), {422}),
        ("an hour ago", "POST", "/v1/events", _event(timestamp=(now - timedelta(hours=1)).isoformat()), {202}),
        ("1998, naive", "POST", "/v1/events", _event(timestamp="1998-03-01T10:00:00"), {202}),
        ("timestamp garbage", "POST", "/v1/events", _event(timestamp="yesterday"), {422}),
        ("huge event id", "POST", "/v1/events", _event(event_id="e" * 10_000), {422}),
        # --- recommendations
        ("10k-char user id", "GET", "/v1/recommendations/" + "u" * 10_000, {}, {422}),
        ("traversal user id", "GET", "/v1/recommendations/..%2F..%2Fetc%2Fpasswd", {}, {404, 422}),
        ("dot-dot user id", "GET", "/v1/recommendations/..", {}, {200, 404, 422}),
        ("encoded NUL", "GET", "/v1/recommendations/u1%00", {}, {422}),
        ("negative k", "GET", "/v1/recommendations/u1?k=-5", {}, {422}),
        ("huge k", "GET", "/v1/recommendations/u1?k=99999999999999999999999", {}, {422}),
        ("k zero", "GET", "/v1/recommendations/u1?k=0", {}, {422}),
        ("unknown param", "GET", "/v1/recommendations/u1?admin=1", {}, {422}),
        ("many unknown params", "GET", "/v1/recommendations/u1?" + "&".join(f"p{i}=x" for i in range(500)), {}, {422}),
        ("long exclude_items", "GET", "/v1/recommendations/u1?exclude_items=" + "x" * 4000, {}, {422}),
        ("many unknown categories", "GET", "/v1/recommendations/u1?categories=" + ",".join(f"c{i}" for i in range(800)), {}, {422}),
        ("bad bool", "GET", "/v1/recommendations/u1?explain=maybe", {}, {422}),
        ("good", "GET", "/v1/recommendations/u1?k=3", {}, {200}),
        ("POST to recommendations", "POST", "/v1/recommendations/u1", {"headers": AUTH, "json": {}}, {405}),
        ("GET events", "GET", "/v1/events", {}, {405}),
        ("unknown route", "GET", "/../../etc/passwd", {}, {404}),
    ]  # fmt: skip
    return out
