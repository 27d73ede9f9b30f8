"""A 202 means durable (issue 14): events accepted by ``hyperrec serve`` survive a
``kill -9`` of its embedded Valkey, which serve restarts by itself on the same port and
data directory (append-only file under ``<home>/serving/valkey``).

The figures are printed: ``pytest -s tests/reliability/test_durable_events.py``.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
import redis
from serve_harness import Serve, alive, post_event, serve_config, wait_for

from core.events import stream_key
from core.net import free_port
from core.settings import load_settings

pytestmark = [pytest.mark.slow]
EVENTS = 300


def test_events_accepted_before_a_valkey_kill_9_are_there_after_it_recovers_by_itself(tmp_path):
    """300 events get 202; the embedded valkey-server is killed with SIGKILL; within 30 s
    serve has restarted it (WARNING in its log) and events get 202 again; all 300 event ids
    are still in the stream, and the restarted server is append-only with the configured
    memory limit and eviction policy."""
    config = serve_config(tmp_path)
    serve = Serve(config, free_port())
    try:
        serve.wait_ready()
        with httpx.Client(base_url=serve.url, timeout=10) as client:
            accepted = []
            for i in range(EVENTS):
                answer = post_event(client, f"u{i % 5 + 1}", f"i{i % 6 + 1}")
                assert answer.status_code == 202, answer.text
                accepted.append(answer.json()["event_id"])
            valkey, url = serve.valkey()
            killed = time.monotonic()
            valkey.kill()
            wait_for(lambda: not alive([valkey]), 5, "the killed valkey-server to go")
            recovered = wait_for(
                lambda: post_event(client, "u1", "i2").status_code == 202, 30, "events accepted again", poll=0.1
            )
        back = time.monotonic() - killed
        print(f"\nvalkey kill -9: events accepted again after {back:.2f} s ({recovered:.2f} s of polling)")
        restarted, same_url = serve.valkey()
        assert restarted.pid != valkey.pid and same_url == url
        assert re.search(r"WARNING .*valkey-server \(pid \d+, port \d+\) exited", serve.text())
        assert re.search(r"WARNING .*valkey-server restarted", serve.text())
        client_r = redis.Redis.from_url(url, decode_responses=True)
        try:
            key = stream_key(load_settings().serving.namespace)
            kept = {fields.get("event_id") for _id, fields in client_r.xrange(key)}
            # The restarted server runs as configured: append-only, bounded, evicting only keys with a TTL.
            online = load_settings().online_store
            config_of = {**client_r.config_get("append*"), **client_r.config_get("maxmemory*")}
            assert (config_of["appendonly"], config_of["appendfsync"]) == ("yes", online.appendfsync)
            assert int(config_of["maxmemory"]) == online.maxmemory_mb * 1024 * 1024
            assert config_of["maxmemory-policy"] == online.maxmemory_policy
        finally:
            client_r.close()
        assert len(set(accepted) & kept) == EVENTS, f"{len(set(accepted) & kept)}/{EVENTS} kept"
        print(f"events kept: {len(set(accepted) & kept)}/{EVENTS}")
    finally:
        serve.stop()
