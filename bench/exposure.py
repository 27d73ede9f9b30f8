"""Benchmark: the accuracy-vs-exposure curve of the exposure-aware re-ranker
(:mod:`training.rerank`) on u75 splits, and the default strength chosen on validation.

Run: .venv/bin/python bench/exposure.py DATASET[@CONFIG] ... [--cache DIR] [--json PATH]

``DATASET`` is ``ml-100k`` or a directory with ``interactions.csv`` (and ``items.csv`` for the
genres; ``hyperrec generate --benchmark-csv`` writes both); ``@CONFIG`` a settings overlay for
that dataset's fit (e.g. ``config/demo.yaml``). The model is the weighted hybrid, fitted by the
project's own code as ``hyperrec benchmark`` fits it (its validation search on train, then the
fit on train). Validation is carved from train: the u75 rule applied to the train part
(``u75_split(train)``) gives a validation-train and a validation part; the hybrid with the
same choices is fitted on the validation-train part and the grid of strengths × long-tail
floors is scored on the validation part. One default serves every dataset: the grid point
whose smallest relative long-tail gain over the datasets is largest among the points whose
validation NDCG@10 is within ``--budget`` (1.5 %: the 2 % accuracy bound less a margin for
the step from validation to test) of strength 0 on every dataset. Only then are the test
parts scored, for every strength at the chosen floor (and the chosen strength without a
floor). The candidate pools (top ``serving.exposure_pool`` unseen items per user and their
scores) are cached under ``--cache`` so that re-runs skip the fits.

Metrics (``training/metrics.py``): NDCG@10, catalogue coverage, exposure Gini over the
catalogue, long-tail share (items outside the head holding 80 % of the part's training
interactions), and the mean miscalibration KL(p ‖ q̃) of the lists (``training/rerank.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

# bench/ shadows packages of the same name (bench/feature_store.py): import from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
TAIL_SHARES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def fit_pools(dataset: str, settings, train, test, pool_size: int, choice=None, log=print):
    """Fit the hybrid on ``train`` (searching its choices when ``choice`` is None) and return
    the users of ``test`` known in train, their top ``pool_size`` unseen items and scores, the
    item ids, train popularity, the users' train histories and the choice."""
    from training.benchmark import item_vectors, side_data
    from training.candidates import fit_candidate, tune_choice
    from training.hybrid import FitContext
    from training.models import InteractionMatrix, popularity, top_k

    vectors = item_vectors(dataset, settings, train["item_id"].dtype)
    item_ids = np.array(sorted(train["item_id"].unique()), dtype=object)
    matrix = InteractionMatrix.from_frame(train, item_ids=item_ids, weight_col="rating")
    side = side_data(dataset, settings, item_ids, train, vectors, spark=True)
    ctx = FitContext(train, matrix, item_ids, side)
    if choice is None:
        choice = tune_choice(ctx, settings, weight_col="rating", blend=True, log=log)
    start = time.perf_counter()
    scorer, _ = fit_candidate("hybrid", ctx, settings, choice=choice, weight_col="rating", log=log)
    log(f"hybrid fitted in {time.perf_counter() - start:.1f} s")
    users = [u for u in test["user_id"].unique() if u in matrix.user_index]
    rows = np.array([matrix.user_index[u] for u in users], dtype=np.int64)
    x = matrix.matrix[rows]
    scores = np.asarray(scorer.score(x, users), dtype=np.float64)
    raw = scores.copy()
    pool = top_k(scores, x, pool_size)
    pool_scores = np.take_along_axis(raw, pool, axis=1)
    histories = [x.indices[x.indptr[r] : x.indptr[r + 1]].copy() for r in range(x.shape[0])]
    return {
        "users": users,
        "pool": pool,
        "scores": pool_scores,
        "item_ids": item_ids,
        "popularity": popularity(matrix.matrix),
        "histories": histories,
        "choice": choice,
    }


def genre_matrix(dataset: str, settings, item_ids: np.ndarray, dtype) -> np.ndarray:
    from training.benchmark import item_vectors
    from training.rerank import item_genre_matrix

    vectors = item_vectors(dataset, settings, dtype) or {}
    width = len(next(iter(vectors.values()))) if vectors else 1
    return item_genre_matrix(np.array([vectors.get(i, np.zeros(width)) for i in item_ids]))


