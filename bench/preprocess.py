"""Benchmark: Spark preprocessing of synthetic feeds on ``local[2]``.

Run: .venv/bin/python bench/preprocess.py [--events 1000000 3000000 10000000] [--driver-memory 4g]

For each size: generate a feed (0.5 % malformed rows, 0.5 % duplicates), then run
``hyperrec preprocess`` on it in a fresh process while sampling the resident memory of
that process and all its children (the Spark JVM included) every 0.2 s. Prints a
Markdown table for docs/benchmarks.md: wall time, rows/s, peak RSS, and the cost per
million rows (flat when the cost grows linearly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def run_measured(cmd: list[str], env: dict) -> tuple[float, int, str]:
    start = time.perf_counter()
    popen = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    proc, peak = psutil.Process(popen.pid), 0
    while popen.poll() is None:
        peak = max(peak, tree_rss(proc))
        time.sleep(0.2)
    out = popen.stdout.read()
    if popen.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with {popen.returncode}")
    return time.perf_counter() - start, peak, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hyperrec-bench-pre-"))
    env = {
        **os.environ,
        "HYPERREC_SPARK__MASTER": "local[2]",
        "HYPERREC_SPARK__DRIVER_MEMORY": args.driver_memory,
        "HYPERREC_HOME": str(work / "home"),
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
        f"Spark local[2], driver memory {args.driver_memory}"
    )
    print("| events | rows in | clean | quarantined | duplicates | wall s | rows/s | s per M rows | peak RSS GiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for n in args.events:
            raw, out = work / f"raw-{n}", work / f"out-{n}"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "hyperrec.cli",
                    "generate",
                    "--events",
                    str(n),
                    "--out",
                    str(raw),
                    "--malformed",
                    "0.005",
                    "--duplicates",
                    "0.005",
                    "--seed",
                    "1",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            cmd = [
                sys.executable,
                "-m",
                "hyperrec.cli",
                "preprocess",
                "--interactions",
                str(raw / "interactions"),
                "--users",
                str(raw / "users.parquet"),
                "--items",
                str(raw / "items.parquet"),
                "--out",
                str(out),
            ]
            wall, peak, _ = run_measured(cmd, env)
            report = json.loads((out / "report.json").read_text())
            rows = report["in"]
            print(
                f"| {n:,} | {rows:,} | {report['clean']:,} | {report['quarantined_total']:,} "
                f"| {report['duplicates']:,} "
                f"| {wall:.0f} | {rows / wall:,.0f} | {wall / (rows / 1e6):.1f} | {peak / 2**30:.2f} |",
                flush=True,
            )
            shutil.rmtree(raw), shutil.rmtree(out)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
