"""Benchmark: dense EASE against neighbourhood-restricted (sparse) EASE, by catalogue size.

Run: .venv/bin/python bench/ease_scale.py DIR [DIR ...] [--neighbours 32 64 128 256]
         [--lambdas 250 400 600 900] [--sparse-only DIR ...] [--json PATH]

Each ``DIR`` holds ``interactions.csv`` (``user_id,item_id,...``; ``hyperrec generate
--benchmark-csv`` writes one). Validation-style protocol: fold 0 of the per-user 3-fold
(``user_kfold``, seed 0, as ``tune_hybrid``) is held out; EASE is fitted on the binary rest
and each held-out user's top-10 (fit items excluded) is scored by NDCG@10 against their
held-out items, the best λ of ``--lambdas`` reported. Methods: ``dense`` (exact inverse),
``pruned m`` (the dense W keeping its m largest |values| per column: a quality reference that
needs the dense fit), ``sparse m`` (``sparse_ease_weights`` with m neighbours). Each method
runs in a fresh process: fit time = mean wall time of one fit over the λ grid; peak memory =
the process's peak RSS (``ru_maxrss``) minus its RSS before the first fit. ``--sparse-only``
directories run the sparse path alone. Prints Markdown tables (with the load average) and,
with ``--json``, writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipelines.split import user_kfold
from training.evaluation import relevant_items
from training.metrics import evaluate
from training.models import InteractionMatrix, fit_ease, item_gram, top_k

K = 10


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fold(directory: Path) -> tuple[InteractionMatrix, np.ndarray, list, dict]:
    frame = pd.read_csv(directory / "interactions.csv", usecols=["user_id", "item_id"], dtype=str)
    frame = frame.drop_duplicates(ignore_index=True)
    fit, held = user_kfold(frame, 3, 0)[0]
    items = np.array(sorted(frame["item_id"].unique()), dtype=object)
    matrix = InteractionMatrix.from_frame(fit, item_ids=items)
    matrix.matrix.data[:] = 1.0
    relevant = relevant_items(matrix, held)
    users = list(relevant)
    rows = np.array([matrix.user_index[u] for u in users], dtype=np.int64)
    return matrix, rows, users, relevant


def _ndcg(weights: np.ndarray | sp.csr_matrix, matrix: InteractionMatrix, rows, users, relevant) -> float:
    """NDCG@K of ``x · weights`` for the held-out users, scored in chunks."""
    n = matrix.matrix.shape[1]
    chunk = max(1, 20_000_000 // n)
    recs = {}
    for lo in range(0, len(rows), chunk):
        x = matrix.matrix[rows[lo : lo + chunk]]
        product = x @ weights
        scores = product.toarray() if sp.issparse(product) else np.asarray(product)
        for user, top in zip(users[lo : lo + chunk], top_k(scores, x, K)):
            recs[user] = list(matrix.item_ids[top])
    return evaluate(recs, relevant, K)[f"ndcg@{K}"]


def _prune(weights: np.ndarray, m: int) -> sp.csr_matrix:
    """``weights`` keeping its ``m`` largest |values| per column."""
    n = weights.shape[0]
    rows = np.argpartition(-np.abs(weights), m - 1, axis=0)[:m]
    cols = np.broadcast_to(np.arange(n), rows.shape)
    return sp.csr_matrix((weights[rows, cols].ravel(), (rows.ravel(), cols.ravel())), shape=(n, n))


def run_one(directory: Path, method: str, neighbours: list[int], lambdas: list[float]) -> dict:
    """One method on one dataset (in this process): best NDCG@K over ``lambdas``, fit time, memory."""
    matrix, rows, users, relevant = _fold(directory)
    gram = item_gram(matrix.matrix)
    base = _rss_mib()
    out: dict = {"items": matrix.matrix.shape[1], "users": matrix.matrix.shape[0], "method": method}
    fit_s, best = [], {}
    m = int(method.split()[1]) if method.startswith("sparse") else None
    for lam in lambdas:
        start = time.perf_counter()
        if m is None:
            model = fit_ease(matrix.matrix, lam, gram=gram, dense_max_items=None)
        else:
            model = fit_ease(matrix.matrix, lam, gram=gram, dense_max_items=0, neighbours=m)
        fit_s.append(time.perf_counter() - start)
        scores = {method: _ndcg(model.weights, matrix, rows, users, relevant)}
        if m is None:
            for p in neighbours:
                if p < model.weights.shape[0]:
                    scores[f"pruned {p}"] = _ndcg(_prune(model.weights, p), matrix, rows, users, relevant)
        for name, value in scores.items():
            if value > best.get(name, (-1.0, 0.0))[0]:
                best[name] = (value, lam)
        del model
    out |= {
        "fit_s": float(np.mean(fit_s)),
        "peak_mib": max(0.0, _peak_mib() - base),
        "ndcg": {name: v for name, (v, _) in best.items()},
        "lambda": {name: lam for name, (_, lam) in best.items()},
        "load": " ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    return out


def _child(directory: Path, method: str, neighbours: list[int], lambdas: list[float]) -> dict:
    cmd = [sys.executable, __file__, str(directory), "--one", method, "--neighbours", *map(str, neighbours)]
    cmd += ["--lambdas", *map(str, lambdas)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", type=Path, nargs="*")
    parser.add_argument("--sparse-only", type=Path, nargs="*", default=[])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[250.0, 400.0, 600.0, 900.0])
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.dirs[0], args.one, args.neighbours, args.lambdas)))
        return
    results = []
    jobs = [(d, "dense") for d in args.dirs] + [
        (d, f"sparse {m}") for d in [*args.dirs, *args.sparse_only] for m in args.neighbours
    ]
    for directory, method in jobs:
        result = _child(directory, method, args.neighbours, args.lambdas) | {"dir": str(directory)}
        results.append(result)
        print(f"{directory} {method}: {json.dumps(result)}", file=sys.stderr, flush=True)
    print(f"| items | method | fit s (mean over {len(args.lambdas)} λ) | peak MiB | NDCG@{K} | λ | load (1/5/15 min) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        for name, value in r["ndcg"].items():
            timed = name == r["method"]
            fit = f"{r['fit_s']:.2f}" if timed else "(dense fit)"
            peak = f"{r['peak_mib']:.0f}" if timed else ""
            print(f"| {r['items']} | {name} | {fit} | {peak} | {value:.4f} | {r['lambda'][name]:g} | {r['load']} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
