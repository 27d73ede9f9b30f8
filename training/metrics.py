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


# --------------------------------------------------------------------------- beyond accuracy
# Shared conventions: ``recommendations`` maps user → ranked items (only the first ``k``
# count); ``popularity`` maps item → the share of training users who interacted with it.


def _exposure(recommendations: Mapping[object, Sequence], k: int) -> dict:
    counts: dict = {}
    for recs in recommendations.values():
        for item in list(recs)[:k]:
            counts[item] = counts.get(item, 0) + 1
    return counts


def intra_list_diversity(
    recommendations: Mapping[object, Sequence], item_vectors: Mapping[object, np.ndarray], k: int
) -> float:
    """Mean over users of the mean pairwise cosine distance (1 − cos) between the top-``k``
    items' vectors. Items without a vector (or a zero vector) are skipped; lists with
    fewer than two usable items are left out. 0 when no list qualifies."""
    per_user = []
    for recs in recommendations.values():
        vectors = [np.asarray(item_vectors[i], dtype=float) for i in list(recs)[:k] if i in item_vectors]
        vectors = [v / np.linalg.norm(v) for v in vectors if np.linalg.norm(v) > 0]
        if len(vectors) < 2:
            continue
        m = np.vstack(vectors)
        sim = m @ m.T
        n = len(vectors)
        per_user.append(float((n * n - sim.sum()) / (n * (n - 1))))  # mean of 1 − cos over ordered pairs i ≠ j
    return float(np.mean(per_user)) if per_user else 0.0


def novelty(recommendations: Mapping[object, Sequence], popularity: Mapping[object, float], k: int) -> float:
    """Mean self-information −log2 p(i) of recommended items, p(i) the item's share of
    training users (higher means less obvious). Items with p = 0 are left out."""
    values = [
        -math.log2(popularity[i])
        for recs in recommendations.values()
        for i in list(recs)[:k]
        if popularity.get(i, 0) > 0
    ]
    return float(np.mean(values)) if values else 0.0


def exposure_entropy(recommendations: Mapping[object, Sequence], n_items: int, k: int) -> float:
    """Shannon entropy of how exposures (list slots) spread over items, divided by
    log2(n_items): 1 when every catalogue item is shown equally often, 0 when one item
    takes every slot."""
    counts = np.array(list(_exposure(recommendations, k).values()), dtype=float)
    if counts.sum() == 0 or n_items <= 1:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum() / math.log2(n_items))


def mean_popularity_percentile(
    recommendations: Mapping[object, Sequence], popularity: Mapping[object, float], k: int
) -> float:
    """Mean popularity percentile of recommended items: an item's percentile is the share
    of catalogue items (keys of ``popularity``) strictly less popular than it; 1 means
    only the most popular items are recommended (popularity bias)."""
    ordered = np.sort(np.array(list(popularity.values()), dtype=float))
    if not len(ordered):
        return 0.0
    values = [
        np.searchsorted(ordered, popularity.get(i, 0.0), side="left") / len(ordered)
        for recs in recommendations.values()
        for i in list(recs)[:k]
    ]
    return float(np.mean(values)) if values else 0.0


def exposure_gini(recommendations: Mapping[object, Sequence], n_items: int, k: int) -> float:
    """Gini coefficient of exposure counts over the whole catalogue (unshown items count
    0): 0 when exposure is spread evenly, towards 1 when a few items take all slots."""
    counts = np.zeros(max(n_items, 1))
    exposure = list(_exposure(recommendations, k).values())
    counts[: len(exposure)] = sorted(exposure)
    counts = np.sort(counts)
    total = counts.sum()
    if total == 0:
        return 0.0
    n = len(counts)
    ranks = np.arange(1, n + 1)
    return float((2 * (ranks * counts).sum()) / (n * total) - (n + 1) / n)


HEAD_SHARE = 0.8
"""Share of training interactions held by the head; the rest of the catalogue is the long tail."""


