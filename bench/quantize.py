"""Benchmark: the neural hybrid in float32 vs INT8 (dynamic quantization) on ml-100k u75.

Run: .venv/bin/python bench/quantize.py [--seed 0] [--requests 2000] [--threads 1]

Fits the default ``neural`` settings on u75 train (demographics and genres as features),
then for the float model and :func:`training.neural.quantize_int8` of it reports NDCG@10
on u75 test (seen items excluded, every held-out rating relevant) and the per-user
scoring latency at batch size 1: one request = user tower on the user's history +
scores over the catalogue + top-10 (item-tower outputs are computed once and cached, as
in serving). Latencies are p50/p99 over ``--requests`` requests after 100 warm-up ones.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp import load_average, ml100k_u75

from core.settings import load_settings
from training.metrics import evaluate
from training.neural import NeuralRecommender, fit_neural, quantize_int8


def ndcg_at_10(rec: NeuralRecommender, data, test) -> float:
    m = data.interactions
    relevant = test.groupby("user_id")["item_id"].apply(set).to_dict()
    users = [u for u in relevant if u in m.user_index]
    rows = np.array([m.user_index[u] for u in users])
    top = rec.recommend(m.matrix[rows], 10, users)
    return evaluate({u: list(m.item_ids[t]) for u, t in zip(users, top)}, relevant, 10)["ndcg@10"]


def latencies_ms(rec: NeuralRecommender, data, n: int, seed: int) -> np.ndarray:
    m = data.interactions
    rows = np.random.default_rng(seed).integers(0, m.matrix.shape[0], n + 100)
    times = []
    for i, r in enumerate(rows):
        x = m.matrix[r : r + 1]
        start = time.perf_counter()
        rec.recommend(x, 10, [m.user_ids[r]])
        if i >= 100:
            times.append((time.perf_counter() - start) * 1e3)
    return np.array(times)


def linear_bytes(rec: NeuralRecommender) -> int:
    """Bytes of the towers' Linear weight matrices (4 per float32 weight, 1 per INT8 one)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    total = 0
    for module in rec.net.modules():
        if isinstance(module, DynamicLinear):
            total += module.weight().numel()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * 4
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings()
    cfg = settings.neural.model_copy(update={"seed": args.seed})
    print(f"{os.cpu_count()} cores, torch threads {args.threads}; load average before: {load_average()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    _, test, data = ml100k_u75(settings.data_dir / "ml-100k")
    start = time.perf_counter()
    model = fit_neural(data, cfg, progress=True)
    print(f"fit: {time.perf_counter() - start:.1f} s ({cfg.epochs} epochs, batch {cfg.batch_size}); config {cfg}\n")
    quantized = quantize_int8(model)
    print("| model | NDCG@10 | rel. change | p50 ms | p99 ms | Linear weights KiB |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for name, rec in (("float32", model), ("INT8 dynamic", quantized)):
        ndcg = ndcg_at_10(rec, data, test)
        base = base if base is not None else ndcg
        lat = latencies_ms(rec, data, args.requests, args.seed)
        print(
            f"| {name} | {ndcg:.4f} | {(ndcg - base) / base:+.2%} | {np.percentile(lat, 50):.3f} "
            f"| {np.percentile(lat, 99):.3f} | {linear_bytes(rec) / 1024:,.0f} |",
            flush=True,
        )
    print(f"\nload average after: {load_average()}")


if __name__ == "__main__":
    main()
