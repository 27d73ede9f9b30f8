"""Exposure-aware re-ranking: calibrated lists (Steck 2018) under a long-tail exposure floor.

One algorithm for the serving tier (:mod:`serving.recommender`, through
:mod:`serving.rerank`) and for offline evaluation (``bench/exposure.py``); it lives in
``training/`` because offline evaluation may not import ``serving/``. See docs/models.md,
"Exposure-aware re-ranking".

:func:`exposure_rerank` picks ``k`` items greedily from a candidate pool ranked by relevance
``r`` (min-max scaled to [0, 1] over the pool). With ``S`` the items picked so far and
``q(S)`` their genre distribution, the next pick is

    argmax_{i ∉ S}  (1 − λ) · r_i − λ · KL(p ‖ q̃(S ∪ {i})),   q̃ = (1 − α) · q + α · p

(``λ`` the strength, ``p`` the user's history genre distribution, ``α`` = 0.01 as in Steck's
paper so that KL stays finite), except that once the slots left equal the long-tail items
still owed, only long-tail items are eligible. A list owes ``⌊tail_share · k + o_u⌋`` of them,
``o_u`` in [0, 1) a stable hash of the user id (:func:`user_offset`): an integer
``tail_share · k`` is owed by every list, and a fractional one is met on average over users
(``E⌊x + U⌋ = x``), e.g. ``tail_share`` 0.05 with ``k`` 10 puts one long-tail item in half of
the lists. Ties go to the more relevant item, then the lower item index, so the result is
deterministic. Strength 0 returns the relevance order unchanged (the exposure floor is part
of the re-ranker and off with it).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from training.metrics import long_tail_mask

ALPHA = 0.01
"""Steck's smoothing of the list distribution towards the target (keeps KL finite)."""

__all__ = [
    "ALPHA",
    "exposure_rerank",
    "genre_distribution",
    "item_genre_matrix",
    "kl_divergence",
    "long_tail_mask",
    "rerank_rows",
    "user_offset",
]


