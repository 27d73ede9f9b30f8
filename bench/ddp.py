"""Benchmark: DDP training throughput of the neural hybrid on ml-100k (u75 train).

Run: .venv/bin/python bench/ddp.py [--ranks 1 2] [--threads 1] [--in-process-threads 1 2] [--epochs 10]
         [--batch-sizes 64 256 1024] [--repeat 3] [--baseline-tree DIR] [--json PATH]
     .venv/bin/python bench/ddp.py --device cuda --ranks <GPUs>     (what bench/ddp_gpu.sh runs)

For each global batch size, every configuration trains the default ``neural`` settings
except ``epochs`` and ``batch_size``, ``--repeat`` times (round-robin over the
configurations); the median run is shown:

- ``in-process, T threads`` (CPU only): :func:`training.neural.fit_neural` with T intra-op
  threads in a fresh Python process, as the pipeline trains with ``neural.nproc: 1``
  (``neural.threads``, default 1).
- ``torchrun, N ranks``: :func:`training.ddp.launch` (on CPU gloo, and shared memory for
  the ranks' exchanges on one host, with ``--threads`` intra-op threads per rank, default 1,
  i.e. cores / ranks on 2 cores; nccl on CUDA, one GPU per rank), as the pipeline trains
  with ``neural.nproc: N``.
- ``baseline torchrun, N ranks`` (with ``--baseline-tree DIR``): the same with the code of
  another checkout in DIR, for before/after comparisons on a host whose speed drifts.

A sample is one user's history. Throughput is measured around the training loop (between
barriers under torchrun; process start, rendezvous and data loading excluded). CPU ms per
sample is the process CPU time of all ranks together over the same span (on a host shared
with other work it shows the overhead even when wall-clock throughput cannot). Speed-up and
the largest relative per-step loss difference are against the first configuration (on CPU:
in-process with the first ``--in-process-threads``). Prints a Markdown table for
docs/benchmarks.md and writes every run as JSON (``--json``, default
``<home>/bench/ddp-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

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


def in_process(data_dir: Path, cfg, threads: int) -> dict:
    """One in-process fit (:func:`training.neural.fit_neural`) in a fresh Python process, as
    the pipeline's ``neural.nproc: 1`` fit; returns what :func:`training.ddp.launch` does."""
    command = [sys.executable, __file__, "--in-process-worker", str(data_dir), cfg.model_dump_json(), str(threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def baseline_launch(tree: Path, data_dir: Path, out: Path, ranks: int, cfg, threads: int, device: str) -> dict:
    """:func:`training.ddp.launch` of the code in ``tree`` (another checkout's ``training``
    and ``core``; ``cfg``'s fields that its settings do not know are left out), in a fresh
    Python process; returns what ``launch`` returns."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from training.ddp import launch; "
        "from core.settings import NeuralSettings as S; "
        "cfg = S(**{k: v for k, v in json.loads(sys.argv[6]).items() if k in S.model_fields}); "
        "r = launch(sys.argv[2], sys.argv[3], nproc=int(sys.argv[4]), device=sys.argv[5], cfg=cfg, "
        "threads=int(sys.argv[7])); "
        "print(json.dumps({'losses': r['losses'], 'throughput': r['throughput']}))"
    )
    args = [str(tree), str(data_dir), str(out), str(ranks), device, cfg.model_dump_json(), str(threads)]
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _in_process_worker(data_dir: str, cfg_json: str, threads: str) -> None:
    # The first optimizer step imports torch._dynamo (seconds, once per process); a torchrun
    # worker has imported it before its timer starts (use_deterministic_algorithms), so here too.
    import torch._dynamo  # noqa: F401

    from core.settings import NeuralSettings
    from training.ddp import read_training_data
    from training.neural import fit_neural

    data, cfg = read_training_data(data_dir), NeuralSettings.model_validate_json(cfg_json)
    cpu = time.process_time()
    rec = fit_neural(data, cfg, progress=False, threads=int(threads))
    cpu = time.process_time() - cpu
    samples = cfg.epochs * data.n_users
    throughput = {
        "samples": samples,
        "seconds": rec.train_seconds,
        "samples_per_s": samples / rec.train_seconds,
        "cpu_ms_per_sample": 1e3 * cpu / samples,
        "world_size": 1,
        "threads_per_rank": int(threads),
    }
    print(json.dumps({"losses": list(rec.losses), "throughput": throughput}))


def main() -> None:
    if sys.argv[1:2] == ["--in-process-worker"]:
        _in_process_worker(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="torchrun ranks per configuration")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per torchrun rank (CPU)")
    parser.add_argument(
        "--in-process-threads",
        type=int,
        nargs="*",
        default=None,
        help="in-process fits with these thread counts (CPU; default: 1 and the core count)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration; the median is shown")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="default: <home>/bench/ddp-<device>.json")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        default=None,
        help="also run the torchrun configurations with the code in this directory, e.g. the "
        "previous commit's: git archive <commit> training core | tar -x -C DIR",
    )
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from training.ddp import launch, write_training_data

    settings = load_settings()
    cores = os.cpu_count() or 1
    threads_in_process = [] if args.device == "cuda" else (args.in_process_threads or sorted({1, cores}))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hyperrec-bench-ddp-"))
    json_path = args.json or settings.home / "bench" / f"ddp-{args.device}.json"
    _, _, data = ml100k_u75(settings.data_dir / "ml-100k")
    data_dir = write_training_data(data, work / "data")
    backend = "nccl" if args.device == "cuda" else "gloo"
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()}, {cores} cores",
        "device": args.device if args.device == "cpu" else f"cuda: {torch.cuda.get_device_name(0)}",
        "backend": backend,
        "epochs": args.epochs,
        "repeat": args.repeat,
        "load_before": load_average(),
        "rows": [],
    }
    print(f"machine: {report['machine']}; load average before: {report['load_before']}")
    print(f"command: {report['command']}")
    print(
        f"data: ml-100k u75 train, {data.n_users} users x {data.n_items} items, {data.interactions.matrix.nnz} "
        f"interactions; {args.epochs} epochs; device {args.device}, backend {backend}; median of {args.repeat}\n"
    )
    print(
        "| global batch | configuration | threads/rank | samples/s | speed-up | CPU ms/sample | steps | final loss "
        "| max rel. loss diff |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    configs = [("in-process", 1, t) for t in threads_in_process]
    configs += [("torchrun", r, args.threads) for r in args.ranks]
    if args.baseline_tree is not None:
        configs += [("baseline torchrun", r, args.threads) for r in args.ranks]
    try:
        for batch in args.batch_sizes:
            cfg = settings.neural.model_copy(update={"epochs": args.epochs, "batch_size": batch})
            base: dict | None = None
            # Round-robin over the configurations, so that a load change on a shared host
            # hits them all alike.
            all_runs: dict[int, list[dict]] = {c: [] for c in range(len(configs))}
            for i in range(args.repeat):
                for c, (kind, ranks, threads) in enumerate(configs):
                    if kind == "in-process":
                        all_runs[c].append(in_process(data_dir, cfg, threads))
                    elif kind == "baseline torchrun":
                        out = work / f"base-b{batch}-r{ranks}-{i}"
                        tree = args.baseline_tree.resolve()
                        all_runs[c].append(baseline_launch(tree, data_dir, out, ranks, cfg, threads, args.device))
                    else:
                        out = work / f"b{batch}-r{ranks}-{i}"
                        result = launch(data_dir, out, nproc=ranks, device=args.device, cfg=cfg, threads=threads)
                        all_runs[c].append(result)
            for c, (kind, ranks, threads) in enumerate(configs):
                runs = all_runs[c]
                rates = [r["throughput"]["samples_per_s"] for r in runs]
                run = runs[rates.index(statistics.median_low(rates))]
                losses = np.array(run["losses"])
                base = base or {"rate": statistics.median(rates), "losses": losses}
                rate = statistics.median(rates)
                diff = float(np.max(np.abs(losses - base["losses"]) / np.abs(base["losses"])))
                name = f"{kind}, {ranks} rank{'s' if ranks > 1 else ''}"
                row = {
                    "batch_size": batch,
                    "configuration": name,
                    "ranks": ranks,
                    "threads_per_rank": threads if args.device == "cpu" else None,
                    "samples_per_s": rate,
                    "samples_per_s_runs": rates,
                    "speed_up": rate / base["rate"],
                    "cpu_ms_per_sample": statistics.median(r["throughput"]["cpu_ms_per_sample"] for r in runs),
                    "steps": len(losses),
                    "final_loss": float(losses[-1]),
                    "max_rel_loss_diff": diff,
                }
                report["rows"].append(row)
                print(
                    f"| {batch} | {name} | {row['threads_per_rank'] or '-'} | {rate:,.0f} | {row['speed_up']:.2f}x "
                    f"| {row['cpu_ms_per_sample']:.3f} | {len(losses)} | {losses[-1]:.2f} | {diff:.1e} |",
                    flush=True,
                )
    finally:
        report["load_after"] = load_average()
        print(f"\nload average after: {report['load_after']}")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        print(f"figures: {json_path}")
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
