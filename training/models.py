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
from threadpoolctl import threadpool_limits

from core.settings import TrainingSettings

_TRAINING = TrainingSettings()


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
    """``score = x · W + b`` with ``W`` optional (None means bias only; a dense array, or
    scipy CSR for a large catalogue's sparse EASE); the history is scored as given (weights
    included)."""

    kind: ClassVar[str] = "item_item"

    name: str
    bias: np.ndarray
    weights: np.ndarray | sp.csr_matrix | None = None

    def prepare(self, x: sp.csr_matrix | np.ndarray, user_ids: Sequence | None = None) -> sp.csr_matrix:
        """The history rows themselves (float32 CSR); ``user_ids`` is unused."""
        return as_csr(x, np.float32)

    def score_items(self, state: sp.csr_matrix, items: np.ndarray | None = None) -> np.ndarray:
        x = state
        if items is None:
            scores = np.tile(self.bias.astype(np.float32), (x.shape[0], 1))
            if sp.issparse(self.weights):
                scores += (x @ self.weights).toarray()
            elif self.weights is not None:
                scores += np.asarray(x @ self.weights)
            return scores
        items = np.asarray(items, dtype=np.int64)
        bias = np.asarray(self.bias, dtype=np.float32)
        out = np.tile(bias[items], (x.shape[0], 1))
        if self.weights is None:
            return out
        if sp.issparse(self.weights):  # the rows of W of the history items, on ``items`` only
            seen = np.unique(x.indices)
            history = sp.csr_matrix((x.data, np.searchsorted(seen, x.indices), x.indptr), shape=(x.shape[0], len(seen)))
            out += (history @ as_csr(self.weights)[seen][:, items]).toarray()
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


def temporal_gram(frame: pd.DataFrame, item_ids: np.ndarray, window: int = 3) -> sp.csr_matrix:
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
    gram = sp.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsr()
    gram.setdiag(0.0)
    gram.eliminate_zeros()
    return gram


def item_gram(x: sp.csr_matrix) -> sp.csr_matrix:
    """G = XᵀX of the binary interactions ``x > 0``: items × items co-occurrence counts
    (sparse, float64: a catalogue's co-occurrences are far fewer than its item pairs)."""
    binary = sp.csr_matrix((x > 0).astype(np.float64))
    return (binary.T @ binary).tocsr()


def symmetric_inverse(a: np.ndarray, *, overwrite: bool = False) -> np.ndarray:
    """The inverse of the symmetric invertible ``a`` (float64 or float32, kept): by Cholesky
    factorisation, a third of the work of a general inverse, when ``a`` is positive
    definite; otherwise by LU. ``overwrite``: ``a`` may be destroyed (no copy is made)."""
    from scipy.linalg import lapack

    dtype = np.float32 if a.dtype == np.float32 else np.float64
    potrf, potri = (lapack.spotrf, lapack.spotri) if dtype == np.float32 else (lapack.dpotrf, lapack.dpotri)
    # A symmetric C-ordered array is its own Fortran-ordered transpose: no copy needed.
    work = a.T if overwrite and a.dtype == dtype and a.flags.c_contiguous else np.array(a, dtype=dtype, order="F")
    factor, info = potrf(work, lower=0, clean=0, overwrite_a=0)
    if info != 0:  # not positive definite (a temporal term can make it indefinite)
        return np.linalg.inv(work).astype(dtype, copy=False)
    inverse, info = potri(factor, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"symmetric_inverse: the matrix is singular (LAPACK info {info})")
    n, block = inverse.shape[0], 1024
    for lo in range(0, n, block):  # LAPACK fills the upper triangle: mirror it, a block at a time
        hi = min(lo + block, n)
        diag = inverse[lo:hi, lo:hi]
        inverse[lo:hi, lo:hi] = np.triu(diag) + np.triu(diag, 1).T
        inverse[hi:, lo:hi] = inverse[lo:hi, hi:].T
    return inverse


