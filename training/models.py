"""Item-based recommenders and the one scoring interface every recommender implements.

:class:`Scorer` is that interface (components, the weighted blend, item-item models);
:class:`ItemItemModel` scores ``x_u · W + b`` (``W`` absent for popularity). See
docs/models.md for the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass(frozen=True)
class RetrievalSpace:
    """The item side of a scorer's inner-product space: its score of item ``i`` for a user
    is ``query · vectors[i] (+ bias[i])`` with the user's :meth:`Scorer.query` vector."""

    source: str
    vectors: np.ndarray
    bias: np.ndarray | None = None


def as_csr(x: sp.csr_matrix | np.ndarray, dtype: type | None = None) -> sp.csr_matrix:
    """``x`` as a CSR matrix (of ``dtype`` when given), without a new object when it is one
    already (building one costs as much as scoring a candidate set)."""
    if isinstance(x, sp.csr_matrix) and (dtype is None or x.dtype == dtype):
        return x
    return sp.csr_matrix(x, dtype=dtype)


class Scorer:
    """The scoring interface of every recommender (a blend component, the blend itself, an
    item-item model).

    ``prepare(x, user_ids)`` computes everything about the users of the history rows ``x``
    (users × items, interaction weights; ``user_ids`` None or None entries = unknown users)
    that does not depend on which items are scored; ``score_items(state, items)`` scores
    those users on the item indices ``items`` (None: every item) as a rows × items float32
    array. :meth:`score` is the two in one. A scorer with an inner-product space
    (:meth:`retrieval_space`, :meth:`query`) can have its candidates retrieved by ANN search;
    ``retrieval_rank`` orders such spaces by preference (lower first; None: none offered).
    """

    kind: ClassVar[str] = "scorer"
    retrieval_rank: ClassVar[int | None] = None

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def score_items(self, state: Any, items: np.ndarray | None = None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def score(self, x: sp.csr_matrix | np.ndarray, user_ids: Sequence | None = None) -> np.ndarray:
        """Scores (rows of ``x`` × every item) of the history rows ``x`` of ``user_ids``."""
        return self.score_items(self.prepare(x, user_ids))

    def retrieval_space(self) -> RetrievalSpace | None:
        """The item side of this scorer's inner-product space; None when it has none."""
        return None

    def query(self, state: Any) -> np.ndarray | None:
        """The users' vectors (rows × dim, float32) in :meth:`retrieval_space`; None without one."""
        return None

    def segment_of(self, user_id: Any) -> str | None:
        """The segment whose fine-tuned model scores ``user_id``; None when no such model does."""
        return None

    def segment_labels(self) -> list[str]:
        """The segments that have a model of their own."""
        return []

    def quantized(self) -> Scorer:
        """This scorer for CPU serving with INT8 layers (itself when it has none to quantize)."""
        return self

    def is_quantized(self) -> bool:
        return False


def rows_dot(users: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``users`` (rows × dim) times ``vectors`` (items × dim)ᵀ as float32, one matrix-vector
    product per row, so a row's scores do not depend on the other rows of the batch."""
    out = np.empty((len(users), len(vectors)), dtype=np.float32)
    for r, user in enumerate(users):
        out[r] = vectors @ user
    return out


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
    ) -> InteractionMatrix:
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
class ItemItemModel(Scorer):
    """``score = x · W + b`` with ``W`` optional (None means bias only); the history is
    scored as given (weights included)."""

    kind: ClassVar[str] = "item_item"

    name: str
    bias: np.ndarray
    weights: np.ndarray | None = None

    def prepare(self, x: sp.csr_matrix | np.ndarray, user_ids: Sequence | None = None) -> sp.csr_matrix:
        """The history rows themselves (float32 CSR); ``user_ids`` is unused."""
        return as_csr(x, np.float32)

    def score_items(self, state: sp.csr_matrix, items: np.ndarray | None = None) -> np.ndarray:
        x = state
        if items is None:
            scores = np.tile(self.bias.astype(np.float32), (x.shape[0], 1))
            if self.weights is not None:
                scores += np.asarray(x @ self.weights)
            return scores
        items = np.asarray(items, dtype=np.int64)
        bias = np.asarray(self.bias, dtype=np.float32)
        out = np.tile(bias[items], (x.shape[0], 1))
        if self.weights is None:
            return out
        weights = np.asarray(self.weights, dtype=np.float32)
        for r in range(x.shape[0]):  # only the rows of W of the user's history items
            lo, hi = x.indptr[r], x.indptr[r + 1]
            if hi == lo:
                continue
            idx, val = x.indices[lo:hi].astype(np.int64), x.data[lo:hi].astype(np.float32)
            if len(bias) <= 8 * len(items):  # whole rows: contiguous reads beat a scattered gather
                out[r] += (val @ weights[idx])[items]
            else:
                out[r] += val @ weights[np.ix_(idx, items)]
        return out

    def recommend(self, x: sp.csr_matrix, k: int, exclude_seen: bool = True) -> np.ndarray:
        """Top-``k`` item indices per row of ``x``, best first; seen items excluded."""
        return top_k(self.score(x), x if exclude_seen else None, k)


def top_k(scores: np.ndarray, seen: sp.csr_matrix | None, k: int) -> np.ndarray:
    """Top-``k`` column indices per row of ``scores`` (users×items), best first.

    Items stored in ``seen`` (same shape) are excluded; ties keep the lower index first.
    ``scores`` is modified in place when ``seen`` is given.
    """
    if seen is not None:
        seen = sp.csr_matrix(seen)
        if seen.shape != scores.shape:
            raise ValueError(f"top_k: history shape {seen.shape} does not match scores shape {scores.shape}")
        rows = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
        scores[rows, seen.indices] = -np.inf
    k = min(k, scores.shape[1])
    if k <= 0:
        return np.empty((scores.shape[0], 0), dtype=np.int64)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top.sort(axis=1)
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


def temporal_gram(frame: pd.DataFrame, item_ids: np.ndarray, window: int = 3) -> np.ndarray:
    """Item×item temporal co-occurrence: for every user's interactions ordered by
    (timestamp, item_id), items ``d`` positions apart (1 ≤ d ≤ ``window``) add ``1/d`` to
    both symmetric cells. Items outside ``item_ids`` are ignored; the diagonal is zero.
    Needs columns user_id, item_id, timestamp.
    """
    if window < 1:
        raise ValueError(f"temporal_gram: window must be >= 1, got {window}")
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in frame.columns]
    if missing:
        raise ValueError(f"temporal_gram: frame lacks column(s) {missing}")
    index = {item: i for i, item in enumerate(item_ids)}
    ordered = frame.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    items = ordered["item_id"].map(index)
    keep = items.notna().to_numpy()
    users = ordered["user_id"].to_numpy()[keep]
    items = items.to_numpy()[keep].astype(np.int64)
    n = len(item_ids)
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        same = users[:-d] == users[d:]
        a, b = items[:-d][same], items[d:][same]
        rows += [a, b]
        cols += [b, a]
        vals += [np.full(2 * len(a), 1.0 / d)]
    gram = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).toarray()
    np.fill_diagonal(gram, 0.0)
    return gram


