"""Candidate retrieval for serving: a faiss inner-product ANN index (:class:`AnnIndex`) over
the served model's retrieval space (:meth:`training.models.Scorer.retrieval_space`), and the
rule (:func:`candidate_items`) choosing which items the model scores. Scoring is the model's
own (:class:`CandidateScorer`); this module knows no component class. See docs/models.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from training.hybrid import HybridState, WeightedHybrid

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200


class CandidateScorer:
    """One user's scores on candidate items, through the served model's own scoring."""

    def __init__(self, model: WeightedHybrid) -> None:
        self.model = model

    def prepare(self, x: sp.csr_matrix, user_id: str | None) -> HybridState:
        """Everything about the user of history row ``x`` that does not depend on the candidates."""
        return self.model.prepare(x, [user_id])

    def score(self, state: HybridState, items: np.ndarray) -> np.ndarray:
        """The model's scores of ``items`` for the prepared user (float32)."""
        return self.model.score_items(state, np.asarray(items, dtype=np.int64))[0]


@dataclass
class ItemSpace:
    """The vectors of the ANN index (the retrieval space's item vectors, with the item bias
    as an extra column when it has one) and how a prepared user queries them."""

    source: str
    vectors: np.ndarray
    model: WeightedHybrid
    biased: bool

    @classmethod
    def of(cls, model: WeightedHybrid) -> ItemSpace | None:
        space = model.retrieval_space()
        if space is None:
            return None
        biased = space.bias is not None
        vectors = np.hstack([space.vectors, space.bias[:, None]]) if space.bias is not None else space.vectors
        return cls(space.source, np.ascontiguousarray(vectors, dtype=np.float32), model, biased)

    @property
    def item_vectors(self) -> np.ndarray:
        """The item vectors without the bias column."""
        return self.vectors[:, :-1] if self.biased else self.vectors

    def query(self, state: HybridState) -> np.ndarray:
        query = self.model.query(state)
        if query is None:
            raise ValueError("the served model has no retrieval space to query")
        u = np.asarray(query[0], dtype=np.float32)
        return np.append(u, np.float32(1.0)) if self.biased else u