def ease_dual_inverse(x: sp.csr_matrix, lam: float, dtype: type = np.float64) -> np.ndarray:
    """P = (XᵀX + λI)⁻¹ for the binary interactions ``x > 0`` (m users × n items), by the
    Woodbury identity P = (I − Xᵀ(XXᵀ + λI)⁻¹X) / λ: a Cholesky solve of the m × m user Gram
    and one sparse × dense product (m³/3 + nnz·n work instead of the n³ of inverting the item
    Gram), so the cheaper form when users are fewer than items. Exact up to rounding; the m × m
    system is solved in float64 whatever ``dtype`` (the result's precision)."""
    from scipy.linalg import cho_factor, cho_solve

    binary = sp.csr_matrix((x > 0).astype(np.float64))
    m, n = binary.shape
    users = (binary @ binary.T).toarray()
    users[np.diag_indices(m)] += lam
    solved = cho_solve(cho_factor(users, lower=False, overwrite_a=True), binary.toarray(), overwrite_b=True)
    p = np.asarray(binary.T @ solved.astype(dtype, copy=False))  # n × n
    p *= -1.0 / lam
    p[np.diag_indices(n)] += dtype(1.0 / lam)
    return p


def ease_neighbourhoods(a: sp.csr_matrix, m: int) -> np.ndarray:
    """N(j) for every item ``j`` of the symmetric item × item ``a`` (a Gram, co-occurrence
    counts on the diagonal): the ``m`` items ``i ≠ j`` with the largest cosine
    ``a[j, i] / sqrt(a[i, i] · a[j, j])``, ties to the more popular (larger ``a[i, i]``) then
    the lower index; items that never co-occur with ``j`` fill a short row by popularity.
    Items × ``m`` indices, each row ascending."""
    a = sp.csr_matrix(a)
    n = a.shape[0]
    if not 0 <= m <= n - 1:
        raise ValueError(f"ease_neighbourhoods: need 0 <= m <= {n - 1} items, got {m}")
    diag = a.diagonal()
    norm = 1.0 / np.sqrt(np.maximum(diag, 1e-12))
    by_popularity = np.lexsort((np.arange(n), -diag))
    out = np.empty((n, m), dtype=np.int64)
    for j in range(n):
        lo, hi = a.indptr[j], a.indptr[j + 1]
        cols, vals = a.indices[lo:hi], a.data[lo:hi] * norm[a.indices[lo:hi]]  # cosine × sqrt(a[j, j])
        keep = (cols != j) & (vals > 0)
        cols, vals = cols[keep], vals[keep]
        if len(cols) > m:
            kth = np.partition(vals, len(vals) - m)[len(vals) - m]  # the m-th largest link
            tied = cols[vals == kth]
            tied = tied[np.lexsort((tied, -diag[tied]))]
            chosen = np.concatenate([cols[vals > kth], tied])[:m]
        else:
            fill = by_popularity[: m + len(cols) + 1]
            fill = fill[~np.isin(fill, cols) & (fill != j)][: m - len(cols)]
            chosen = np.concatenate([cols, fill])
        out[j] = np.sort(chosen)
    return out


def _batches(neighbours: np.ndarray, max_union: int, max_batch: int) -> list[np.ndarray]:
    """Consecutive items (rows of ``neighbours``) grouped so that each group's items and
    their neighbourhoods number at most ``max_union`` (a group holds at least one item)."""
    n, m = neighbours.shape
    seen = np.zeros(n, dtype=bool)
    groups, start, size = [], 0, 0
    for j in range(n):
        new = neighbours[j][~seen[neighbours[j]]]
        grow = len(new) + (not seen[j])
        if j > start and (size + grow > max_union or j - start >= max_batch):
            groups.append(np.arange(start, j))
            seen[:] = False
            start, size = j, 0
            new, grow = neighbours[j], m + 1
        seen[new] = True
        seen[j] = True
        size += grow
    if n:
        groups.append(np.arange(start, n))
    return groups


