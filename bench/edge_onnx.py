"""Benchmark: the edge export (`hyperrec export onnx`, training/edge.py) of the ml-100k hybrid.

Run: .venv/bin/python bench/edge_onnx.py [--bundle DIR] [--users 1000] [--requests 2000] [--out DIR]

1. Bundle: ``--bundle`` (a serving bundle directory), else the ml-100k hybrid that
   ``bench/serve_load.py`` builds (EASE λ=500 + neural two-tower, 20 epochs + content +
   popularity, fitted on u75 train), reused from ``<home>/bench/serve-load/bundle-v1`` or
   built into ``<home>/bench/edge-onnx/bundle``.
2. Export into ``--out`` (default ``<home>/bench/edge-onnx/edge``): export time, the edge
   bundle's files and size next to the serving bundle's.
3. Parity: ``--users`` histories (every bundle user's training history, topped up with random
   sub-histories of them when the bundle has fewer users), each scored by onnxruntime and by
   the repo's own scoring of the same combination (:func:`training.edge.edge_reference`:
   ``WeightedHybrid.score(bundle.row(None, H), [None])``, torch for the neural tower, NumPy /
   SciPy for the rest): max |Δscore| and the share of identical top-10 lists (seen excluded).
4. Latency of one user (one history → scores of every item → top 10 unseen), p50/p99 over
   ``--requests`` requests after 100 warm-up ones (the three interleaved request by request),
   all on one core: onnxruntime
   (``intra_op_num_threads=1``, ``inter_op_num_threads=1``, sequential), the same graph in
   PyTorch eager (:class:`training.edge.EdgeScorer`, ``torch.set_num_threads(1)``), and the
   repo's scoring path (the reference above, BLAS limited to 1 thread).

Prints a Markdown table for docs/benchmarks.md with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def histories(bundle, count: int, seed: int) -> list[np.ndarray]:
    """Every user's training history (sorted user ids), topped up to ``count`` with random
    non-empty sub-histories of random users."""
    users = sorted(bundle.history)
    out = [np.unique(bundle.history[u]).astype(np.int64) for u in users][:count]
    rng = np.random.default_rng(seed)
    while len(out) < count:
        full = bundle.history[users[rng.integers(len(users))]]
        size = int(rng.integers(1, len(full) + 1))
        out.append(np.unique(rng.choice(full, size=size, replace=False)).astype(np.int64))
    return out


def timed(fns: dict, inputs: list[np.ndarray], warm_up: int = 100) -> dict[str, np.ndarray]:
    """Milliseconds per request of each of ``fns`` (name → function of one history), the
    functions interleaved request by request (rotating which goes first) so that a change of
    machine load hits them alike; the first ``warm_up`` requests are not counted."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for n, history in enumerate(inputs):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            start = time.perf_counter()
            fns[name](history)
            if n >= warm_up:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: np.array(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from core.settings import load_settings
    from training.bundle import load_bundle
    from training.edge import EdgeScorer, edge_plan, edge_reference, export_edge, top_k_unseen
    from training.hybrid import as_hybrid
    from training.models import top_k

    home = load_settings().home
    bundle_dir = args.bundle
    if bundle_dir is None:
        bundle_dir = home / "bench" / "serve-load" / "bundle-v1"
        if not (bundle_dir / "metadata.json").is_file():
            from serve_load import build_bundle

            bundle_dir = home / "bench" / "edge-onnx" / "bundle"
            if not (bundle_dir / "metadata.json").is_file():
                build_bundle(bundle_dir, 20)
    out = args.out or home / "bench" / "edge-onnx" / "edge"
    load_before = load_average()

    start = time.perf_counter()
    manifest = export_edge(bundle_dir, out)
    export_s = time.perf_counter() - start
    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    plan = edge_plan(model)
    reference = edge_reference(model, plan)
    torch.set_num_threads(1)
    eager = EdgeScorer(model, plan).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(out / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def run_onnx(history: np.ndarray) -> np.ndarray:
        scores = session.run(["scores"], {"history": history})[0]
        return top_k_unseen(scores, history)

    def run_torch(history: np.ndarray) -> np.ndarray:
        return top_k_unseen(eager.score(history), history)

    def run_repo(history: np.ndarray) -> np.ndarray:
        row = bundle.row(None, history)
        return top_k(reference.score(row, [None]), row, 10)[0]

    parity = histories(bundle, args.users, args.seed)
    worst, worst_torch, same = 0.0, 0.0, 0
    with threadpool_limits(1):
        for history in parity:
            row = bundle.row(None, history)
            expected = reference.score(row, [None])
            got = session.run(["scores"], {"history": history})[0]
            worst = max(worst, float(np.abs(got - expected[0]).max()))
            worst_torch = max(worst_torch, float(np.abs(eager.score(history) - expected[0]).max()))
            same += top_k_unseen(got, history).tolist() == top_k(expected, row, 10)[0].tolist()

        requests = histories(bundle, args.requests + 100, args.seed + 1)
        order = np.random.default_rng(args.seed).permutation(len(requests))
        requests = [requests[i] for i in order]
        latency = timed({"onnxruntime": run_onnx, "pytorch": run_torch, "repo": run_repo}, requests)
    load_after = load_average()

    files = manifest["files"]
    print(f"bundle {bundle_dir} (version {bundle.version}, {bundle.n_items} items, {len(bundle.history)} users)")
    score = manifest["score"]
    print(f"components: {', '.join(score['components'])}; left out: {score['excluded_components']}")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| serving bundle size | {dir_bytes(bundle_dir) / 2**20:.1f} MiB |")
    print(f"| edge bundle size (model.onnx + items.json + manifest.json) | {dir_bytes(out) / 2**20:.1f} MiB |")
    print(f"| model.onnx | {files['model.onnx']['bytes'] / 2**20:.1f} MiB |")
    print(f"| items.json | {files['items.json']['bytes'] / 2**10:.0f} KiB |")
    print(f"| export time | {export_s:.1f} s |")
    print(f"| parity histories | {len(parity)} |")
    print(f"| max abs score diff, onnxruntime vs repo scoring | {worst:.2e} |")
    print(f"| max abs score diff, PyTorch eager graph vs repo scoring | {worst_torch:.2e} |")
    print(f"| identical top-10 lists (seen excluded) | {same}/{len(parity)} |")
    print()
    print("| one user, one core (scores of every item + top 10) | p50 ms | p99 ms |")
    print("|---|---|---|")
    labels = {
        "onnxruntime": "onnxruntime 1 thread (edge model.onnx)",
        "pytorch": "PyTorch eager, same graph (EdgeScorer)",
        "repo": "repo scoring path (WeightedHybrid.score)",
    }
    for name, times in latency.items():
        print(f"| {labels[name]} | {np.percentile(times, 50):.3f} | {np.percentile(times, 99):.3f} |")
    print()
    print(f"requests: {args.requests} after 100 warm-up; load average before: {load_before}; after: {load_after}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")


if __name__ == "__main__":
    main()
