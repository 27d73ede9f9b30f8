"""Chaos bench of the serving tier: a steady load on ``hyperrec serve --workers 2`` while
faults are injected one at a time.

Run: .venv/bin/python bench/chaos.py [--rate 100] [--event-rate 20] [--settle 5] [--out DIR]

Bundle: the ml-100k hybrid of ``bench/serve_load.py`` (``--epochs``, built once into
``--out``). Server: ``python -m hyperrec.cli serve --workers 2`` on loopback in a session of
its own, embedded Valkey (append-only file under ``<home>``), an events token in its
environment. Load: one thread of recommendation requests (``--rate`` req/s over the bundle's
users) and one of events (``--event-rate`` events/s, each with its own ``event_id``, bearer
token), both for the whole bench. Faults, in turn, each followed by ``--settle`` seconds:

1. ``valkey kill -9``: the embedded cache server dies; serve's watchdog restarts it on its
   port and data. Recovered: an event is accepted again.
2. ``worker kill -9``: one uvicorn worker dies; uvicorn starts another. Recovered: two live
   workers again.
3. ``parent kill -9``: the serve process dies; its workers and Valkey die with it, and a new
   ``hyperrec serve`` on the same port and home starts at once. Recovered: ``/readyz`` 200.
4. ``poisoned bundle``: a version whose float arrays are all NaN is published; serving
   refuses it and the old version keeps answering. Recovered: immediately (nothing fails).
5. ``concurrent promotions``: four registered versions promoted by four threads at the same
   instant (MLflow over SQLite); the champion history must keep all four.

Per fault: requests and failed requests in its window (injection to the end of settling),
events accepted (202) vs kept (their ``event_id`` in the stream after recovery), and the
recovery seconds clients saw: from the injection to the last failed request or event (0
when none failed). Prints a Markdown table and the command line; results in ``<out>/chaos.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))
sys.path.insert(0, str(_ROOT / "bench"))

from serve_load import build_bundle, copy_version, wait_ready  # noqa: E402

from core.net import free_port  # noqa: E402
from core.processes import die_with_parent  # noqa: E402

TOKEN = "chaos-bench-events-token"


class Load:
    """Recommendation and event requests at fixed rates from two threads; ``seen`` holds
    ``(monotonic time, kind, status, event_id)`` per request (status: HTTP code or the
    transport error's type)."""

    def __init__(self, url: str, users: list[str], items: list[str], rate: float, event_rate: float) -> None:
        self.url, self.users, self.items = url, users, items
        self.seen: list[tuple[float, str, str, str | None]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(self._recommend, rate), daemon=True),
            threading.Thread(target=self._run, args=(self._event, event_rate), daemon=True),
        ]

    def _run(self, send: Callable[[httpx.Client, int], tuple[str, str, str | None]], rate: float) -> None:
        with httpx.Client(timeout=5) as client:
            start, n = time.monotonic(), 0
            while not self._stop.is_set():
                delay = start + n / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                try:
                    kind, status, event_id = send(client, n)
                except httpx.HTTPError as exc:
                    kind, status, event_id = ("event" if send == self._event else "recommend"), type(exc).__name__, None
                self.seen.append((time.monotonic(), kind, status, event_id))
                n += 1

    def _recommend(self, client: httpx.Client, n: int) -> tuple[str, str, str | None]:
        answer = client.get(f"{self.url}/v1/recommendations/{self.users[n % len(self.users)]}", params={"k": 10})
        return "recommend", str(answer.status_code), None

    def _event(self, client: httpx.Client, n: int) -> tuple[str, str, str | None]:
        event_id = f"chaos-{os.getpid()}-{n}"
        body = {
            "user_id": self.users[(7 * n) % len(self.users)],
            "item_id": self.items[(13 * n) % len(self.items)],
            "event_type": "click",
            "event_id": event_id,
        }
        answer = client.post(f"{self.url}/v1/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
        return "event", str(answer.status_code), event_id

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)

    def window(self, start: float, end: float) -> list[tuple[float, str, str, str | None]]:
        return [s for s in list(self.seen) if start <= s[0] < end]

    def accepted_events(self) -> set[str]:
        return {e for _, kind, status, e in list(self.seen) if kind == "event" and status == "202" and e}