def fit_ease(
    x: sp.csr_matrix, lam: float = 500.0, temporal: np.ndarray | None = None, beta: float = 0.0
) -> ItemItemModel:
    """EASE (Steck 2019): B = I − P·diag(1/diag(P)), P = (G + λI)⁻¹, diag(B) = 0, with
    G = XᵀX on the binary interactions.

    With ``temporal`` (a :func:`temporal_gram`) and ``beta`` > 0, G = XᵀX + β·T: items
    consumed close together in time by the same users count as extra co-occurrence
    (the ``temporal_ease`` variant). ``beta`` = 0 is plain EASE.
    """
    binary = (x > 0).astype(np.float64)
    gram = np.asarray((binary.T @ binary).todense())
    name = "ease"
    if temporal is not None and beta > 0:
        if temporal.shape != gram.shape:
            raise ValueError(f"fit_ease: temporal gram has shape {temporal.shape}, expected {gram.shape}")
        gram = gram + beta * temporal
        name = "temporal_ease"
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return ItemItemModel(name, bias=popularity(x) * 1e-6, weights=b.astype(np.float32))


def fit_segment_popularity(x: sp.csr_matrix, segment_of_row: np.ndarray) -> dict[int, np.ndarray]:
    """Per-segment :func:`popularity`: for each segment in ``segment_of_row`` (one label per
    row of ``x``), the per-item count of its users who interacted, scaled to [0, 1] by the
    segment's maximum. A segment whose rows hold no interaction gets the global popularity."""
    x = sp.csr_matrix(x)
    segments = np.asarray(segment_of_row)
    if segments.shape != (x.shape[0],):
        raise ValueError(f"segment_of_row has shape {segments.shape}; expected one label per row ({x.shape[0]},)")
    global_pop = popularity(x)
    out: dict[int, np.ndarray] = {}
    for segment in np.unique(segments):
        rows = x[segments == segment]
        out[int(segment)] = popularity(rows) if rows.nnz else global_pop.copy()
    return out


def segment_popularity_model(per_segment: dict[int, np.ndarray], segment: int, fallback: np.ndarray) -> ItemItemModel:
    """The most-popular list of ``segment`` as an :class:`ItemItemModel` (bias only);
    ``fallback`` (e.g. the global :func:`popularity`) when the segment is unknown."""
    bias = per_segment.get(int(segment), fallback)
    return ItemItemModel(f"popularity_segment_{int(segment)}", bias=np.asarray(bias, dtype=np.float32))
