"""Benchmark: `hyperrec generate` wall time and peak memory at several sizes.

Run: .venv/bin/python bench/generate.py [--events 1000000 ...]
Each size runs in a fresh child process; peak RSS is the child's ru_maxrss.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(events: int) -> tuple[float, float, int]:
    out = Path(tempfile.mkdtemp(prefix="hyperrec-bench-gen-"))
    try:
        cmd = [sys.executable, "-m", "hyperrec.cli", "generate", "--events", str(events), "--out", str(out / "data")]
        start = time.perf_counter()
        pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
        _, status, usage = os.wait4(pid, 0)
        elapsed = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"generate --events {events} failed with status {status}")
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        return elapsed, usage.ru_maxrss / 1024, size
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| events | wall s | events/s | peak RSS MiB | output MiB |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.events:
        wall, rss_mib, size = measure(n)
        print(f"| {n:,} | {wall:.1f} | {n / wall:,.0f} | {rss_mib:,.0f} | {size / 2**20:,.1f} |")


if __name__ == "__main__":
    main()
