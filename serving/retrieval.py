"""Candidate retrieval (faiss inner-product ANN) and hybrid scoring restricted to candidates.

Scoring: :class:`HybridScorer` computes, for any candidate item set ``C``, exactly
``model.score(x, [user])[0][C]`` of the served :class:`training.hybrid.WeightedHybrid`
(or :class:`training.models.ItemItemModel`), without scoring the other items:

- anchor: ``(w(x)[h] · W[h, C] + b[C]) · ω_ease/σ_ease`` over the history items ``h``;
- neural: ``(u · v_C + b_C) · ω/σ`` with ``u`` the user-tower output of the binary history
  (for a user whose segment has a fine-tuned model, ``u``, ``v`` and ``b`` are that model's);
- ALS: ``f_u · Y_Cᵀ · ω/σ`` (learned factors for known users, fold-in for others);
- content: ``cos(p_u, ê_C) · ω/σ``; popularity: ``pop[C] · ω/σ``;
- any other component: its full score row, restricted to ``C``.

Retrieval: :class:`ItemSpace` holds the item vectors of an inner-product index: the neural
component's (global model's) item-tower outputs with the item bias appended (the query is
``[u, 1]`` with ``u`` the global user vector, so the inner product *is* the global neural
score; segment models only re-rank the candidates), else the content embeddings (query: the user's content
profile), else none (every item is scored). :class:`AnnIndex` is a faiss HNSW index over them,
calibrated on sample users' query vectors (its docstring). Publishing stores it in the bundle
under ``ann/<key>/`` (:meth:`AnnIndex.key`: a hash of the vectors and the candidate count,
so the INT8 model's vectors get their own); serving loads the one whose key matches and
builds it only when none does.

Rule (:func:`candidate_items`): when the items allowed by the request's filters number at
most ``candidates``, all of them are scored exactly; otherwise the index returns the top
``candidates + |excluded seen items|`` items for the user's query vector, the filters are
applied, and those are scored. If fewer than ``need`` survive the filters (a narrow filter
the index cannot see), every allowed item is scored exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import scipy.sparse as sp

from training.candidates import ALSScorer, ContentScorer, NeuralScorer, binary
from training.hybrid import InputWeighting, PopularityScorer, WeightedHybrid
from training.models import ItemItemModel

HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200


def served_model(model: WeightedHybrid | ItemItemModel, quantized: bool) -> WeightedHybrid | ItemItemModel:
    """``model`` as served: with ``quantized``, a copy whose neural components use
    :func:`training.neural.quantize_int8` (the bundle's own model is left untouched)."""
    if not quantized or not isinstance(model, WeightedHybrid):
        return model
    from training.neural import quantize_int8

    components = {
        name: NeuralScorer(
            quantize_int8(s.model), {seg: quantize_int8(m) for seg, m in s.segment_models.items()}, s.user_segments
        )
        if isinstance(s, NeuralScorer)
        else s
        for name, s in model.components.items()
    }
    return dataclasses.replace(model, components=components)


def is_quantized(model: WeightedHybrid | ItemItemModel) -> bool:
    """Whether a neural component of ``model`` holds INT8-quantized layers."""
    from training.neural import _is_quantized

    return isinstance(model, WeightedHybrid) and any(
        isinstance(s, NeuralScorer) and _is_quantized(s.model.net) for s in model.components.values()
    )


@dataclass
class UserState:
    """Per-request intermediate results of one user's history row ``x``."""

    x: sp.csr_matrix
    user_id: str | None
    anchor_idx: np.ndarray
    anchor_val: np.ndarray
    vectors: dict[str, np.ndarray]
    segment_vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    """neural component → (user vector, item vectors, item biases) of the user's segment model."""


class HybridScorer:
    """Restricted scores of a served model (module docstring)."""

    def __init__(self, model: WeightedHybrid | ItemItemModel, n_items: int) -> None:
        self.model = model
        self.n_items = n_items
        if isinstance(model, WeightedHybrid):
            self.anchor = model.anchor
            self.weighting: InputWeighting | None = model.weighting
            self.anchor_factor = model.weights.get("ease", 1.0) / model.scales["ease"]
            self.components = [
                (name, s, model.weights.get(name, 0.0) / model.scales[name])
                for name, s in model.components.items()
                if model.weights.get(name, 0.0)
            ]
        else:
            self.anchor, self.weighting, self.anchor_factor, self.components = model, None, 1.0, []
        self.anchor_bias = np.asarray(self.anchor.bias, dtype=np.float32)
        self.anchor_weights = None if self.anchor.weights is None else np.asarray(self.anchor.weights, dtype=np.float32)
        self._item_side: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._segment_side: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for name, scorer, _ in self.components:
            if isinstance(scorer, NeuralScorer):
                self._item_side[name] = _neural_item_side(scorer.model)
                self._segment_side[name] = {seg: _neural_item_side(m) for seg, m in scorer.segment_models.items()}
            elif isinstance(scorer, ContentScorer):
                self._item_side[name] = (np.asarray(scorer.model.item_embeddings, dtype=np.float32), None)
            elif isinstance(scorer, ALSScorer):
                self._item_side[name] = (np.asarray(scorer.model.item_factors, dtype=np.float32), None)

    def component(self, kind: type) -> tuple[str, Any] | None:
        """The first blended component of scorer class ``kind`` as ``(name, scorer)``."""
        for name, scorer, _ in self.components:
            if isinstance(scorer, kind):
                return name, scorer
        return None

    def segment_model_of(self, user_id: str | None) -> str | None:
        """The segment whose fine-tuned neural model scores ``user_id`` (None: the global model)."""
        found = self.component(NeuralScorer)
        return found[1].segment_of(user_id) if found is not None else None

    def segment_models(self) -> int:
        found = self.component(NeuralScorer)
        return len(found[1].segment_models) if found is not None else 0

    def prepare(self, x: sp.csr_matrix, user_id: str | None) -> UserState:
        """Everything about the user that does not depend on the candidate items."""
        x = sp.csr_matrix(x, dtype=np.float32)
        anchor_in = self.weighting.apply(x) if self.weighting is not None else x
        vectors: dict[str, np.ndarray] = {}
        segment_vectors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for name, scorer, _ in self.components:
            if isinstance(scorer, NeuralScorer):
                # The global model's user vector queries the ANN index even when a segment model ranks.
                vectors[name] = scorer.model.user_embeddings(binary(x), [user_id])[0].astype(np.float32)
                segment = scorer.segment_of(user_id)
                if segment is not None:
                    own = scorer.segment_models[segment].user_embeddings(binary(x), [user_id])[0].astype(np.float32)
                    segment_vectors[name] = (own, *self._segment_side[name][segment])
            elif isinstance(scorer, ContentScorer):
                vectors[name] = _content_profile(scorer.model, x).astype(np.float32)
            elif isinstance(scorer, ALSScorer):
                row = scorer.row_of.get(user_id, -1)
                vectors[name] = (
                    scorer.model.user_factors[row] if row >= 0 else scorer.model.fold_in(binary(x))[0]
                ).astype(np.float32)
        return UserState(
            x, user_id, anchor_in.indices.astype(np.int64), anchor_in.data.astype(np.float32), vectors, segment_vectors
        )

    def score(self, state: UserState, items: np.ndarray) -> np.ndarray:
        """``model.score(x, [user])[0][items]`` (float32)."""
        items = np.asarray(items, dtype=np.int64)
        out = self.anchor_bias[items].copy()
        if self.anchor_weights is not None and len(state.anchor_idx):
            if self.n_items <= 8 * len(items):  # whole rows: contiguous reads beat a scattered gather
                out += (state.anchor_val @ self.anchor_weights[state.anchor_idx])[items]
            else:
                out += state.anchor_val @ self.anchor_weights[np.ix_(state.anchor_idx, items)]
        out *= self.anchor_factor
        for name, scorer, factor in self.components:
            if name in state.segment_vectors:
                user, emb, bias = state.segment_vectors[name]
                part = emb[items] @ user + bias[items]
            elif name in state.vectors:
                emb, bias = self._item_side[name]
                part = emb[items] @ state.vectors[name]
                if bias is not None:
                    part = part + bias[items]
            elif isinstance(scorer, PopularityScorer):
                part = np.asarray(scorer.values, dtype=np.float32)[items]
            else:
                part = scorer.score(state.x, [state.user_id])[0][items]
            out += np.asarray(part, dtype=np.float32) * np.float32(factor)
        return out.astype(np.float32, copy=False)


def _neural_item_side(rec: Any) -> tuple[np.ndarray, np.ndarray]:
    """A neural recommender's item-tower outputs and item biases."""
    return rec.item_embeddings().astype(np.float32), rec.item_biases().astype(np.float32)


def _content_profile(model: Any, x: sp.csr_matrix) -> np.ndarray:
    """:meth:`training.content.ContentModel.profiles` of the single row ``x``, computed on
    the row's items only: ``p = Σ_i w_i ê_i / Σ_i w_i`` with ``w_i = max(x_i · idf_i, 0)``,
    L2-normalised (all-zero for an empty or all-negative row)."""
    idx = x.indices
    w = np.clip(x.data.astype(np.float64) * np.asarray(model.item_weights, dtype=np.float64)[idx], 0.0, None)
    total = w.sum()
    if total <= 0:
        return np.zeros(model.item_embeddings.shape[1])
    mean = (w @ np.asarray(model.item_embeddings[idx], dtype=np.float64)) / total
    norm = np.linalg.norm(mean)
    return mean / norm if norm > 0 else mean


@dataclass
class ItemSpace:
    """Item vectors for inner-product retrieval and which user vector queries them."""

    source: str  # "neural" or "content"
    component: str
    vectors: np.ndarray

    @classmethod
    def of(cls, scorer: HybridScorer) -> ItemSpace | None:
        """The neural space (item-tower outputs ⊕ item bias), else the content space, else None."""
        for kind, source in ((NeuralScorer, "neural"), (ContentScorer, "content")):
            found = scorer.component(kind)
            if found is not None:
                emb, bias = scorer._item_side[found[0]]
                vectors = np.hstack([emb, bias[:, None]]) if bias is not None else emb
                return cls(source, found[0], np.ascontiguousarray(vectors, dtype=np.float32))
        return None

    def query(self, state: UserState) -> np.ndarray:
        u = state.vectors[self.component]
        return np.append(u, np.float32(1.0)) if self.source == "neural" else u


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
        self.index, self.lifted = faiss.IndexFlatIP(self.dim), False
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
        _, found = index.search(q, n, params=faiss.SearchParametersHNSW(efSearch=max(ef_factor * n, 64)))
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
    """Items to score under the rule of the module docstring, and whether the index chose them.

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