def sparse_ease_weights(
    a: sp.csr_matrix, lam: float, neighbours: int, dtype: type = np.float64, max_union: int = 4096
) -> sp.csr_matrix:
    """Neighbourhood-restricted EASE: column ``j`` of W is EASE's column-wise closed form
    ``b_j = (A_{-j,-j} + λI)⁻¹ A_{-j,j}`` restricted to ``N = N(j)`` (:func:`ease_neighbourhoods`
    of ``a``, ``neighbours`` items): ``W[N, j] = (A_NN + λI)⁻¹ A_Nj``, zero elsewhere. ``a`` is
    the symmetric Gram (G or G + β·T, sparse; never densified whole); with N(j) every other
    item this is exact EASE. Solved a group of columns at a time, from the dense block of the
    group's items and neighbourhoods (at most ``max_union`` items). Returns items × items CSR
    float32 with at most ``neighbours`` non-zeros per column."""
    a = sp.csr_matrix(a)
    n = a.shape[0]
    m = min(neighbours, max(n - 1, 0))
    nbrs = ease_neighbourhoods(a, m)
    values = np.zeros((n, m), dtype=dtype)
    step = np.arange(m)
    max_batch = max(1, (1 << 22) // max(m * m, 1))  # at most 4M cells of stacked systems
    with threadpool_limits(1, user_api="blas"):  # threads only slow down many small solves
        for group in _batches(nbrs, max(max_union, m + 1), max_batch):
            union = np.union1d(nbrs[group].ravel(), group)
            block = a[union][:, union].toarray().astype(dtype, copy=False)
            pos, own = np.searchsorted(union, nbrs[group]), np.searchsorted(union, group)
            systems = block[pos[:, :, None], pos[:, None, :]]
            systems[:, step, step] += lam
            values[group] = np.linalg.solve(systems, block[pos, own[:, None]][..., None])[..., 0]
    indptr = np.arange(0, n * m + 1, m) if m else np.zeros(n + 1, dtype=np.int64)
    weights = sp.csc_matrix((values.ravel().astype(np.float32), nbrs.ravel(), indptr), shape=(n, n))
    return weights.tocsr()


def fit_ease(
    x: sp.csr_matrix,
    lam: float = 500.0,
    temporal: sp.spmatrix | np.ndarray | None = None,
    beta: float = 0.0,
    *,
    gram: sp.spmatrix | np.ndarray | None = None,
    dtype: type = np.float64,
    dense_max_items: int | None = _TRAINING.ease_dense_max_items,
    neighbours: int = _TRAINING.ease_neighbours,
) -> ItemItemModel:
    """EASE (Steck 2019): B = I − P·diag(1/diag(P)), P = (G + λI)⁻¹, diag(B) = 0, with
    G = XᵀX on the binary interactions (``gram``: that :func:`item_gram` of ``x``, computed
    once by a caller that fits many λ, β).

    With ``temporal`` (a :func:`temporal_gram`) and ``beta`` > 0, G = XᵀX + β·T: items
    consumed close together in time by the same users count as extra co-occurrence
    (the ``temporal_ease`` variant). ``beta`` = 0 is plain EASE. ``dtype`` is the precision
    of the inverse (float32: half the time, for a validation search).

    Up to ``dense_max_items`` items (None: any number) B is exact and dense; above, W is
    :func:`sparse_ease_weights` with ``neighbours`` items per column (sparse CSR). Dense plain
    EASE on fewer users than items inverts through the users (:func:`ease_dual_inverse`).
    """
    n = x.shape[1]
    if gram is not None and gram.shape != (n, n):
        raise ValueError(f"fit_ease: gram has shape {gram.shape}, expected {(n, n)}")
    if temporal is not None and beta > 0 and temporal.shape != (n, n):
        raise ValueError(f"fit_ease: temporal gram has shape {temporal.shape}, expected {(n, n)}")
    temporal_term = temporal is not None and beta > 0
    name = "temporal_ease" if temporal_term else "ease"
    bias = popularity(x) * 1e-6
    dense = dense_max_items is None or n <= dense_max_items
    if dense and not temporal_term and x.shape[0] < n:
        p = ease_dual_inverse(x, lam, dtype)  # fewer users than items: exact, m³ + nnz·n work
    else:
        g = item_gram(x) if gram is None else gram
        if dense:
            a = g.toarray().astype(dtype, copy=False) if sp.issparse(g) else np.array(g, dtype=dtype)
        else:
            a = sp.csr_matrix(g, dtype=np.float64, copy=True)
        if temporal_term:
            t = sp.coo_matrix(sp.csr_matrix(temporal))  # one entry per cell (duplicates summed)
            if dense:
                a[t.row, t.col] += (beta * t.data).astype(dtype)
            else:
                a = (a + beta * t).tocsr()
        if not dense:
            return ItemItemModel(name, bias=bias, weights=sparse_ease_weights(a, lam, neighbours, dtype))
        a[np.diag_indices_from(a)] += lam
        p = symmetric_inverse(a, overwrite=True)
    p /= -np.diag(p)[None, :]
    np.fill_diagonal(p, 0.0)
    return ItemItemModel(name, bias=bias, weights=p.astype(np.float32, copy=False))


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