def user_offset(user_id: object) -> float:
    """A stable number in [0, 1) for ``user_id`` (the first 8 bytes of the SHA-256 of its text):
    the per-user rounding offset of a fractional long-tail floor, the same in every process."""
    digest = hashlib.sha256(str(user_id).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def item_genre_matrix(multi_hot: np.ndarray) -> np.ndarray:
    """``p(g | i)``: each item's genres, uniformly weighted (rows of the item × genre multi-hot
    matrix divided by their sums; an item without genres gets a zero row)."""
    x = np.asarray(multi_hot, dtype=np.float64)
    sums = x.sum(axis=1, keepdims=True)
    return np.divide(x, sums, out=np.zeros_like(x), where=sums > 0)


def genre_distribution(items: np.ndarray, genres: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``p(g | u) = Σ_i w_i p(g | i) / Σ_i w_i`` over ``items`` (indices into ``genres``, the
    matrix of :func:`item_genre_matrix`), ``w`` 1 unless given; items without genres carry no
    mass. All zeros when no item has a genre."""
    items = np.asarray(items, dtype=np.int64)
    w = np.ones(len(items)) if weights is None else np.asarray(weights, dtype=np.float64)
    mass = w @ genres[items] if len(items) else np.zeros(genres.shape[1])
    total = mass.sum()
    return mass / total if total > 0 else np.zeros(genres.shape[1])


def kl_divergence(p: np.ndarray, q: np.ndarray, alpha: float = ALPHA) -> float:
    """Steck's miscalibration ``KL(p ‖ q̃) = Σ_g p_g log(p_g / q̃_g)``, ``q̃ = (1 − α) q + α p``
    (natural log; genres with ``p_g = 0`` add nothing); 0 when ``p`` is all zeros."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    mask = p > 0
    if not mask.any():
        return 0.0
    smoothed = (1 - alpha) * q[mask] + alpha * p[mask]
    return float(np.sum(p[mask] * np.log(p[mask] / smoothed)))


def ranked_pool(pool: np.ndarray, relevance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pool`` (item indices) and its ``relevance`` sorted best first, ties to the lower item
    index: the order every re-ranker starts from."""
    pool = np.asarray(pool, dtype=np.int64)
    relevance = np.asarray(relevance, dtype=np.float64)
    order = np.lexsort((pool, -relevance))
    return pool[order], relevance[order]


def exposure_rerank(
    pool: np.ndarray,
    relevance: np.ndarray,
    k: int,
    *,
    strength: float,
    tail: np.ndarray,
    tail_share: float,
    genres: np.ndarray | None = None,
    target: np.ndarray | None = None,
    offset: float = 0.0,
    alpha: float = ALPHA,
) -> np.ndarray:
    """The ``k`` items of ``pool`` (item indices, any order; ``relevance[i]`` belongs to
    ``pool[i]``) in pick order, by the greedy rule of this module's docstring.

    ``strength`` is λ in [0, 1]; ``tail`` is the long-tail mask over all items
    (:func:`long_tail_mask`); ``tail_share`` in [0, 1] the floor on the share of
    long-tail items (the list owes ``⌊tail_share · k + offset⌋``, ``offset`` the user's
    :func:`user_offset`; met whenever the pool holds enough of them); ``genres`` the
    :func:`item_genre_matrix` and ``target`` the user's :func:`genre_distribution` (either
    None, or an all-zero target: no calibration term, only the floor).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not 0.0 <= tail_share <= 1.0:
        raise ValueError(f"tail_share must be in [0, 1], got {tail_share}")
    if not 0.0 <= offset < 1.0:
        raise ValueError(f"offset must be in [0, 1), got {offset}")
    pool, relevance = ranked_pool(pool, relevance)
    k = min(k, len(pool))
    if strength == 0.0 or k == 0:
        return pool[:k]
    span = relevance.max() - relevance.min()
    rel = (relevance - relevance.min()) / span if span > 0 else np.ones_like(relevance)
    is_tail = np.asarray(tail, dtype=bool)[pool]
    owed = math.floor(tail_share * k + offset + 1e-9)
    calibrate = genres is not None and target is not None and bool(np.any(np.asarray(target) > 0))
    if calibrate:
        p = np.asarray(target, dtype=np.float64)
        mask = p > 0
        p_m = p[mask]
        g_pool = np.asarray(genres, dtype=np.float64)[pool][:, mask]
        q_sum = np.zeros(int(mask.sum()))
    taken = np.zeros(len(pool), dtype=bool)
    picked: list[int] = []
    tail_picked = 0
    for step in range(k):
        eligible = ~taken
        if owed - tail_picked >= k - step and np.any(eligible & is_tail):
            eligible &= is_tail
        value = (1.0 - strength) * rel
        if calibrate:
            q = (q_sum[None, :] + g_pool) / (step + 1)
            smoothed = (1 - alpha) * q + alpha * p_m[None, :]
            value = value - strength * np.sum(p_m[None, :] * np.log(p_m[None, :] / smoothed), axis=1)
        value = np.where(eligible, value, -np.inf)
        best = int(np.argmax(value))  # first maximum = the more relevant item
        picked.append(best)
        taken[best] = True
        tail_picked += int(is_tail[best])
        if calibrate:
            q_sum += g_pool[best]
    return pool[picked]


def rerank_rows(
    pools: np.ndarray,
    scores: np.ndarray,
    histories: list[np.ndarray],
    users: list,
    k: int,
    *,
    strength: float,
    tail: np.ndarray,
    tail_share: float,
    genres: np.ndarray | None,
) -> list[np.ndarray]:
    """:func:`exposure_rerank` per user, as offline evaluation applies it: row ``u`` of ``pools``
    (item indices) and ``scores`` (their relevance) is user ``u``'s candidate pool, calibrated
    to the genres of ``histories[u]`` (item indices; as serving calibrates to the user's history),
    with the floor's offset of ``users[u]`` (the user id, :func:`user_offset`)."""
    out = []
    for pool, relevance, history, user in zip(pools, scores, histories, users):
        target = genre_distribution(history, genres) if genres is not None and len(history) else None
        out.append(
            exposure_rerank(
                pool,
                relevance,
                k,
                strength=strength,
                tail=tail,
                tail_share=tail_share,
                genres=genres,
                target=target,
                offset=user_offset(user),
            )
        )
    return out
