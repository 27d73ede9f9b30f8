"""Event-to-profile delay of the event stream consumer: from ``POST /v1/events`` accepted to
the user's online profile in Redis reflecting the event.

Run: .venv/bin/python bench/consumer.py [--rate 100] [--duration 30] [--users 2000]
     [--items 500] [--seed-events 20] [--out DIR]

1. An embedded Valkey server (:func:`feature_store.online.open_redis`); a popularity bundle
   over ``--items`` items published to a local object store; profile inputs as
   ``build_features`` stores them (items with 1-3 of 18 categories, ``--users`` users with
   age, gender and region) and ``--seed-events`` offline events per user in the histories.
2. ``hyperrec serve`` and ``hyperrec consume`` as processes (config defaults: one uvicorn
   worker; the consumer's landing batches of 5,000 events or 10 s).
3. Driver: one keep-alive HTTP connection sends event ``i`` at ``t0 + i/rate`` (a random
   user's ``view``/``click``/``like``); the delay of an event counts from its accepted
   response. A poller reads the ``events_total`` feature of every user with an outstanding
   event every 5 ms (one pipelined round trip): the event is reflected when that count
   reaches the user's seeded plus live events so far.

Prints a Markdown table and the command line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import redis  # noqa: E402
import yaml  # noqa: E402

from core.net import free_port  # noqa: E402

GENRES = [f"genre{g:02d}" for g in range(18)]
POLL_S = 0.005


def prepare(out: Path, url: str, namespace: str, users: int, items: int, seed_events: int) -> Path:
    """Bundle, profile inputs and seeded histories; returns the config file."""
    from core.object_store import ObjectStore
    from feature_store.online import OnlineStore
    from serving.store import publish
    from training.bundle import write_bundle
    from training.models import InteractionMatrix, fit_popularity, popularity

    rng = np.random.default_rng(0)
    item_ids = np.array([f"i{i}" for i in range(items)], dtype=object)
    categories = [sorted(rng.choice(GENRES, size=int(rng.integers(1, 4)), replace=False)) for _ in range(items)]
    user_ids = np.array([f"u{u}" for u in range(users)], dtype=object)
    n = users * seed_events
    seeded = pd.DataFrame(
        {
            "user_id": np.repeat(user_ids, seed_events),
            "item_id": rng.choice(item_ids, n),
            "event_type": rng.choice(["view", "click", "like", "complete"], n),
            "rating": np.nan,
            "dwell_time_s": rng.exponential(30, n),
            "scroll_depth": rng.random(n),
            "device": rng.choice(["mobile", "desktop", "tablet", "tv"], n),
            "session_id": "s",
            "timestamp": pd.Timestamp.now(tz="UTC") - pd.to_timedelta(rng.integers(60, 60 * 86400, n), unit="s"),
            "confidence": rng.uniform(0.2, 0.95, n),
        }
    )
    matrix = InteractionMatrix.from_frame(seeded, item_ids=item_ids)
    x = matrix.matrix
    bundle = write_bundle(
        out / "bundle",
        model=fit_popularity(x),
        item_ids=item_ids,
        titles=[f"Title {i}" for i in item_ids],
        categories=categories,
        history={u: x[r].indices for u, r in matrix.user_index.items()},
        popularity=popularity(x),
        metadata={"version": "v1", "k": 10, "metrics": {}},
    )
    publish(bundle, ObjectStore(str(out / "store")), "v1")
    store = OnlineStore(url, namespace=namespace)
    try:
        store.write_profile_inputs(
            pd.DataFrame({"item_id": item_ids, "categories": categories}),
            pd.DataFrame(
                {
                    "user_id": user_ids,
                    "age": rng.integers(16, 80, users).astype(float),
                    "gender": rng.choice(["F", "M"], users),
                    "occupation": "x",
                    "region": rng.choice(["north", "south", "east", "west"], users),
                }
            ),
            version="bench",
        )
        store.add_history(seeded)
    finally:
        store.close()
    config = out / "bench.yaml"
    overlay = {
        "home": str(out / "home"),
        "online_store": {"url": url},
        "object_store": {"uri": str(out / "store")},
        "serving": {"namespace": namespace, "port": free_port(), "reload_interval_s": 0},
        "landing": {"uri": str(out / "landing")},
    }
    config.write_text(yaml.safe_dump(overlay))
    return config


def wait_ready(port: int, settings, timeout: float = 120.0) -> None:
    from feature_store.consumer import consumer_healthy

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            ready = conn.getresponse().status == 200
            conn.close()
        except OSError:
            ready = False
        if ready and consumer_healthy(settings):
            return
        time.sleep(0.2)
    raise RuntimeError("serve or consume did not become ready")


def drive(
    port: int, url: str, namespace: str, counts: dict[str, int], items: int, rate: float, n: int, seed: int
) -> dict:
    """Send ``n`` events at ``rate``/s to random users of ``counts`` (user → events in their
    history so far, updated) and measure each one's delay until its profile shows it."""
    rng = np.random.default_rng(seed)
    users = sorted(counts)
    targets = rng.integers(0, len(users), n)
    outstanding: dict[int, tuple[str, int, float]] = {}  # event → (user, events_total needed, accepted at)
    delays: dict[int, float] = {}
    lock = threading.Lock()
    done = threading.Event()
    client = redis.Redis.from_url(url, decode_responses=True)

    def poll() -> None:
        while not (done.is_set() and not outstanding):
            with lock:
                pending = list(outstanding.items())
            if pending:
                pipe = client.pipeline(transaction=False)
                for _i, (user, _need, _at) in pending:
                    pipe.hget(f"{namespace}:user:{user}", "events_total")
                values = pipe.execute()
                now = time.perf_counter()
                with lock:
                    for (i, (_user, need, at)), value in zip(pending, values):
                        if value is not None and float(value) >= need:
                            delays[i] = now - at
                            outstanding.pop(i, None)
            time.sleep(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    late = 0.0
    t0 = time.perf_counter()
    for i in range(n):
        wait = t0 + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        else:
            late = max(late, -wait)
        user = users[targets[i]]
        kind = ("view", "click", "like")[int(rng.integers(0, 3))]
        body = {"user_id": user, "item_id": f"i{int(rng.integers(0, items))}", "event_type": kind}
        conn.request("POST", "/v1/events", body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        accepted = time.perf_counter()
        if response.status != 202:
            raise RuntimeError(f"POST /v1/events: {response.status}")
        counts[user] += 1
        with lock:
            outstanding[i] = (user, counts[user], accepted)
    sent_s = time.perf_counter() - t0
    done.set()
    poller.join(timeout=30)
    client.close()
    conn.close()
    x = np.array([delays[i] for i in sorted(delays)]) * 1000
    return {
        "events": n,
        "reflected": len(x),
        "rate": n / sent_s,
        "p50_ms": float(np.percentile(x, 50)),
        "p90_ms": float(np.percentile(x, 90)),
        "p99_ms": float(np.percentile(x, 99)),
        "max_ms": float(x.max()),
        "max_send_lag_ms": late * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0, help="events per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of steady load")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--seed-events", type=int, default=20, help="offline events per user in the histories")
    parser.add_argument("--out", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()

    from core.settings import load_settings
    from feature_store.online import open_redis

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-consumer-"))
    out.mkdir(parents=True, exist_ok=True)
    namespace = f"bench{int(time.time())}"
    hyperrec = str(Path(sys.executable).parent / "hyperrec")
    procs: list[subprocess.Popen] = []
    with open_redis(None) as server:
        config = prepare(out, server.url, namespace, args.users, args.items, args.seed_events)
        settings = load_settings(config)
        try:
            for command in ("serve", "consume"):
                with (out / f"{command}.log").open("ab") as log:
                    procs.append(subprocess.Popen([hyperrec, command, "--config", str(config)], stdout=log, stderr=log))
            wait_ready(settings.serving.port, settings)
            counts = {f"u{u}": args.seed_events for u in range(args.users)}
            port, url = settings.serving.port, server.url
            drive(port, url, namespace, counts, args.items, args.rate, 50, seed=1)  # warm-up
            result = drive(port, url, namespace, counts, args.items, args.rate, int(args.rate * args.duration), seed=2)
        finally:
            for proc in reversed(procs):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if args.out is None:
                shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(f"\nmachine: {platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}")
    print("| events | rate (/s) | reflected | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['events']} | {result['rate']:.0f} | {result['reflected']} | {result['p50_ms']:.0f} | "
        f"{result['p90_ms']:.0f} | {result['p99_ms']:.0f} | {result['max_ms']:.0f} |"
    )
    print("\ncommand: .venv/bin/python bench/consumer.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