class Server:
    """``hyperrec serve`` in a session of its own; restartable on the same port and home."""

    def __init__(self, config: Path, port: int, workers: int, log: Path) -> None:
        self.config, self.port, self.workers, self.log = config, port, workers, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        cmd = [sys.executable, "-m", "hyperrec.cli", "serve", "--port", str(self.port)]
        cmd += ["--workers", str(self.workers), "--config", str(self.config)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HYPERREC_SERVING__EVENTS_TOKEN=TOKEN)
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                cmd,
                cwd=_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                process_group=0,
                preexec_fn=die_with_parent(),  # the bench killed, even with -9: serve stops too
            )
        return wait_ready(self.url, self.proc)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def valkey(self) -> psutil.Process:
        return next(p for p in self.descendants() if "valkey-server" in p.name())

    def redis_url(self) -> str:
        """The URL of serve's embedded Valkey (the port it listens on)."""
        port = next(c.laddr.port for c in self.valkey().net_connections("tcp") if c.status == psutil.CONN_LISTEN)
        return f"redis://127.0.0.1:{port}/0"

    def workers_alive(self) -> list[psutil.Process]:
        """The live uvicorn workers (spawned children; not Valkey or the resource tracker)."""
        return [
            p
            for p in self.descendants()
            if "--multiprocessing-fork" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE
        ]

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` is truthy; raises TimeoutError after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(Exception):
            if predicate():
                return time.monotonic() - start
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def event_accepted(url: str) -> bool:
    body = {"user_id": "chaos-probe", "item_id": PROBE_ITEM[0], "event_type": "view"}
    answer = httpx.post(f"{url}/v1/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=2)
    return answer.status_code == 202


PROBE_ITEM: list[str] = []


def stream_event_ids(redis_url: str, namespace: str) -> set[str]:
    import redis

    from core.events import stream_key

    client = redis.Redis.from_url(redis_url, decode_responses=True)
    ids, last = set(), "-"
    while True:
        batch = client.xrange(stream_key(namespace), min=last, max="+", count=10_000)
        if last != "-":
            batch = batch[1:]
        if not batch:
            break
        ids.update(fields.get("event_id", "") for _, fields in batch)
        last = batch[-1][0]
    client.close()
    return ids


def poison(source: Path, dest: Path, version: str) -> Path:
    """``source`` as ``version`` with every float ``.npy`` array set to NaN."""
    copy_version(source, dest, version)
    for path in dest.rglob("*.npy"):
        array = np.load(path)
        if np.issubdtype(array.dtype, np.floating):
            np.save(path, np.full_like(array, np.nan))
    return dest


def concurrent_promotions(out: Path, bundle: Path) -> dict:
    """Register ``bundle`` four times in a fresh MLflow (SQLite) registry and promote the four
    versions from four threads at one instant; the champion history after it."""
    from core.settings import load_settings
    from core.tracking import configure
    from serving.publish import ServedPyfunc
    from training.registry import champion_history, log_and_register, promote_version

    root = out / "registry"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    settings = load_settings(
        home=str(root / "home"),
        mlflow={"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model": "chaos", "experiment": "chaos"},
    )
    versions = [
        log_and_register(
            settings,
            run_name=f"chaos-{n}",
            params={},
            metrics={},
            bundle_dir=bundle,
            artifact_dirs={},
            tags={},
            python_model=ServedPyfunc(settings.serving),
        ).version
        for n in range(4)
    ]
    barrier, results, errors = threading.Barrier(4), [], []

    def promote(version: int) -> None:
        barrier.wait()
        try:
            results.append(promote_version(settings, version, "chaos bench", user=f"user-{version}"))
        except Exception as exc:  # reported, not raised: the bench goes on
            errors.append(f"{type(exc).__name__}: {exc}")

    start = time.monotonic()
    threads = [threading.Thread(target=promote, args=(v,)) for v in versions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = champion_history(configure(settings), settings.mlflow.registered_model)
    return {
        "versions": versions,
        "history": history,
        "previous": sorted(str(r.get("previous_champion")) for r in results),
        "errors": errors,
        "seconds": time.monotonic() - start,
        "kept": sorted(history) == sorted(versions),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="recommendation requests per second")
    parser.add_argument("--event-rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of load after each recovery")
    parser.add_argument("--epochs", type=int, default=5, help="neural training epochs for the bundle")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: <settings.home>/bench/chaos)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # run the cleanup below

    from core.object_store import ObjectStore
    from core.settings import load_settings
    from serving.store import publish
    from training.bundle import load_bundle

    out = (args.out or load_settings().home / "bench" / "chaos").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "bundle-v1"
    if not (base / "metadata.json").exists():
        build_bundle(base, args.epochs)
    home = out / "home"
    shutil.rmtree(home, ignore_errors=True)
    store = ObjectStore(str(home / "bundles"))
    publish(base, store, "v1")
    namespace = "chaos"
    config = out / "serve.yaml"
    config.write_text(
        json.dumps(
            {
                "home": str(home),
                "object_store": {"uri": str(home / "bundles")},
                "serving": {"reload_interval_s": 1.0, "namespace": namespace},
            }
        )
    )
    bundle = load_bundle(base)
    users = sorted(bundle.history, key=int)
    items = [str(i) for i in bundle.item_ids]
    PROBE_ITEM.append(items[0])
    server = Server(config, free_port(), 2, out / "serve.log")
    server.log.write_text("")
    server.start()
    load = Load(server.url, users, items, args.rate, args.event_rate).start()
    time.sleep(args.settle)
    rows: list[dict] = []

    def fault(name: str, inject: Callable[[], None], recovered: Callable[[], object], timeout: float = 60) -> None:
        start = time.monotonic()
        inject()
        wait_for(recovered, timeout, f"{name}: recovery")
        time.sleep(args.settle)
        window = load.window(start, time.monotonic())
        requests = [s for s in window if s[1] == "recommend"]
        events = [s for s in window if s[1] == "event"]
        failed = [t for t, kind, status, _ in window if status != ("200" if kind == "recommend" else "202")]
        recovery = failed[-1] - start if failed else 0.0  # the outage clients saw: until the last failure
        accepted = {e for _, _, status, e in events if status == "202"}
        kept = stream_event_ids(server.redis_url(), namespace)
        rows.append(
            {
                "fault": name,
                "requests": len(requests),
                "failed_requests": sum(1 for s in requests if s[2] != "200"),
                "events_sent": len(events),
                "events_accepted": len(accepted),
                "events_kept": len(accepted & kept),
                "recovery_s": round(recovery, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    try:
        fault("valkey kill -9", lambda: server.valkey().kill(), lambda: event_accepted(server.url), timeout=60)
        before = {p.pid for p in server.workers_alive()}
        fault(
            "worker kill -9",
            lambda: psutil.Process(min(before)).kill(),
            lambda: len(server.workers_alive()) == 2 and not {p.pid for p in server.workers_alive()} <= before,
        )
        tree: list[psutil.Process] = []

        stopped: dict[str, float] = {}

        def kill_parent() -> None:
            tree.extend(server.descendants())
            killed = time.monotonic()
            os.kill(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            _, alive = psutil.wait_procs(tree, timeout=10)
            if alive:
                raise RuntimeError(f"still alive 10 s after the parent's kill -9: {[p.pid for p in alive]}")
            stopped["children_gone_s"] = time.monotonic() - killed
            server.start()

        fault("parent kill -9 (and a new serve)", kill_parent, lambda: event_accepted(server.url), timeout=180)
        rows[-1].update({k: round(v, 2) for k, v in stopped.items()})
        store_version = lambda: httpx.get(f"{server.url}/readyz", timeout=2).json()  # noqa: E731
        publish(poison(base, out / "bundle-v2", "v2"), store, "v2")
        fault(
            "poisoned bundle (all-NaN arrays)",
            lambda: time.sleep(3.0),  # three reload polls
            lambda: store_version().get("model_version") == "v1" and store_version().get("reload_error"),
        )
        rows[-1]["reload_error"] = store_version().get("reload_error")
        promotions: dict = {}
        fault("4 concurrent promotions", lambda: promotions.update(concurrent_promotions(out, base)), lambda: True)
        rows[-1]["promotions"] = promotions
        load.stop()
        kept_total = len(load.accepted_events() & stream_event_ids(server.redis_url(), namespace))
    finally:
        load.stop()
        server.stop()
    total_accepted = load.accepted_events()
    print()
    print(
        f"Chaos bench: `hyperrec serve --workers 2` (embedded Valkey with AOF under <home>), ml-100k hybrid bundle "
        f"({len(items)} items), load {args.rate:.0f} recommendations/s + {args.event_rate:.0f} events/s, "
        f"{os.cpu_count()} CPUs; {len(total_accepted)} events accepted over the whole bench, {kept_total} of them in "
        "the stream at the end."
    )
    print()
    print("| fault | requests | failed requests | events accepted | events kept | recovery s |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['fault']} | {row['requests']} | {row['failed_requests']} | {row['events_accepted']} | "
            f"{row['events_kept']} | {row['recovery_s']:.2f} |"
        )
    parent = next((row for row in rows if "children_gone_s" in row), None)
    if parent:
        print()
        print(
            f"Parent kill -9: every process of the killed serve was gone {parent['children_gone_s']:.2f} s after the "
            "kill, and the new serve bound the same port at once (its startup is the outage above)."
        )
    promotions = rows[-1].get("promotions", {}) if rows else {}
    if promotions:
        print()
        print(
            f"Concurrent promotions: versions {promotions['versions']}, champion history {promotions['history']}, "
            f"all kept: {promotions['kept']}, errors: {promotions['errors'] or 'none'}."
        )
    (out / "chaos.json").write_text(json.dumps(rows, indent=2))
    print()
    print("Command: " + " ".join([Path(sys.executable).name, "bench/chaos.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
