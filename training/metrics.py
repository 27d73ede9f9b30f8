"""Top-k accuracy metrics over ranked lists.

Conventions shared by every function: ``recommended`` is a ranked sequence of item
ids (best first) and ``relevant`` a set of held-out item ids for the same user.
Only the first ``k`` recommendations count. Users with no relevant items are
excluded by :func:`evaluate` (their metrics are undefined).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np


def precision_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Share of the top-``k`` that is relevant: |top_k ∩ rel| / k (k, not len(top_k))."""
    return sum(1 for i in recommended[:k] if i in relevant) / k


def recall_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Share of the relevant items found in the top-``k``: |top_k ∩ rel| / |rel|; 0 if rel is empty."""
    if not relevant:
        return 0.0
    return sum(1 for i in recommended[:k] if i in relevant) / len(relevant)


def ndcg_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Binary-relevance NDCG: DCG = Σ_{r=1..k} rel_r / log2(r + 1), divided by the
    ideal DCG of min(k, |rel|) relevant items at the top; 0 if rel is empty."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(recommended[:k]) if i in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(k, len(relevant))))
    return dcg / ideal


def map_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """Average precision at ``k``: Σ_{r: rel_r} P@r / min(k, |rel|); 0 if rel is empty."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for r, i in enumerate(recommended[:k], start=1):
        if i in relevant:
            hits += 1
            total += hits / r
    return total / min(k, len(relevant))


def hit_rate_at_k(recommended: Sequence, relevant: set, k: int) -> float:
    """1 if any of the top-``k`` is relevant, else 0."""
    return 1.0 if any(i in relevant for i in recommended[:k]) else 0.0


METRICS = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "ndcg": ndcg_at_k,
    "map": map_at_k,
    "hit": hit_rate_at_k,
}


def evaluate(
    recommendations: Mapping[object, Sequence], relevant: Mapping[object, Iterable], k: int
) -> dict[str, float]:
    """Mean of every metric in :data:`METRICS` over the users with ≥1 relevant item.

    A user with relevant items but no recommendations scores 0 on every metric.
    Keys are ``"<metric>@<k>"`` plus ``"users"`` (how many users were averaged).
    """
    scores = {name: [] for name in METRICS}
    for user, rel in relevant.items():
        rel = set(rel)
        if not rel:
            continue
        recs = list(recommendations.get(user, ()))
        for name, fn in METRICS.items():
            scores[name].append(fn(recs, rel, k))
    n = len(scores["ndcg"])
    result = {f"{name}@{k}": float(np.mean(v)) if v else 0.0 for name, v in scores.items()}
    result["users"] = n
    return result


def catalog_coverage(recommendations: Mapping[object, Sequence], n_items: int, k: int) -> float:
    """Share of the catalogue appearing in at least one top-``k`` list."""
    if n_items <= 0:
        return 0.0
    shown = {i for recs in recommendations.values() for i in list(recs)[:k]}
    return len(shown) / n_items