def score_grid(
    data: dict, relevant: dict, genres: np.ndarray, n_items: int, k: int, strengths, tail_shares
) -> list[dict]:
    """Every (strength, floor) point: re-rank each user's pool, then the metrics."""
    from training.metrics import catalog_coverage, evaluate, exposure_gini, long_tail_share
    from training.rerank import genre_distribution, kl_divergence, long_tail_mask, rerank_rows

    item_ids = data["item_ids"]
    tail = long_tail_mask(data["popularity"])
    pop_map = dict(zip(item_ids, data["popularity"]))
    targets = [genre_distribution(h, genres) for h in data["histories"]]
    rows = []
    seen: set = set()
    for share in tail_shares:
        for strength in strengths:
            key = (0.0, 0.0) if strength == 0 else (strength, share)
            if key in seen:
                continue
            seen.add(key)
            start = time.perf_counter()
            picks = rerank_rows(
                data["pool"],
                data["scores"],
                data["histories"],
                data["users"],
                k,
                strength=strength,
                tail=tail,
                tail_share=share,
                genres=genres,
            )
            lists = {user: list(item_ids[p]) for user, p in zip(data["users"], picks)}
            kls = [kl_divergence(t, genre_distribution(p, genres)) for t, p in zip(targets, picks)]
            acc = evaluate(lists, relevant, k)
            rows.append(
                {
                    "strength": strength,
                    "tail_share": key[1],
                    "ndcg": acc[f"ndcg@{k}"],
                    "coverage": catalog_coverage(lists, n_items, k),
                    "gini": exposure_gini(lists, n_items, k),
                    "long_tail": long_tail_share(lists, pop_map, k),
                    "kl": float(np.mean(kls)),
                    "users": acc["users"],
                    "ms_per_list": 1000 * (time.perf_counter() - start) / max(len(lists), 1),
                }
            )
    return rows


def choose(grids: list[list[dict]], budget: float) -> tuple[float, float]:
    """The (strength, floor) whose smallest relative long-tail gain over the datasets is largest
    among the points within ``budget`` relative NDCG loss of strength 0 on every dataset (ties:
    lower mean KL, then the smaller strength and floor)."""
    keyed = [{(r["strength"], r["tail_share"]): r for r in rows} for rows in grids]
    bases = [g[(0.0, 0.0)] for g in keyed]
    best, best_key = None, None
    for point in keyed[0]:
        rows = [g[point] for g in keyed]
        if any(r["ndcg"] < (1 - budget) * b["ndcg"] for r, b in zip(rows, bases)):
            continue
        gain = min(r["long_tail"] / b["long_tail"] if b["long_tail"] > 0 else np.inf for r, b in zip(rows, bases))
        key = (round(gain, 6), -round(float(np.mean([r["kl"] for r in rows])), 6), -point[0], -point[1])
        if best_key is None or key > best_key:
            best, best_key = point, key
    assert best is not None  # strength 0 is always feasible
    return best


