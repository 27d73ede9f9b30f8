"""Benchmark: ``hyperrec up`` to all-healthy, and one recsys_training run under the real
scheduler against the same run under ``dag.test()``.

Run: .venv/bin/python bench/up.py [--config config/demo.yaml] [--dataset ml-100k|DIR] [--synthetic-events 50000]

1. cold: ``hyperrec up`` on an empty home (creates the metadata DBs, migrates Airflow's);
2. warm: ``hyperrec down`` then ``hyperrec up`` again on the same home;
3. ``hyperrec trigger recsys_training`` (the scheduler's LocalExecutor runs every task in a
   process of its own) with the conf of ``make demo``; then ``down``;
4. ``hyperrec train`` on another empty home with the same settings and data: the same DAG
   in one process through ``dag.test()``.
Each home gets its own free ports; schedules are off so no other run competes. Prints a
Markdown table for docs/benchmarks.md with each stage's seconds from the run directories.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
HYPERREC = str(Path(sys.executable).parent / "hyperrec")
sys.path.insert(0, str(ROOT))

from core.net import free_port  # noqa: E402


def overlay(base: str, home: Path) -> Path:
    data = yaml.safe_load((ROOT / base).read_text()) or {}
    data.update(
        {
            "home": str(home),
            "airflow": {"port": free_port(), "training_schedule": None, "drift_schedule": None},
            "mlflow": {"port": free_port()},
            "serving": {"port": free_port()},
            "services": {"metrics_port": free_port()},
            "online_store": {"embedded_port": free_port()},
        }
    )
    path = home / "bench.yaml"
    home.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def timed(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def stage_seconds(home: Path) -> dict[str, float]:
    (timings,) = [
        json.loads(p.read_text())
        for p in (home / "runs").glob("*/timings.json")
        if (p.parent / "registration.json").exists()
    ]
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="config/demo.yaml")
    parser.add_argument("--dataset", default="ml-100k", help="'ml-100k' or a raw dataset directory")
    parser.add_argument("--synthetic-events", type=int, default=50_000)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "HYPERREC_"))}
    conf = json.dumps({"dataset": args.dataset, "synthetic_events": args.synthetic_events})
    with tempfile.TemporaryDirectory(prefix="hyperrec-bench-up-") as tmp:
        up_home, test_home = Path(tmp) / "up", Path(tmp) / "dag-test"
        config = overlay(args.config, up_home)
        cmd = lambda *a: [HYPERREC, *a, "--config", str(config)]  # noqa: E731
        try:
            cold = timed(cmd("up"), env)
            timed(cmd("down"), env)
            warm = timed(cmd("up"), env)
            scheduler = timed(cmd("trigger", "recsys_training", "--conf", conf), env)
        finally:
            subprocess.run(cmd("down"), env=env, capture_output=True)
        test_config = overlay(args.config, test_home)
        in_process = timed(
            [
                HYPERREC,
                "train",
                "--config",
                str(test_config),
                "--dataset",
                args.dataset,
                "--synthetic-events",
                str(args.synthetic_events),
            ],
            env,
        )
        stages_up, stages_test = stage_seconds(up_home), stage_seconds(test_home)
    print(
        f"machine: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; config {args.config}; "
        f"conf {conf}"
    )
    print()
    print("| measurement | seconds |")
    print("|---|---:|")
    print(f"| `hyperrec up` to all-healthy, cold (empty home: metadata DBs created and migrated) | {cold:.1f} |")
    print(f"| `hyperrec up` to all-healthy, warm (same home after `down`) | {warm:.1f} |")
    print(f"| recsys_training under the scheduler (`hyperrec trigger`, trigger to success) | {scheduler:.1f} |")
    print(f"| recsys_training under `dag.test()` (`hyperrec train`, whole command) | {in_process:.1f} |")
    print()
    print("| stage | scheduler (s) | dag.test() (s) |")
    print("|---|---:|---:|")
    for stage in stages_test:
        print(f"| {stage} | {stages_up.get(stage, float('nan')):.1f} | {stages_test[stage]:.1f} |")
    print(f"| **sum of stages** | **{sum(stages_up.values()):.1f}** | **{sum(stages_test.values()):.1f}** |")


if __name__ == "__main__":
    main()