def long_tail_mask(popularity: np.ndarray, head_share: float = HEAD_SHARE) -> np.ndarray:
    """Boolean mask of long-tail items given per-item training popularity (interaction counts
    or any positive multiple of them, e.g. :func:`training.models.popularity`).

    Definition (the short-head/long-tail split of Abdollahpouri et al. 2017 and Celma 2010):
    sort items by popularity, most popular first (ties: lower index first); the head is the
    shortest prefix whose popularity sums to at least ``head_share`` (default 80 %) of the
    total, and every other item, including items never interacted with, is long tail. All
    items are long tail when the total is 0. ``head_share`` must lie in (0, 1].
    """
    if not 0.0 < head_share <= 1.0:
        raise ValueError(f"head_share must be in (0, 1], got {head_share}")
    pop = np.asarray(popularity, dtype=np.float64)
    tail = np.ones(len(pop), dtype=bool)
    total = pop.sum()
    if total <= 0:
        return tail
    order = np.lexsort((np.arange(len(pop)), -pop))
    cumulative = np.cumsum(pop[order])
    n_head = int(np.searchsorted(cumulative, head_share * total * (1 - 1e-12), side="left")) + 1
    tail[order[:n_head]] = False
    return tail


def long_tail_share(
    recommendations: Mapping[object, Sequence],
    popularity: Mapping[object, float],
    k: int,
    head_share: float = HEAD_SHARE,
) -> float:
    """Share of all exposure slots (the top-``k`` of every list, each slot counted once) that
    go to long-tail items. The long tail is :func:`long_tail_mask` over the catalogue of
    ``popularity`` (item → training popularity; items outside the 80 % head of training
    interactions); recommended items missing from ``popularity`` (never seen in training)
    count as long tail. 0 when no list has an item."""
    items = list(popularity)
    tail_items = {i for i, t in zip(items, long_tail_mask(np.array([popularity[i] for i in items]), head_share)) if t}
    slots = [i for recs in recommendations.values() for i in list(recs)[:k]]
    if not slots:
        return 0.0
    return sum(1 for i in slots if i in tail_items or i not in popularity) / len(slots)


def beyond_accuracy(
    recommendations: Mapping[object, Sequence],
    *,
    n_items: int,
    popularity: Mapping[object, float],
    item_vectors: Mapping[object, np.ndarray] | None,
    k: int,
) -> dict[str, float]:
    """Coverage, intra-list diversity (when item vectors are given), novelty, exposure
    entropy, mean popularity percentile, exposure Gini and long-tail share, keyed ``"<name>@<k>"``."""
    result = {
        f"coverage@{k}": catalog_coverage(recommendations, n_items, k),
        f"novelty@{k}": novelty(recommendations, popularity, k),
        f"entropy@{k}": exposure_entropy(recommendations, n_items, k),
        f"popularity_percentile@{k}": mean_popularity_percentile(recommendations, popularity, k),
        f"gini@{k}": exposure_gini(recommendations, n_items, k),
        f"long_tail@{k}": long_tail_share(recommendations, popularity, k),
    }
    if item_vectors is not None:
        result[f"diversity@{k}"] = intra_list_diversity(recommendations, item_vectors, k)
    return result


def evaluate_by_segment(
    recommendations: Mapping[object, Sequence],
    relevant: Mapping[object, Iterable],
    segment_of: Mapping[object, object],
    k: int,
    *,
    n_items: int | None = None,
) -> dict:
    """:func:`evaluate` within each segment, plus fairness gaps.

    ``segment_of`` maps user → segment; users without one are left out.
    Returns ``{"segments": {seg: metrics}, "gap": {metric: best − worst over segments}}``;
    with ``n_items`` each segment also gets ``coverage@k`` (:func:`catalog_coverage` of that
    segment's lists). The gap of a single segment is 0.
    """
    groups: dict[object, list] = {}
    for user in relevant:
        if user in segment_of:
            groups.setdefault(segment_of[user], []).append(user)
    per_segment = {}
    for segment, users in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rel = {u: relevant[u] for u in users}
        result = evaluate(recommendations, rel, k)
        if n_items is not None:
            result[f"coverage@{k}"] = catalog_coverage({u: recommendations.get(u, ()) for u in users}, n_items, k)
        per_segment[str(segment)] = result
    names = [f"{m}@{k}" for m in METRICS] + ([f"coverage@{k}"] if n_items is not None else [])
    gap = {
        name: (max(r[name] for r in per_segment.values()) - min(r[name] for r in per_segment.values()))
        if per_segment
        else 0.0
        for name in names
    }
    return {"segments": per_segment, "gap": gap}