class AnnIndex:
    """Maximum-inner-product search over ``vectors`` (rows = item indices) with faiss,
    calibrated on sample queries.

    Two HNSW graphs are built: one with faiss's inner-product metric, and one over the items
    lifted to a sphere (Bachrach et al., 2014): ``x̃_i = [x_i, sqrt(M² − ‖x_i‖²)]`` with
    ``M = max_i ‖x_i‖`` and queries ``q̃ = [q, 0]``, where ``‖q̃ − x̃_i‖² = ‖q‖² + M² − 2 q·x_i``
    makes the L2-nearest items exactly the largest-inner-product ones. Which one navigates
    well depends on the data (the inner-product graph struggles when a bias column or
    uneven norms dominate, the lifted one when most items sit near the pole), so both are
    measured: for ``ef`` = ``f · n`` with ``f`` in :data:`EF_FACTORS`, recall@n against the
    exact top-``n`` of ``sample_queries``. The first (index, f) in order of ``f`` reaching
    ``target_recall`` is kept; if none does, exact search (``IndexFlatIP``) is used.
    """

    def __init__(self, vectors: np.ndarray, sample_queries: np.ndarray, n: int, target_recall: float = 0.95) -> None:
        vectors = np.asarray(vectors, dtype=np.float64)
        self.n, self.dim = vectors.shape
        samples = np.asarray(sample_queries, dtype=np.float32)
        n = min(n, self.n)
        truth = [set(np.argsort(-(vectors @ q), kind="stable")[:n].tolist()) for q in samples]
        norms = np.linalg.norm(vectors, axis=1)
        lift = np.sqrt(np.maximum(norms.max() ** 2 - norms**2, 0.0))
        options = {
            "hnsw-ip": (faiss.METRIC_INNER_PRODUCT, vectors, False),
            "hnsw-lifted-l2": (faiss.METRIC_L2, np.hstack([vectors, lift[:, None]]), True),
        }
        built = {name: (_hnsw(x, metric), lifted) for name, (metric, x, lifted) in options.items()}
        self.kind, self.ef_factor, self.recall = "flat-ip", 0, 1.0
        self.index: Any = faiss.IndexFlatIP(self.dim)
        self.lifted = False
        for factor in EF_FACTORS:
            for name, (index, lifted) in built.items():
                recall = _recall(index, lifted, samples, truth, n, factor)
                if recall >= target_recall:
                    self.kind, self.ef_factor, self.recall = name, factor, recall
                    self.index, self.lifted = index, lifted
                    return
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def search(self, query: np.ndarray, n: int) -> np.ndarray:
        """Indices of (approximately) the ``n`` items with the largest inner product, best first."""
        n = min(n, self.n)
        return _search(self.index, self.lifted, np.asarray(query, dtype=np.float32), n, self.ef_factor)

    def describe(self) -> dict[str, Any]:
        return {"index": self.kind, "ef_factor": self.ef_factor, "calibrated_recall": round(self.recall, 4)}

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def key(vectors: np.ndarray, n: int) -> str:
        """Names the index of ``vectors`` calibrated for ``n`` candidates: the SHA-256 of the
        float32 vectors (and their shape) plus ``n``. A stored index is only reused under its key."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        digest = hashlib.sha256(repr(x.shape).encode() + x.tobytes()).hexdigest()[:20]
        return f"{digest}-n{n}"

    def save(self, directory: Path) -> Path:
        """``index.faiss`` (faiss's own format) and ``index.json`` (kind, ef factor, recall) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / "index.faiss"))
        meta = {
            "kind": self.kind,
            "ef_factor": self.ef_factor,
            "recall": self.recall,
            "lifted": self.lifted,
            "n_items": self.n,
            "dim": self.dim,
        }
        (directory / "index.json").write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path) -> AnnIndex:
        """An index written by :meth:`save`; ``ValueError`` names an unreadable or inconsistent one."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "index.json").read_text())
            index = faiss.read_index(str(directory / "index.faiss"))
        except (OSError, ValueError, RuntimeError) as exc:
            raise ValueError(f"{directory}: unreadable ANN index ({type(exc).__name__}: {exc})") from exc
        dim = int(meta["dim"]) + (1 if meta["lifted"] else 0)
        if index.ntotal != int(meta["n_items"]) or index.d != dim:
            raise ValueError(
                f"{directory}: index holds {index.ntotal}×{index.d} vectors, index.json says {meta['n_items']}×{dim}"
            )
        self = cls.__new__(cls)
        self.n, self.dim = int(meta["n_items"]), int(meta["dim"])
        self.kind, self.ef_factor, self.recall = str(meta["kind"]), int(meta["ef_factor"]), float(meta["recall"])
        self.index, self.lifted = index, bool(meta["lifted"])
        return self


EF_FACTORS = (1, 2, 4, 8)


def _hnsw(x: np.ndarray, metric: int) -> Any:
    index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, metric)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # single-threaded build: the same graph on every load
    try:
        index.add(np.ascontiguousarray(x, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def _search(index: Any, lifted: bool, query: np.ndarray, n: int, ef_factor: int) -> np.ndarray:
    q = np.append(query, np.float32(0.0)) if lifted else query
    q = np.ascontiguousarray(q[None, :], dtype=np.float32)
    if ef_factor:
        params = faiss.SearchParametersHNSW(efSearch=max(ef_factor * n, 64))  # type: ignore[attr-defined]
        _, found = index.search(q, n, params=params)
    else:
        _, found = index.search(q, n)
    return found[0][found[0] >= 0].astype(np.int64)


def _recall(index: Any, lifted: bool, samples: np.ndarray, truth: list[set], n: int, ef_factor: int) -> float:
    if not len(samples):
        return 0.0
    hits = [
        len(set(_search(index, lifted, q, n, ef_factor).tolist()) & t) / max(len(t), 1) for q, t in zip(samples, truth)
    ]
    return float(np.mean(hits))


def candidate_items(
    allowed: np.ndarray, index: AnnIndex | None, query: np.ndarray | None, candidates: int, n_excluded: int, need: int
) -> tuple[np.ndarray, bool]:
    """Items to score, and whether the index chose them: every allowed item when they number at
    most ``candidates`` (or without an index); else the index's top ``candidates + n_excluded``
    for ``query`` that are allowed, unless fewer than ``need`` of them survive (a narrow filter
    the index cannot see), when every allowed item is scored.

    ``allowed`` is a boolean mask over the catalogue (filters and seen items applied).
    """
    allowed_idx = np.flatnonzero(allowed)
    if index is None or query is None or len(allowed_idx) <= candidates:
        return allowed_idx, False
    found = index.search(query, candidates + n_excluded)
    found = found[allowed[found]]
    if len(found) < min(need, len(allowed_idx)):
        return allowed_idx, False
    return found, True