def table(rows: list[dict], base: dict, chosen: dict | None = None) -> str:
    lines = [
        "| strength λ | tail floor | NDCG@10 | Δ NDCG | coverage | exposure Gini | long-tail share | Δ long tail"
        " | miscalibration KL | ms/list |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        is_chosen = chosen is not None and (r["strength"], r["tail_share"]) == (
            chosen["strength"],
            chosen["tail_share"],
        )
        mark = "**" if is_chosen else ""
        d_ndcg = (r["ndcg"] / base["ndcg"] - 1) * 100
        d_tail = (r["long_tail"] / base["long_tail"] - 1) * 100 if base["long_tail"] > 0 else float("inf")
        lines.append(
            f"| {mark}{r['strength']:g}{mark} | {r['tail_share']:g} | {r['ndcg']:.4f} | {d_ndcg:+.1f} % "
            f"| {r['coverage']:.3f} | {r['gini']:.3f} | {r['long_tail']:.4f} | {d_tail:+.0f} % | {r['kl']:.3f} "
            f"| {r['ms_per_list']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="+", help="DATASET[@CONFIG]")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/hyperrec-exposure"))
    parser.add_argument("--budget", type=float, default=0.015, help="validation NDCG loss allowed (relative)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    from core.settings import load_settings
    from pipelines.split import split_fingerprint, u75_split
    from training.benchmark import load_ratings

    k = args.k
    args.cache.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec in args.datasets:
        dataset, _, config = spec.partition("@")
        settings = load_settings(config or None)
        pool_size = settings.serving.exposure_pool
        ratings = load_ratings(dataset, settings)
        train, test = u75_split(ratings)
        val_train, val = u75_split(train)
        tag = Path(dataset).name + ("-" + Path(config).stem if config else "") + f"-p{pool_size}"
        started = time.perf_counter()
        parts = {}
        for part, fit_on, score_on in (("test", train, test), ("val", val_train, val)):
            path = args.cache / f"{tag}-{part}.pkl"
            if path.exists():
                parts[part] = pickle.loads(path.read_bytes())
            else:
                choice = parts["test"]["choice"] if part == "val" else None
                parts[part] = fit_pools(dataset, settings, fit_on, score_on, pool_size, choice=choice)
                path.write_bytes(pickle.dumps(parts[part]))
        dtype = ratings["item_id"].dtype
        runs.append(
            {
                "dataset": dataset,
                "config": config or None,
                "settings": settings,
                "ratings": ratings,
                "test_split": test,
                "val_split": val,
                "parts": parts,
                "genres": {p: genre_matrix(dataset, settings, parts[p]["item_ids"], dtype) for p in parts},
                "fit_seconds": round(time.perf_counter() - started, 1),
            }
        )

    def relevant_of(split, data):
        known = set(data["users"])
        return {u: set(g) for u, g in split.groupby("user_id")["item_id"] if u in known}

    for run in runs:
        data = run["parts"]["val"]
        run["validation"] = score_grid(
            data,
            relevant_of(run["val_split"], data),
            run["genres"]["val"],
            run["ratings"]["item_id"].nunique(),
            k,
            STRENGTHS,
            TAIL_SHARES,
        )
    strength, share = choose([run["validation"] for run in runs], args.budget)
    result = {"choice": {"strength": strength, "tail_share": share, "budget": args.budget}, "datasets": []}
    for run in runs:
        data = run["parts"]["test"]
        grid = [(STRENGTHS, (share,))] + ([((strength,), (0.0,))] if strength > 0 and share > 0 else [])
        rows = []
        for strengths, shares in grid:
            rows += score_grid(
                data,
                relevant_of(run["test_split"], data),
                run["genres"]["test"],
                run["ratings"]["item_id"].nunique(),
                k,
                strengths,
                shares,
            )
        base = rows[0]
        at = next(r for r in rows if (r["strength"], r["tail_share"]) == (strength, share))
        run["test"] = rows
        result["datasets"].append(
            {
                "dataset": run["dataset"],
                "config": run["config"],
                "split_fingerprint": split_fingerprint(run["test_split"]),
                "validation": run["validation"],
                "test": rows,
                "test_ndcg_change": at["ndcg"] / base["ndcg"] - 1,
                "test_long_tail_change": at["long_tail"] / base["long_tail"] - 1 if base["long_tail"] > 0 else None,
                "fit_seconds": run["fit_seconds"],
            }
        )
    result["load_average"] = os.getloadavg()
    chosen = {"strength": strength, "tail_share": share}
    for run, out in zip(runs, result["datasets"]):
        name = run["dataset"] + (f" ({run['config']})" if run["config"] else "")
        print(f"## {name}: validation (u75 of train), budget {args.budget:.1%}")
        print(table(run["validation"], run["validation"][0], chosen))
        print(f"\n## {name}: test (u75), default strength {strength:g}, floor {share:g}")
        print(table(run["test"], run["test"][0], chosen))
        print(
            f"\nat the default: NDCG@10 {out['test_ndcg_change']:+.2%}, long-tail share "
            f"{out['test_long_tail_change']:+.0%}\n"
        )
    print(f"load average {result['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
