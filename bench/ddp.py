"""Benchmark: DDP training throughput of the neural hybrid on ml-100k (u75 train).

Run: .venv/bin/python bench/ddp.py [--ranks 1 2] [--threads 1] [--epochs 10] [--batch-sizes 64 256 1024]
     .venv/bin/python bench/ddp.py --device cuda --ranks <GPUs>     (what bench/ddp_gpu.sh runs)

For each global batch size and rank count, :func:`training.ddp.launch` runs torchrun
(gloo on CPU with ``--threads`` intra-op threads per rank; nccl on CUDA, one GPU per
rank) with the default ``neural`` settings except ``epochs`` and ``batch_size``. A sample
is one user's history. Throughput is measured by rank 0 between barriers around the
training loop (process start, rendezvous and data loading excluded). CPU ms per sample
is the process CPU time of all ranks together over the same span: on a host shared with
other work it shows the DDP overhead even when wall-clock throughput cannot. The largest
relative loss difference to the first rank count shows the runs trained the same model.
Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from core.datasets.movielens import GENRES, read_items, read_ratings, read_users
from core.settings import load_settings
from pipelines.split import u75_split
from training.neural import NeuralData


def ml100k_u75(source: Path) -> tuple[pd.DataFrame, pd.DataFrame, NeuralData]:
    """(train, test, neural data of train) for ml-100k under protocol u75, with the
    demographics as user features and the genres as item features."""
    ratings = read_ratings(source)
    train, test = u75_split(ratings)
    item_ids = np.array(sorted(ratings["item_id"].unique()), dtype=object)
    items = read_items(source).assign(item_id=lambda f: f["item_id"].astype(int)).set_index("item_id")
    genres = np.array([[g in cats for g in GENRES] for cats in items.loc[list(item_ids), "categories"]], np.float32)
    users = read_users(source).assign(user_id=lambda f: f["user_id"].astype(int))
    data = NeuralData.build(train, item_ids, users[["user_id", "age", "gender", "occupation", "region"]], genres)
    return train, test, data


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (CPU)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from training.ddp import launch, write_training_data

    settings = load_settings()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hyperrec-bench-ddp-"))
    _, _, data = ml100k_u75(settings.data_dir / "ml-100k")
    data_dir = write_training_data(data, work / "data")
    backend = "nccl" if args.device == "cuda" else "gloo"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average before: {load_average()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"data: ml-100k u75 train, {data.n_users} users x {data.n_items} items, {data.interactions.matrix.nnz} "
        f"interactions; {args.epochs} epochs; device {args.device}, backend {backend}\n"
    )
    print(
        "| global batch | ranks | threads/rank | samples/s | speed-up | CPU ms/sample | steps | final loss "
        "| max rel. loss diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for batch in args.batch_sizes:
            cfg = settings.neural.model_copy(update={"epochs": args.epochs, "batch_size": batch})
            base: dict | None = None
            for ranks in args.ranks:
                result = launch(
                    data_dir,
                    work / f"b{batch}-r{ranks}",
                    nproc=ranks,
                    device=args.device,
                    cfg=cfg,
                    threads=args.threads,
                )
                losses, rate = np.array(result["losses"]), result["throughput"]["samples_per_s"]
                base = base or {"rate": rate, "losses": losses}
                diff = float(np.max(np.abs(losses - base["losses"]) / np.abs(base["losses"])))
                threads = result["throughput"]["threads_per_rank"] or "-"
                cpu_ms = result["throughput"]["cpu_ms_per_sample"]
                print(
                    f"| {batch} | {ranks} | {threads} | {rate:,.0f} | {rate / base['rate']:.2f}x | {cpu_ms:.3f} "
                    f"| {len(losses)} | {losses[-1]:.2f} | {diff:.1e} |",
                    flush=True,
                )
    finally:
        print(f"\nload average after: {load_average()}")
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
