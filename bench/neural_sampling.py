"""Benchmark: the neural model's full softmax against its sampled softmax, by catalogue size.

Run: .venv/bin/python bench/neural_sampling.py [--items 2000 5000 10000 20000 50000 200000]
         [--repeat 3] [--threads 1] [--quality] [--json PATH]

Step time and peak memory: for each catalogue size and path, a fresh process builds a seeded
synthetic catalogue (``--users`` users, each with 20..80 distinct items drawn from a Zipf(1.0)
popularity over the items; 19 random genre flags per item as item features) and trains
the default ``neural`` settings (batch 64, ``--threads`` intra-op threads) with
``full_softmax_max_items`` set so that the path is ``full`` (every item scored) or
``sampled`` (:class:`training.neural.NegativeSampler`, ``sampled_negatives`` as configured).
Step time = wall time (and process CPU time) of 2 epochs / their steps, after a 1-epoch
warm-up fit in the same process; the median of ``--repeat`` processes is shown. Peak memory
= the process's peak RSS (``ru_maxrss``) minus its RSS just before training (the warm-up
included), i.e. what training adds. ``--quality`` also fits ml-100k u75 train
(demographics and genres as features) on both paths (the sampled one forced with
``full_softmax_max_items: 0``) and reports NDCG@10 on u75 test. Prints Markdown tables and,
with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp import load_average

from core.settings import load_settings
from training.neural import NeuralData, build_net, train

GENRES = 19


def synthetic(n_items: int, n_users: int, seed: int = 0) -> NeuralData:
    """A seeded catalogue: per user 20..80 distinct items from Zipf(1.0) item popularity."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1)
    popularity = popularity[rng.permutation(n_items)]
    popularity /= popularity.sum()
    users, items = [], []
    for u in range(n_users):
        picked = np.unique(rng.choice(n_items, size=rng.integers(20, 81), p=popularity))
        users.append(np.full(len(picked), u))
        items.append(picked)
    train_frame = pd.DataFrame({"user_id": np.concatenate(users), "item_id": np.concatenate(items)})
    genres = (rng.random((n_items, GENRES)) < 0.1).astype(np.float32)
    return NeuralData.build(train_frame, np.arange(n_items, dtype=object), item_features=genres)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(n_items: int, n_users: int, mode: str, threads: int) -> dict:
    """One measurement in this process (see the module docstring)."""
    torch.set_num_threads(threads)
    data = synthetic(n_items, n_users)
    base = load_settings().neural
    limit = n_items if mode == "full" else n_items - 1
    cfg = base.model_copy(update={"epochs": 1, "full_softmax_max_items": limit})
    before = rss_mb()
    train(build_net(data, cfg), data, cfg, progress=False)  # warm-up
    cfg = cfg.model_copy(update={"epochs": 2})
    net = build_net(data, cfg)
    start, cpu = time.perf_counter(), time.process_time()
    results = train(net, data, cfg, progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "items": n_items,
        "users": n_users,
        "mode": mode,
        "threads": threads,
        "step_ms": 1e3 * seconds / len(results),
        "step_cpu_ms": 1e3 * cpu / len(results),
        "peak_rss_mb": peak,
        "rss_before_mb": before,
        "train_peak_mb": peak - before,
        "final_loss": results[-1].loss,
    }


def quality(threads: int) -> list[dict]:
    """NDCG@10 on ml-100k u75 test of the default settings on both paths."""
    from ddp import ml100k_u75
    from quantize import ndcg_at_10

    from training.neural import fit_neural

    settings = load_settings()
    _, test, data = ml100k_u75(settings.data_dir / "ml-100k")
    rows = []
    for mode, limit in (("full", data.n_items), ("sampled", 0)):
        cfg = settings.neural.model_copy(update={"full_softmax_max_items": limit})
        rec = fit_neural(data, cfg, progress=False, threads=threads)
        rows.append({"mode": mode, "ndcg@10": ndcg_at_10(rec, data, test), "train_s": rec.train_seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[2000, 5000, 10000, 20000, 50000, 200000])
    parser.add_argument("--users", type=int, default=640, help="users of the synthetic catalogue (10 steps/epoch)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quality", action="store_true", help="also NDCG@10 of both paths on ml-100k u75")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--worker", choices=("full", "sampled"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.items[0], args.users, args.worker, args.threads)))
        return

    negatives = load_settings().neural.sampled_negatives
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average before: {load_average()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{args.users} users, batch 64, {args.threads} thread(s), sampled_negatives {negatives}\n")
    print(
        "| items | full: ms/step (CPU ms) | sampled: ms/step (CPU ms) | speed-up | full: peak MB | sampled: peak MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    runs: list[dict] = []
    for n_items in args.items:
        median = {}
        for mode in ("full", "sampled"):
            found = []
            for _ in range(args.repeat):
                command = [sys.executable, __file__, "--worker", mode, "--items", str(n_items)]
                command += ["--users", str(args.users), "--threads", str(args.threads)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                found.append(json.loads(out.strip().splitlines()[-1]))
            runs += found
            median[mode] = {
                k: statistics.median(r[k] for r in found) for k in ("step_ms", "step_cpu_ms", "train_peak_mb")
            }
        full, sampled = median["full"], median["sampled"]
        print(
            f"| {n_items:,} | {full['step_ms']:,.1f} ({full['step_cpu_ms']:,.1f}) | "
            f"{sampled['step_ms']:,.1f} ({sampled['step_cpu_ms']:,.1f}) | "
            f"{full['step_ms'] / sampled['step_ms']:.1f}x | {full['train_peak_mb']:,.0f} | "
            f"{sampled['train_peak_mb']:,.0f} |",
            flush=True,
        )
    scores = quality(args.threads) if args.quality else []
    if scores:
        print("\n| ml-100k u75 | NDCG@10 | train s |\n|---|---:|---:|")
        for row in scores:
            print(f"| {row['mode']} | {row['ndcg@10']:.4f} | {row['train_s']:.1f} |")
    after = load_average()
    print(f"\nload average after: {after}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "quality": scores, "load_after": after}, indent=2))


if __name__ == "__main__":
    main()
