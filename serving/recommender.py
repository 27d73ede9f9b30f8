"""The recommendation logic behind the API and the registered MLflow model: a
:class:`ServedModel` is one loaded bundle prepared for serving (the served, possibly INT8,
model; its ANN index, read from the bundle's ``ann/`` when publishing stored one; MMR
vectors; segment profiles; the explainer). It is immutable once built, so a request holding
one is unaffected by a hot swap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import ServingSettings
from serving.explain import Explainer
from serving.rerank import (
    ExposureReranker,
    category_vectors,
    intra_list_diversity,
    mmr,
    normalize_rows,
    similarity_vectors,
)
from serving.retrieval import AnnIndex, CandidateScorer, ItemSpace, candidate_items
from serving.schemas import Recommendations
from serving.segments import SegmentProfiles
from training.bundle import Bundle
from training.hybrid import as_hybrid

ANN_DIR = "ann"
"""The bundle's folder of stored ANN indexes (one per :meth:`serving.retrieval.AnnIndex.key`)."""

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that is well-formed but names things the served bundle does not know."""

    def __init__(self, loc: list[str], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.detail = [{"loc": loc, "msg": msg, "type": kind}]


@dataclass(frozen=True)
class RecommendationRequest:
    user_id: str
    k: int
    exclude_seen: bool = True
    categories: tuple[str, ...] = ()
    exclude_items: tuple[str, ...] = ()
    diversity: float = 0.0
    explain: bool = False
    attributes: dict[str, Any] = field(default_factory=dict)

    def cache_params(self) -> dict[str, Any]:
        """Every parameter that shapes the answer (the cache fingerprint)."""
        return {
            "k": self.k,
            "exclude_seen": self.exclude_seen,
            "categories": sorted(self.categories),
            "exclude_items": sorted(self.exclude_items),
            "diversity": self.diversity,
            "explain": self.explain,
            "attributes": {a: v for a, v in sorted(self.attributes.items()) if v is not None},
        }


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first(values: list[str], count: int = 5, limit: int = 64) -> str:
    """The first ``count`` of ``values``, each cut to ``limit`` characters (an error message
    never echoes a long query), and how many more there are."""
    shown = ", ".join(repr(_cut(v, limit)) for v in values[:count])
    return f"[{shown}{f', … {len(values) - count} more' if len(values) > count else ''}]"


def _z(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / std if std > 0 else np.zeros_like(values)


class ServedModel:
    """A loaded bundle prepared for serving; the constructor takes the
    bundle, its directory (None: no stored ANN index or segment files) and the settings."""

    def __init__(self, bundle: Bundle, bundle_dir: Path | None, settings: ServingSettings) -> None:
        self.bundle = bundle
        self.settings = settings
        self.version = bundle.version
        n = bundle.n_items
        model = as_hybrid(bundle.model)
        self.model = model.quantized() if settings.quantized else model
        self.quantized = self.model.is_quantized()
        self.scorer = CandidateScorer(self.model)
        self.space = ItemSpace.of(self.model)
        self.index: AnnIndex | None = None
        self.ann_origin = "none"
        if self.space is not None and n > settings.candidates:
            self.index, self.ann_origin = self._ann_index(self.space, bundle_dir)
        self.content = self.model.component_of_kind("content")
        content_space = self.model.components[self.content].retrieval_space() if self.content else None
        content_vectors = content_space.vectors if content_space is not None else None
        self.sim_vectors, self.sim_source = similarity_vectors(content_vectors, bundle.categories)
        cats, labels = category_vectors(bundle.categories)
        self.category_masks = {label: cats[:, j] > 0 for j, label in enumerate(labels)}
        self.popularity = np.asarray(bundle.popularity, dtype=np.float32)
        self.exposure = ExposureReranker.of(
            bundle.categories, self.popularity, settings.exposure_strength, settings.exposure_tail_share
        )
        self.segments = SegmentProfiles.load(bundle_dir, n) if bundle_dir is not None else None
        link_vectors = normalize_rows(self.space.item_vectors) if self.space is not None else None
        self.explainer = Explainer(
            bundle.titles, bundle.item_ids, self.popularity, self.model.anchor.weights, link_vectors
        )

    def _ann_index(self, space: ItemSpace, bundle_dir: Path | None) -> tuple[AnnIndex, str]:
        """The index stored under ``bundle_dir/ann/<key>/`` for these vectors and candidate
        count (``"stored"``), else one built and calibrated now (``"built"``)."""
        self.ann_key = AnnIndex.key(space.vectors, self.settings.candidates)
        stored = bundle_dir / ANN_DIR / self.ann_key if bundle_dir else None
        if stored is not None and (stored / "index.json").is_file():
            try:
                return AnnIndex.load(stored), "stored"
            except ValueError as exc:
                log.warning("%s: rebuilding", exc)
        return AnnIndex(space.vectors, self._sample_queries(space), self.settings.candidates), "built"

    def save_ann_index(self, bundle_dir: Path) -> Path | None:
        """Store this model's ANN index in ``bundle_dir`` (where :meth:`_ann_index` looks); None without one."""
        if self.index is None:
            return None
        return self.index.save(Path(bundle_dir) / ANN_DIR / self.ann_key)

    def _sample_queries(self, space: ItemSpace, count: int = 32) -> np.ndarray:
        """Query vectors of up to ``count`` training users (evenly spaced in id order) for
        calibrating the ANN index; random vectors when the bundle has no users."""
        users = sorted(self.bundle.history)
        picked = [users[i] for i in np.linspace(0, len(users) - 1, min(count, len(users))).astype(int)] if users else []
        empty = np.empty(0, dtype=np.int32)
        queries = [space.query(self.scorer.prepare(self.bundle.row(u, empty), u)) for u in picked]
        if not queries:
            return np.random.default_rng(0).normal(size=(count, space.vectors.shape[1])).astype(np.float32)
        return np.stack(queries).astype(np.float32)

    @property
    def ann_source(self) -> str:
        return self.space.source if self.space is not None and self.index is not None else "none"

    def describe(self) -> dict[str, Any]:
        return {
            "model_version": self.version,
            "model_name": self.bundle.model.name,
            "quantized": self.quantized,
            "ann": self.ann_source,
            "ann_origin": self.ann_origin,
            **({"ann_" + k: v for k, v in self.index.describe().items()} if self.index else {}),
            "segments": len(self.segments.labels) if self.segments else 0,
            "segment_models": len(self.model.segment_labels()),
            "n_items": self.bundle.n_items,
        }

    def warm_up(self) -> None:
        """Answer one request of each kind (a known user with and without explanations and
        diversity, an unknown user with an attribute, a session of one item) and discard the
        answers, so that first-call costs (lazily computed item vectors, the first inference
        of the neural towers, faiss's first search) are paid before this model serves."""
        user = next(iter(self.bundle.history), None)
        requests = [RecommendationRequest("\0warm-up", 10, attributes={"age": 30})]
        if user is not None:
            requests += [RecommendationRequest(user, 10, explain=True), RecommendationRequest(user, 10, diversity=0.3)]
        for request in requests:
            self.recommend(request, [])
        if self.bundle.n_items:
            self.recommend(RecommendationRequest("\0warm-up", 10), [str(self.bundle.item_ids[0])])

    # ------------------------------------------------------------------ validation
    def validate(self, request: RecommendationRequest) -> None:
        unknown = sorted(set(request.categories) - set(self.category_masks))
        if unknown:
            known = _cut(", ".join(sorted(self.category_masks)) or "none", 1000)
            raise RequestError(
                ["query", "categories"],
                f"unknown categories {_first(unknown)}; this model knows: {known}",
                "unknown_category",
            )
        missing = sorted(i for i in set(request.exclude_items) if not self.bundle.has_item(i))
        if missing:
            raise RequestError(
                ["query", "exclude_items"],
                f"unknown item ids {_first(missing)}: not in model version {self.version}",
                "unknown_item",
            )

    # ------------------------------------------------------------------ recommend
    def _popularity(self, attributes: dict[str, Any]) -> tuple[np.ndarray, str, str | None, str]:
        """Popularity vector, strategy, segment label and the reason for the choice."""
        given = {a: v for a, v in attributes.items() if v is not None}
        if self.segments is None:
            return self.popularity, "global_popularity", None, "bundle has no segment popularity"
        if not given:
            return self.popularity, "global_popularity", None, "no demographics or context given"
        found = self.segments.nearest(given)
        if found is None:
            return self.popularity, "global_popularity", None, f"no segment profile knows {sorted(given)}"
        index, used = found
        label = self.segments.labels[index]
        return (
            self.segments.popularity[index],
            "segment_popularity",
            label,
            f"nearest segment {label} by {', '.join(used)}",
        )

    def recommend(self, request: RecommendationRequest, recent: list[str]) -> Recommendations:
        """The response body for ``request`` given the user's live items ``recent`` (oldest first).

        1. history ``H`` = training history ∪ live items known to the bundle; the allowed
           items are the catalogue minus ``H`` (``exclude_seen``), minus ``exclude_items``,
           restricted to items in any of ``categories``;
        2. relevance: ``personalized`` (known user) is the model's score of the user's row
           (training history with its weights, live items at the neutral weight) on the
           candidates of :func:`serving.retrieval.candidate_items` (``segment`` names the
           segment whose fine-tuned model scored); ``session_content+<pop>`` /
           ``session+<pop>`` (unknown user with live events) is ``(1 − w)·z(s) + w·z(p)``
           with ``s`` the content score of the session (the model's score without a content
           component), ``p`` the popularity below, ``w = serving.cold_popularity_weight`` and
           ``z`` the standardization over the scored items; ``segment_popularity`` (unknown
           user, no events, attributes pointing to a segment: :mod:`serving.segments`), else
           ``global_popularity`` (``strategy_detail`` says why);
        3. the top ``k`` by relevance (ties: lower item index), or with ``diversity > 0`` MMR
           over the top ``max(k, serving.mmr_pool)`` (:mod:`serving.rerank`), else with
           ``serving.exposure_strength > 0`` the exposure-aware re-ranker over the top
           ``max(k, min(serving.exposure_pool, serving.candidates))``, calibrated to the
           genres of ``H``;
        4. with ``explain``, a reason per item (:mod:`serving.explain`).
        """
        self.validate(request)
        bundle, settings = self.bundle, self.settings
        user = request.user_id
        known = user in bundle.history
        extra = np.array([bundle.item_index[i] for i in recent if i in bundle.item_index], dtype=np.int32)
        trained = bundle.history[user] if known else np.empty(0, dtype=np.int32)
        history = np.unique(np.concatenate([trained, extra])).astype(np.int64)
        allowed = np.ones(bundle.n_items, dtype=bool)
        if request.exclude_seen:
            allowed[history] = False
        if request.categories:
            allowed &= np.logical_or.reduce([self.category_masks[c] for c in request.categories])
        for item in request.exclude_items:
            allowed[bundle.item_index[item]] = False
        if request.diversity > 0:
            need = max(request.k, settings.mmr_pool)
        elif self.exposure.active:  # never widens retrieval: at most the ANN's candidates
            need = max(request.k, min(settings.exposure_pool, settings.candidates))
        else:
            need = request.k
        detail, segment, retrieved = "", None, False
        popularity_only: str | None = None
        if known or len(extra):
            state = self.scorer.prepare(bundle.row(user if known else None, extra), user if known else None)
            query = self.space.query(state) if self.space is not None else None
            n_excluded = len(history) if request.exclude_seen else 0
            items, retrieved = candidate_items(allowed, self.index, query, settings.candidates, n_excluded, need)
            if known:
                scores = self.scorer.score(state, items).astype(np.float64)
                strategy = "personalized"
                segment = self.model.segment_of(user)
                if segment is not None:
                    detail = f"neural scores from the model fine-tuned for segment {segment}"
            else:
                if self.content is not None:
                    content = self.model.components[self.content]
                    session = content.score_items(state.parts[self.content], items)[0]
                    source = "session_content"
                else:
                    session = self.scorer.score(state, items)
                    source = "session"
                pop, pop_strategy, segment, detail = self._popularity(request.attributes)
                w = settings.cold_popularity_weight
                scores = (1.0 - w) * _z(session) + w * _z(pop[items])
                strategy = f"{source}+{pop_strategy}"
        else:
            items = np.flatnonzero(allowed)
            pop, strategy, segment, detail = self._popularity(request.attributes)
            scores = pop[items].astype(np.float64)
            popularity_only = "segment" if strategy == "segment_popularity" else "global"
        picked, picked_scores = self._rank(items, scores, request.k, request.diversity, need, history, user)
        reasons = self.explainer.reasons(history, picked, popularity_only) if request.explain else None
        out_items = []
        for rank, (i, score) in enumerate(zip(picked.tolist(), picked_scores.tolist()), start=1):
            entry = {
                "item_id": str(bundle.item_ids[i]),
                "title": str(bundle.titles[i]),
                "score": score,
                "rank": rank,
                "categories": list(bundle.categories[i]),
            }
            if reasons is not None:
                entry.update(reasons[rank - 1])
            out_items.append(entry)
        return Recommendations(
            user_id=user,
            model_version=self.version,
            cold_start=not known,
            strategy=strategy,
            strategy_detail=detail or None,
            segment=segment,
            retrieval="ann" if retrieved else "exact",
            diversity=request.diversity,
            intra_list_diversity=intra_list_diversity(picked, self.sim_vectors),
            items=out_items,
        )

    def _rank(
        self,
        items: np.ndarray,
        scores: np.ndarray,
        k: int,
        diversity: float,
        need: int,
        history: np.ndarray,
        user_id: str,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of ``items`` by score (ties: lower item index), or MMR's picks (or the
        exposure-aware re-ranker's for ``user_id``, calibrated to ``history``) from the top ``need``, and their
        scores (float64)."""
        order = np.lexsort((items, -scores))
        if diversity > 0 or self.exposure.active:
            pool = order[:need]
            if diversity > 0:
                picked = mmr(items[pool], scores[pool], self.sim_vectors, k, diversity)
            else:
                picked = self.exposure.rerank(items[pool], scores[pool], history, user_id, k)
            score_of = dict(zip(items[pool].tolist(), scores[pool].tolist()))
            return picked, np.array([score_of[i] for i in picked.tolist()], dtype=np.float64)
        top = order[:k]
        return items[top].astype(np.int64), np.asarray(scores[top], dtype=np.float64)
