"""Diversity re-ranking by Maximal Marginal Relevance (:func:`mmr`) over content-embedding
or category similarity (:func:`similarity_vectors`), intra-list diversity (the mean
``1 − cosine`` over the pairs of a list), and the exposure-aware re-ranker as served
(:class:`ExposureReranker`: calibration to the user's genre mix under a long-tail exposure
floor; the algorithm is :func:`training.rerank.exposure_rerank`, shared with offline
evaluation). See docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from training.rerank import (
    exposure_rerank,
    genre_distribution,
    item_genre_matrix,
    long_tail_mask,
    ranked_pool,
    user_offset,
)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def category_vectors(categories: Sequence[Sequence[str]]) -> tuple[np.ndarray, list[str]]:
    """Multi-hot item × category matrix and its column labels (sorted)."""
    labels = sorted({c for cats in categories for c in cats})
    index = {c: j for j, c in enumerate(labels)}
    out = np.zeros((len(categories), len(labels)), dtype=np.float32)
    for row, cats in enumerate(categories):
        for c in cats:
            out[row, index[c]] = 1.0
    return out, labels


def similarity_vectors(content: np.ndarray | None, categories: Sequence[Sequence[str]]) -> tuple[np.ndarray, str]:
    """Unit item vectors for :func:`mmr` and the name of their source (``content``/``categories``)."""
    if content is not None:
        return normalize_rows(content), "content"
    return normalize_rows(category_vectors(categories)[0]), "categories"


def mmr(pool: np.ndarray, relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """The ``k`` items of ``pool`` (item indices, any order) picked by MMR, in pick order.

    ``relevance[i]`` belongs to ``pool[i]``; ``vectors`` are unit item vectors (all items).
    """
    if not 0.0 <= diversity <= 1.0:
        raise ValueError(f"diversity must be in [0, 1], got {diversity}")
    pool, relevance = ranked_pool(pool, relevance)
    k = min(k, len(pool))
    if diversity == 0.0 or k <= 1:
        return pool[:k]
    span = relevance.max() - relevance.min()
    rel = (relevance - relevance.min()) / span if span > 0 else np.ones_like(relevance)
    lam = 1.0 - diversity
    sims = vectors[pool] @ vectors[pool].T
    picked = [0]
    max_sim = sims[0].astype(np.float64).copy()
    taken = np.zeros(len(pool), dtype=bool)
    taken[0] = True
    for _ in range(1, k):
        value = lam * rel - (1.0 - lam) * max_sim
        value[taken] = -np.inf
        best = int(np.argmax(value))  # first maximum = the more relevant item
        picked.append(best)
        taken[best] = True
        max_sim = np.maximum(max_sim, sims[best])
    return pool[picked]


def intra_list_diversity(items: Sequence[int] | np.ndarray, vectors: np.ndarray) -> float:
    """Mean pairwise ``1 − cosine`` of ``items`` under ``vectors`` (0 for fewer than two)."""
    picked = np.asarray(items, dtype=np.int64)
    n = len(picked)
    if n < 2:
        return 0.0
    sims = vectors[picked] @ vectors[picked].T
    upper = sims[_pairs(n)]
    return float(np.mean(1.0 - upper))


@lru_cache(maxsize=128)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.triu_indices(n, k=1)`` (read-only), computed once per ``n``."""
    rows, cols = np.triu_indices(n, k=1)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@dataclass(frozen=True)
class ExposureReranker:
    """The exposure-aware re-ranker of one served bundle: ``genres`` is ``p(g | i)``
    (:func:`training.rerank.item_genre_matrix`), ``tail`` the long-tail mask of the bundle's
    training popularity (:func:`training.metrics.long_tail_mask`), ``strength`` and
    ``tail_share`` the settings ``serving.exposure_strength`` / ``exposure_tail_share``."""

    genres: np.ndarray
    tail: np.ndarray
    strength: float
    tail_share: float

    @classmethod
    def of(
        cls, categories: Sequence[Sequence[str]], popularity: np.ndarray, strength: float, tail_share: float
    ) -> ExposureReranker:
        return cls(
            genres=item_genre_matrix(category_vectors(categories)[0]),
            tail=long_tail_mask(popularity),
            strength=strength,
            tail_share=tail_share,
        )

    @property
    def active(self) -> bool:
        return self.strength > 0

    def rerank(self, pool: np.ndarray, relevance: np.ndarray, history: np.ndarray, user_id: str, k: int) -> np.ndarray:
        """The ``k`` items of ``pool`` picked by :func:`training.rerank.exposure_rerank` for
        ``user_id``, calibrated to the genre mix of ``history`` (item indices: training and live
        items; none: the long-tail floor alone)."""
        target = genre_distribution(history, self.genres) if len(history) else None
        return exposure_rerank(
            pool,
            relevance,
            k,
            strength=self.strength,
            tail=self.tail,
            tail_share=self.tail_share,
            genres=self.genres,
            target=target,
            offset=user_offset(user_id),
        )
