"""Content-based recommender: a user's profile is the (idf-)weighted mean of the content
embeddings of their history items, an item's score the cosine between profile and item
embedding. See docs/models.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.models import as_csr, rows_dot, top_k

Weighting = Literal["idf", "none"]


def _l2_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


@dataclass
class ContentModel:
    """Normalised item embeddings (n_items×dim) and per-item profile weights (idf or ones)."""

    item_embeddings: np.ndarray
    item_weights: np.ndarray
    name: str = "content"
    _vectors: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def profiles(self, x: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Unit-norm user profiles (rows of ``x``×dim); all-zero for empty histories."""
        if sp.issparse(x) and x.shape[0] == 1 and x.shape[1] == self.item_embeddings.shape[0]:
            return self._row_profile(as_csr(x))[None, :]
        x = sp.csr_matrix(x, dtype=np.float64)
        if x.shape[1] != self.item_embeddings.shape[0]:
            raise ValueError(f"history has {x.shape[1]} item columns, the model {self.item_embeddings.shape[0]} items")
        weighted = x.multiply(self.item_weights[None, :]).tocsr()
        weighted.data = np.clip(weighted.data, 0.0, None)  # negative feedback does not pull the profile
        total = np.asarray(weighted.sum(axis=1)).ravel()
        mean = np.asarray(weighted @ self.item_embeddings)
        mean = np.divide(mean, total[:, None], out=np.zeros_like(mean), where=total[:, None] > 0)
        return _l2_rows(mean)

    def _row_profile(self, x: sp.csr_matrix) -> np.ndarray:
        """:meth:`profiles` of one row computed on its items only (the per-request path)."""
        idx = x.indices
        w = np.clip(x.data.astype(np.float64) * np.asarray(self.item_weights, dtype=np.float64)[idx], 0.0, None)
        total = w.sum()
        if total <= 0:
            return np.zeros(self.item_embeddings.shape[1])
        mean = (w @ np.asarray(self.item_embeddings[idx], dtype=np.float64)) / total
        norm = np.linalg.norm(mean)
        return mean / norm if norm > 0 else mean

    def item_vectors(self) -> np.ndarray:
        """The normalised item embeddings as float32 (computed once, read-only)."""
        if self._vectors is None:
            self._vectors = np.asarray(self.item_embeddings, dtype=np.float32)
            if self._vectors is not self.item_embeddings:
                self._vectors.flags.writeable = False
        return self._vectors

    def score_profiles(self, profiles: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """Cosine scores of user ``profiles`` (:meth:`profiles`) on the item indices ``items``
        (None: every item) as float32."""
        if items is None:
            return (profiles @ self.item_embeddings.T).astype(np.float32)
        return rows_dot(profiles.astype(np.float32), self.item_vectors()[np.asarray(items, dtype=np.int64)])

    def score(self, x: sp.csr_matrix | np.ndarray) -> np.ndarray:
        """Cosine scores (rows of ``x``×n_items) for any history rows, so cold users with
        only session events are scored too."""
        return self.score_profiles(self.profiles(x))

    def recommend(self, x: sp.csr_matrix, k: int, exclude_seen: bool = True) -> np.ndarray:
        """Top-``k`` item indices per row of ``x``, best first; seen items excluded."""
        return top_k(self.score(x), x if exclude_seen else None, k)


def fit_content(x: sp.csr_matrix, item_embeddings: np.ndarray, *, weighting: Weighting = "idf") -> ContentModel:
    """Content model over ``item_embeddings`` (row ``i`` = item column ``i`` of ``x``). With
    ``weighting="idf"`` a history item weighs ``log((1 + n_users) / (1 + df_i)) + 1`` (sklearn's
    smoothed idf over the users of ``x``), so blockbusters shape a profile less than niche items."""
    x = sp.csr_matrix(x)
    emb = np.asarray(item_embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != x.shape[1]:
        raise ValueError(f"item embeddings shape {emb.shape} does not match {x.shape[1]} item columns")
    if not np.isfinite(emb).all():
        bad = int(np.argwhere(~np.isfinite(emb))[0, 0])
        raise ValueError(f"item embedding row {bad} holds a non-finite value")
    if weighting == "idf":
        df = np.asarray((x > 0).sum(axis=0)).ravel().astype(np.float64)
        weights = np.log((1.0 + x.shape[0]) / (1.0 + df)) + 1.0
    elif weighting == "none":
        weights = np.ones(x.shape[1])
    else:
        raise ValueError(f"unknown weighting {weighting!r}: expected 'idf' or 'none'")
    return ContentModel(item_embeddings=_l2_rows(emb), item_weights=weights)


def item_embeddings_for(item_ids: np.ndarray, items: pd.DataFrame, embeddings: np.ndarray) -> np.ndarray:
    """Rows of ``embeddings`` (aligned with ``items``) reordered to ``item_ids``; ids compare as
    text, and items without a row get zeros (they then score 0)."""
    if len(items) != len(embeddings):
        raise ValueError(f"{len(items)} item rows but {len(embeddings)} embeddings")
    index = {str(i): r for r, i in enumerate(items["item_id"])}
    out = np.zeros((len(item_ids), embeddings.shape[1]), dtype=np.float32)
    rows = np.array([index.get(str(i), -1) for i in item_ids], dtype=np.int64)
    known = rows >= 0
    out[known] = embeddings[rows[known]]
    return out
