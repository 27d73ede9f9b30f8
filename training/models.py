"""Item-based recommenders that share one serving form: ``score(u) = x_u · W + b``.

``x_u`` is the user's row of the interaction matrix (confidence weights), ``W`` an
item×item weight matrix (absent for popularity) and ``b`` a per-item bias. The
serving tier and the MLflow pyfunc both score through :class:`ItemItemModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class InteractionMatrix:
    """A users×items CSR matrix with the id ↔ index maps that produced it."""

    matrix: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    user_index: dict = field(repr=False)
    item_index: dict = field(repr=False)

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        item_ids: np.ndarray | None = None,
        weight_col: str | None = None,
    ) -> "InteractionMatrix":
        """Build from ``user_id``/``item_id`` columns; repeated pairs are summed.

        ``item_ids`` fixes the item axis (unknown items are dropped); by default it is
        every item in ``frame``, sorted.
        """
        if item_ids is None:
            item_ids = np.array(sorted(frame["item_id"].unique()), dtype=object)
        item_index = {item: i for i, item in enumerate(item_ids)}
        cols = frame["item_id"].map(item_index)
        keep = cols.notna().to_numpy()
        frame = frame[keep]
        cols = cols[keep].astype(np.int64).to_numpy()
        user_ids = np.array(sorted(frame["user_id"].unique()), dtype=object)
        user_index = {user: u for u, user in enumerate(user_ids)}
        rows = frame["user_id"].map(user_index).to_numpy(dtype=np.int64)
        values = frame[weight_col].to_numpy(dtype=np.float32) if weight_col else np.ones(len(frame), np.float32)
        matrix = sp.csr_matrix((values, (rows, cols)), shape=(len(user_ids), len(item_ids)), dtype=np.float32)
        matrix.sum_duplicates()
        return cls(matrix, user_ids, np.asarray(item_ids, dtype=object), user_index, item_index)


@dataclass
class ItemItemModel:
    """``score = x · W + b`` with ``W`` optional (None means bias only)."""

    name: str
    bias: np.ndarray
    weights: np.ndarray | None = None

    def score(self, x: sp.csr_matrix | np.ndarray) -> np.ndarray:
        x = sp.csr_matrix(x, dtype=np.float32)
        scores = np.tile(self.bias.astype(np.float32), (x.shape[0], 1))
        if self.weights is not None:
            scores += np.asarray(x @ self.weights)
        return scores

    def recommend(self, x: sp.csr_matrix, k: int, exclude_seen: bool = True) -> np.ndarray:
        """Top-``k`` item indices per row of ``x``, best first; seen items excluded."""
        scores = self.score(x)
        if exclude_seen:
            x = sp.csr_matrix(x)
            rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
            scores[rows, x.indices] = -np.inf
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1)


def popularity(x: sp.csr_matrix) -> np.ndarray:
    """Per-item count of users who interacted, scaled to [0, 1]."""
    counts = np.asarray((x > 0).sum(axis=0)).ravel().astype(np.float32)
    return counts / max(counts.max(), 1.0)


def fit_popularity(x: sp.csr_matrix) -> ItemItemModel:
    """Most-popular baseline: the same list for everyone."""
    return ItemItemModel("popularity", bias=popularity(x))


def fit_item_knn(x: sp.csr_matrix, neighbours: int = 50) -> ItemItemModel:
    """Item-kNN: cosine similarity between item columns, each item keeping its
    ``neighbours`` most similar items; the diagonal is zero."""
    binary = (x > 0).astype(np.float32)
    norms = np.sqrt(np.asarray(binary.multiply(binary).sum(axis=0)).ravel())
    norms[norms == 0] = 1.0
    gram = np.asarray((binary.T @ binary).todense(), dtype=np.float32)
    sim = gram / norms[:, None] / norms[None, :]
    np.fill_diagonal(sim, 0.0)
    n = sim.shape[0]
    if neighbours < n:
        cutoff = np.partition(sim, n - neighbours, axis=0)[n - neighbours]
        sim[sim < cutoff[None, :]] = 0.0
    # A tiny popularity bias breaks ties between equally similar items.
    return ItemItemModel("item_knn", bias=popularity(x) * 1e-6, weights=sim)


def fit_ease(x: sp.csr_matrix, lam: float = 500.0) -> ItemItemModel:
    """EASE (Steck 2019): B = I − P·diag(1/diag(P)), P = (XᵀX + λI)⁻¹, diag(B) = 0."""
    binary = (x > 0).astype(np.float64)
    gram = np.asarray((binary.T @ binary).todense())
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return ItemItemModel("ease", bias=popularity(x) * 1e-6, weights=b.astype(np.float32))
