"""Processes of ``hyperrec serve`` die with it, however it stops, and a new one can take its
port at once (issue 14, "processes that die with their parent").

The figures (seconds to stop) are printed: ``pytest -s tests/reliability/test_processes.py``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

import httpx
import psutil
import pytest
from serve_harness import Serve, alive, post_event, serve_config, wait_for

from core.net import free_port

pytestmark = [pytest.mark.slow]


def test_sigterm_with_one_worker_stops_valkey_too_and_the_next_serve_finds_the_events(tmp_path):
    """``make demo``'s case: SIGTERM to a one-worker serve stops it and its Valkey within
    10 s (no valkey-server left with ppid 1); a new serve binds the same port at once and
    the events accepted before are still in the stream (its Valkey persists under <home>)."""
    config, port = serve_config(tmp_path), free_port()
    first = Serve(config, port)
    try:
        first.wait_ready()
        with httpx.Client(base_url=first.url, timeout=10) as client:
            ids = [post_event(client, f"u{i % 5 + 1}", f"i{i % 6 + 1}").json()["event_id"] for i in range(20)]
        children = first.descendants()
        assert [p.name() for p in children] == ["valkey-server"]
        started = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=10)
        wait_for(lambda: not alive(children), 10 - (time.monotonic() - started), "serve's children to stop")
        print(f"\nSIGTERM, 1 worker: everything stopped in {time.monotonic() - started:.2f} s")
        assert first.process.returncode == 128 + signal.SIGTERM  # a clean stop, Valkey closed in order
    finally:
        first.stop()
    second = Serve(config, port)  # the same port, right away
    try:
        second.wait_ready()
        _valkey, url = second.valkey()
        assert set(ids) <= _stream_event_ids(url)
    finally:
        second.stop()


def test_kill_9_of_the_parent_with_two_workers_leaves_nothing_and_the_port_is_free(tmp_path):
    """A killed worker is replaced and its death logged at WARNING; then ``kill -9`` of the
    serve parent: every process it started (workers, Valkey) is gone within 10 s, and a new
    serve binds the same port at once."""
    config, port = serve_config(tmp_path), free_port()
    first = Serve(config, port, workers=2)
    try:
        first.wait_ready()
        workers = lambda: [p for p in first.descendants() if p.name() != "valkey-server" and _is_worker(p)]  # noqa: E731
        wait_for(lambda: len(workers()) == 2, 60, "two workers")
        victim = workers()[0]
        victim.kill()
        death = rf"WARNING .*serving worker {victim.pid} died"
        wait_for(lambda: re.search(death, first.text()), 30, "the worker's death logged at WARNING")
        wait_for(lambda: len(workers()) == 2 and victim.pid not in [p.pid for p in workers()], 60, "a new worker")
        first.wait_ready()
        children = first.descendants()
        assert {"valkey-server"} < {p.name() for p in children} and len(children) >= 3
        started = time.monotonic()
        os.kill(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        wait_for(lambda: not alive(children), 10, f"{[p.pid for p in alive(children)]} to stop with their parent")
        print(f"\nkill -9 of the parent, 2 workers: everything stopped in {time.monotonic() - started:.2f} s")
    finally:
        first.stop()
    second = Serve(config, port)  # binds right away (one worker is enough to show it)
    try:
        second.wait_ready(path="/healthz")
        assert "address already in use" not in second.text().lower()
    finally:
        second.stop()


def test_serving_binds_loopback_only_without_an_events_token(caplog):
    """No ``serving.events_token``: POST /v1/events would be open, so serving refuses any
    address but loopback (and says so); with a token it binds where it is told."""
    from core.settings import load_settings
    from serving.app import bind_host

    open_events = load_settings()
    with caplog.at_level(logging.WARNING, logger="serving.app"):
        assert bind_host("0.0.0.0", open_events) == "127.0.0.1"
    assert "binds 127.0.0.1 only" in caplog.text
    assert bind_host("::1", open_events) == "::1" and bind_host("localhost", open_events) == "localhost"
    guarded = load_settings(serving={"events_token": "s3cret-token"})
    assert bind_host("0.0.0.0", guarded) == "0.0.0.0"


def _is_worker(proc: psutil.Process) -> bool:
    """A uvicorn worker (multiprocessing spawn child), not multiprocessing's resource tracker."""
    try:
        return "resource_tracker" not in " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return False


def _stream_event_ids(url: str) -> set[str]:
    import redis

    from core.events import stream_key
    from core.settings import load_settings

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        entries = client.xrange(stream_key(load_settings().serving.namespace))
        return {fields.get("event_id") for _id, fields in entries}
    finally:
        client.close()
