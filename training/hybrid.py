"""The weighted hybrid: a blend of component scorers' scores on an EASE-family anchor, and
the validation search (:func:`tune_hybrid`) that chooses its λ, β, α and blend weights on a
per-user k-fold of the train split. See docs/models.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.settings import TrainingSettings
from pipelines.split import user_kfold
from training.evaluation import relevant_items
from training.metrics import evaluate
from training.models import (
    InteractionMatrix,
    ItemItemModel,
    RetrievalSpace,
    Scorer,
    as_csr,
    fit_ease,
    item_gram,
    popularity,
    temporal_gram,
    top_k,
)

__all__ = [
    "ComponentFitter",
    "FitContext",
    "HybridChoice",
    "HybridState",
    "InputWeighting",
    "PopularityScorer",
    "Scorer",
    "WeightedHybrid",
    "as_hybrid",
    "ease_size",
    "fit_hybrid",
    "score_scale",
    "tune_hybrid",
]

INPUT_FLOOR = 0.05


@dataclass
class FitContext:
    """What a component fitter gets: the fitting interactions, their matrix and side data."""

    frame: pd.DataFrame
    matrix: InteractionMatrix
    item_ids: np.ndarray
    side: Mapping[str, object] = field(default_factory=dict)


ComponentFitter = Callable[[FitContext], Scorer]


class PopularityScorer(Scorer):
    """Item popularity (share of users), the same row for everyone."""

    kind: ClassVar[str] = "popularity"

    def __init__(self, x: sp.csr_matrix) -> None:
        self.values = popularity(x)

    @classmethod
    def of(cls, values: np.ndarray) -> PopularityScorer:
        """The scorer of stored popularity ``values``."""
        scorer = cls.__new__(cls)
        scorer.values = values
        return scorer

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> int:
        """The number of rows: popularity knows nothing else about a user."""
        return x.shape[0]

    def score_items(self, state: int, items: np.ndarray | None = None) -> np.ndarray:
        values = self.values if items is None else np.asarray(self.values, dtype=np.float32)[np.asarray(items)]
        return np.tile(values, (state, 1))


@dataclass
class InputWeighting:
    """Maps stored interaction weights ``w`` to EASE inputs ``max(1 + α(w − μ)/σ, 0.05)``."""

    alpha: float = 0.0
    mean: float = 1.0
    std: float = 1.0

    @classmethod
    def of(cls, x: sp.csr_matrix, alpha: float) -> InputWeighting:
        data = x.data if x.nnz else np.ones(1)
        return cls(alpha, float(data.mean()), float(data.std()) or 1.0)

    def apply(self, x: sp.csr_matrix) -> sp.csr_matrix:
        out = sp.csr_matrix(x, dtype=np.float32, copy=True)
        if self.alpha:
            out.data = np.maximum(1.0 + self.alpha * (out.data - self.mean) / self.std, INPUT_FLOOR).astype(np.float32)
        else:
            out.data[:] = 1.0
        return out


@dataclass
class HybridState:
    """:meth:`WeightedHybrid.prepare` of some users: the anchor's state and each blended
    component's, by component name."""

    anchor: Any
    parts: dict[str, Any]
    user_ids: list


@dataclass
class WeightedHybrid(Scorer):
    """The blend ``Σ_c w_c · s_c / σ_c`` of the anchor (an :class:`ItemItemModel`, fed the
    history through ``weighting``; None: as given) and ``components`` (name → scorer), with
    blend weights ``weights`` and label-free scales ``scales`` (the anchor's under "ease")."""

    kind: ClassVar[str] = "hybrid"

    anchor: ItemItemModel
    weighting: InputWeighting | None
    components: dict[str, Scorer]
    weights: dict[str, float]
    scales: dict[str, float]
    name: str = "hybrid"

    def blended(self) -> dict[str, Scorer]:
        """The components with a non-zero blend weight, in blend order."""
        return {name: s for name, s in self.components.items() if self.weights.get(name, 0.0)}

    def prepare(self, x: sp.csr_matrix | np.ndarray, user_ids: Sequence | None = None) -> HybridState:
        x = as_csr(x)
        ids = [None] * x.shape[0] if user_ids is None else list(user_ids)
        anchor_in = self.weighting.apply(x) if self.weighting is not None else x
        parts = {name: scorer.prepare(x, ids) for name, scorer in self.blended().items()}
        return HybridState(self.anchor.prepare(anchor_in), parts, ids)

    def score_items(self, state: HybridState, items: np.ndarray | None = None) -> np.ndarray:
        total = self.anchor.score_items(state.anchor, items) * (self.weights.get("ease", 1.0) / self.scales["ease"])
        for name, scorer in self.blended().items():
            total += scorer.score_items(state.parts[name], items) * (self.weights[name] / self.scales[name])
        return total

    def recommend(self, x: sp.csr_matrix, k: int, user_ids: Sequence | None = None) -> np.ndarray:
        """Top-``k`` item indices per row of ``x``, best first; seen items excluded."""
        return top_k(self.score(x, user_ids), x, k)

    # ------------------------------------------------------------------ serving
    def component_of_kind(self, kind: str) -> str | None:
        """The name of the first blended component of ``kind`` (e.g. "content"); None when none."""
        return next((name for name, s in self.blended().items() if s.kind == kind), None)

    def retrieval_component(self) -> str | None:
        """The blended component whose inner-product space candidates are retrieved from:
        the lowest ``retrieval_rank``, ties in blend order; None when none offers one."""
        offered = [(s.retrieval_rank, n, name) for n, (name, s) in enumerate(self.blended().items())]
        ranked = sorted((rank, n, name) for rank, n, name in offered if rank is not None)
        return ranked[0][2] if ranked else None

    def retrieval_space(self) -> RetrievalSpace | None:
        name = self.retrieval_component()
        return None if name is None else self.components[name].retrieval_space()

    def query(self, state: HybridState) -> np.ndarray | None:
        name = self.retrieval_component()
        return None if name is None else self.components[name].query(state.parts[name])

    def segment_of(self, user_id: Any) -> str | None:
        return next((s for s in (c.segment_of(user_id) for c in self.blended().values()) if s is not None), None)

    def segment_labels(self) -> list[str]:
        return next((labels for labels in (c.segment_labels() for c in self.blended().values()) if labels), [])

    def quantized(self) -> WeightedHybrid:
        components = {name: s.quantized() for name, s in self.components.items()}
        if all(components[name] is s for name, s in self.components.items()):
            return self
        return dataclasses.replace(self, components=components)

    def is_quantized(self) -> bool:
        return any(s.is_quantized() for s in self.components.values())


def as_hybrid(model: ItemItemModel | WeightedHybrid) -> WeightedHybrid:
    """``model`` as a :class:`WeightedHybrid`: a blend as it is, an item-item model as the
    anchor of a blend without components that scores the history as given (same scores)."""
    if isinstance(model, WeightedHybrid):
        return model
    return WeightedHybrid(model, None, {}, {"ease": 1.0}, {"ease": 1.0}, name=model.name)


def score_scale(scores: np.ndarray) -> float:
    """Standard deviation of a component's scores (finite entries); 1.0 when degenerate."""
    finite = scores[np.isfinite(scores)]
    s = float(finite.std()) if finite.size else 0.0
    return s if s > 0 else 1.0


@dataclass
class _Fold:
    """One validation fold: its fitting interactions, the held-out users' rows and relevant
    items, and the fitting part's item Gram and temporal Gram (sparse, computed once)."""

    frame: pd.DataFrame
    matrix: InteractionMatrix
    rows: np.ndarray
    users: list
    relevant: dict
    gram: sp.csr_matrix
    gram_t: sp.csr_matrix | None = None

    def binary_rows(self) -> sp.csr_matrix:
        return InputWeighting.of(self.matrix.matrix, 0.0).apply(self.matrix.matrix[self.rows])


@dataclass
class HybridChoice:
    """The validated choices and the mean validation NDCG@k behind each."""

    ease_lambda: float
    plain_ease_lambda: float
    temporal_beta: float
    input_alpha: float
    weights: dict[str, float]
    validation: dict[str, float]
    folds: int
    seconds: float = 0.0
    anchor_fits: int = 0
    budget_exhausted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _ndcg(scores: np.ndarray, fold: _Fold, k: int) -> float:
    top = top_k(scores, fold.matrix.matrix[fold.rows], k)
    item_ids = fold.matrix.item_ids
    recs = {u: list(item_ids[t]) for u, t in zip(fold.users, top)}
    return evaluate(recs, fold.relevant, k)[f"ndcg@{k}"]


def _folds(frame: pd.DataFrame, item_ids: np.ndarray, cfg: TrainingSettings, weight_col: str | None) -> list[_Fold]:
    folds = []
    for fit_df, held in user_kfold(frame, cfg.validation_folds, cfg.validation_seed):
        matrix = InteractionMatrix.from_frame(fit_df, item_ids=item_ids, weight_col=weight_col)
        relevant = relevant_items(matrix, held)
        users = list(relevant)
        rows = np.array([matrix.user_index[u] for u in users], dtype=np.int64)
        gram_t = temporal_gram(fit_df, item_ids, cfg.temporal_window) if "timestamp" in fit_df.columns else None
        folds.append(_Fold(fit_df, matrix, rows, users, relevant, item_gram(matrix.matrix), gram_t))
    return folds


class _Deadline:
    """The search's time budget: ``seconds`` None never runs out."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.perf_counter() + seconds
        self.hit = False

    def passed(self) -> bool:
        if self.end is not None and time.perf_counter() > self.end:
            self.hit = True
        return self.hit


@dataclass
class _AnchorSearch:
    """The EASE λ × β grid's per-fold validation NDCG (one list per evaluated point) and
    how many anchors were fitted."""

    scores: dict[tuple[float, float], list[float]]
    fits: int

    def complete(self, folds: int, plain: bool = False) -> list[tuple[float, float]]:
        """The points evaluated on every fold (only β = 0 with ``plain``), best mean first."""
        done = [p for p, v in self.scores.items() if len(v) == folds and (not plain or p[1] == 0.0)]
        return sorted(done, key=lambda p: -float(np.mean(self.scores[p])))


def _search_anchor(
    folds: list[_Fold],
    points: list[tuple[float, float]],
    k: int,
    eta: int,
    fit: Callable[[_Fold, float, float], ItemItemModel],
    deadline: _Deadline,
    log: Callable[[str], None],
) -> _AnchorSearch:
    """Successive halving over the folds, one bracket per β (so the best λ of every β, plain
    EASE's included, the tuned baseline, is judged on every fold): every point on the first
    fold, then in each bracket the best ``1/eta`` of its points (by mean NDCG so far, at least
    two: a close second can still win on a later fold) on the next fold, and so on. ``eta`` 1
    evaluates every point on every fold. Once ``deadline`` passes, a bracket evaluates only
    its best point. ``fit(fold, λ, β)`` fits a point's anchor (reusing the fold's Gram)."""
    search = _AnchorSearch({p: [] for p in points}, 0)
    brackets = {beta: [p for p in points if p[1] == beta] for beta in dict.fromkeys(p[1] for p in points)}
    for i, fold in enumerate(folds):
        binary = fold.binary_rows()
        for beta, alive in brackets.items():
            for n, (lam, _) in enumerate(alive):
                if n and deadline.passed():
                    break
                started = time.perf_counter()
                model = fit(fold, lam, beta)
                value = _ndcg(model.score(binary), fold, k)
                search.scores[(lam, beta)].append(value)
                search.fits += 1
                log(
                    f"  validation: ease λ={lam:g} β={beta:g} fold {i + 1}/{len(folds)} ndcg@{k}={value:.4f} "
                    f"({time.perf_counter() - started:.1f} s)"
                )
            ranked = sorted(
                (p for p in alive if len(search.scores[p]) == i + 1), key=lambda p: -float(np.mean(search.scores[p]))
            )
            brackets[beta] = ranked[: max(2, -(-len(ranked) // eta))]
    return search


def ease_size(cfg: TrainingSettings) -> dict[str, int]:
    """:func:`training.models.fit_ease`'s dense-or-sparse switch as ``cfg`` sets it."""
    return {"dense_max_items": cfg.ease_dense_max_items, "neighbours": cfg.ease_neighbours}


def tune_hybrid(
    frame: pd.DataFrame,
    item_ids: np.ndarray,
    cfg: TrainingSettings,
    fitters: Mapping[str, ComponentFitter],
    *,
    k: int = 10,
    weight_col: str | None = None,
    side: Mapping[str, object] | None = None,
    log: Callable[[str], None] = print,
) -> HybridChoice:
    """Choose λ, β, α and the blend weights by mean NDCG@k over a per-user k-fold of ``frame``.

    1. EASE λ × temporal β by successive halving over the folds (:func:`_search_anchor`;
       β = 0 is plain EASE; its best λ is also reported as ``plain_ease_lambda``, the tuned
       plain-EASE baseline);
    2. input weighting α;
    3. blend weights by coordinate ascent over ``cfg.blend_weight_grid`` (two passes),
       each component fitted per fold by ``fitters[name]``.

    ``cfg.search_budget_s`` bounds the optional exploration of each step (see
    :class:`core.settings.TrainingSettings`).
    """
    start = time.perf_counter()
    side = side or {}
    folds = _folds(frame, item_ids, cfg, weight_col)
    validation: dict[str, float] = {}

    def mean_ndcg(score_fn: Callable[[_Fold, int], np.ndarray]) -> float:
        return float(np.mean([_ndcg(score_fn(f, i), f, k) for i, f in enumerate(folds)]))

    # β = 0 (plain EASE) is always searched: it is the tuned baseline the hybrid must beat.
    betas = sorted({0.0, *cfg.temporal_betas}) if all(f.gram_t is not None for f in folds) else [0.0]
    dtype = np.float32 if cfg.search_precision == "float32" else np.float64
    deadline = _Deadline(cfg.search_budget_s)
    eta = cfg.search_halving if len(item_ids) > cfg.search_halving_above_items else 1

    def fit_anchor(fold: _Fold, lam: float, beta: float) -> ItemItemModel:
        return fit_ease(fold.matrix.matrix, lam, fold.gram_t, beta, gram=fold.gram, dtype=dtype, **ease_size(cfg))

    search = _search_anchor(folds, list(itertools.product(cfg.ease_lambdas, betas)), k, eta, fit_anchor, deadline, log)
    plain_lambda = search.complete(len(folds), plain=True)[0][0]
    validation["plain_ease"] = float(np.mean(search.scores[(plain_lambda, 0.0)]))
    lam, beta = search.complete(len(folds))[0]
    validation["temporal_ease"] = float(np.mean(search.scores[(lam, beta)]))
    log(
        f"  validation: chose ease λ={lam:g} β={beta:g} ndcg@{k}={validation['temporal_ease']:.4f} "
        f"({search.fits} anchor fits for {len(search.scores)} points × {len(folds)} folds)"
    )
    anchor_models = [fit_anchor(f, lam, beta) for f in folds]

    best_alpha, best = 0.0, -1.0
    for n, alpha in enumerate(cfg.input_alphas):
        if n and deadline.passed():
            break
        value = mean_ndcg(
            lambda f, i, alpha=alpha: anchor_models[i].score(
                InputWeighting.of(f.matrix.matrix, alpha).apply(f.matrix.matrix[f.rows])
            )
        )
        log(f"  validation: input α={alpha:g} ndcg@{k}={value:.4f}")
        if value > best + 1e-9:
            best_alpha, best = alpha, value
    validation["weighted_input"] = best

    # Per-fold component scores, each divided by its label-free scale.
    anchor_scores = []
    for i, f in enumerate(folds):
        s = anchor_models[i].score(InputWeighting.of(f.matrix.matrix, best_alpha).apply(f.matrix.matrix[f.rows]))
        anchor_scores.append(s / score_scale(s))
    component_scores: dict[str, list[np.ndarray]] = {}
    for name in cfg.blend_components:
        if name not in fitters:
            continue
        started = time.perf_counter()
        per_fold = []
        for f in folds:
            scorer = fitters[name](FitContext(f.frame, f.matrix, item_ids, side))
            s = scorer.score(f.matrix.matrix[f.rows], f.users)
            per_fold.append(s / score_scale(s))
        component_scores[name] = per_fold
        validation[f"{name}_alone"] = mean_ndcg(lambda f, i, per_fold=per_fold: per_fold[i].copy())
        log(
            f"  validation: {name} alone ndcg@{k}={validation[f'{name}_alone']:.4f} "
            f"({len(folds)} fits, {time.perf_counter() - started:.1f} s)"
        )

    weights = {"ease": 1.0} | {name: 0.0 for name in component_scores}

    def blend_value(w: dict[str, float]) -> float:
        return mean_ndcg(
            lambda f, i: anchor_scores[i] + sum(w[n] * component_scores[n][i] for n in component_scores if w[n])
        )

    current = blend_value(weights)
    for _ in range(2):
        for name in component_scores:
            for value in cfg.blend_weight_grid:
                if deadline.passed():
                    break
                trial = weights | {name: value}
                score = blend_value(trial)
                if score > current + 1e-9:
                    weights, current = trial, score
        log(f"  validation: blend {weights} ndcg@{k}={current:.4f}")
    validation["hybrid"] = current
    if deadline.hit:
        log(f"  validation: the search budget of {cfg.search_budget_s:g} s ran out; kept the best found")
    return HybridChoice(
        lam,
        plain_lambda,
        beta,
        best_alpha,
        weights,
        validation,
        len(folds),
        time.perf_counter() - start,
        search.fits + len(folds),
        deadline.hit,
    )


def fit_hybrid(
    frame: pd.DataFrame,
    item_ids: np.ndarray,
    choice: HybridChoice,
    fitters: Mapping[str, ComponentFitter],
    *,
    weight_col: str | None = None,
    temporal_window: int = 3,
    side: Mapping[str, object] | None = None,
    cfg: TrainingSettings | None = None,
) -> WeightedHybrid:
    """Refit the anchor and every component with a non-zero weight on all of ``frame``;
    ``cfg`` (default: the default settings) sets EASE's dense-or-sparse switch."""
    matrix = InteractionMatrix.from_frame(frame, item_ids=item_ids, weight_col=weight_col)
    x = matrix.matrix
    gram_t = temporal_gram(frame, item_ids, temporal_window) if choice.temporal_beta > 0 else None
    anchor = fit_ease(x, choice.ease_lambda, gram_t, choice.temporal_beta, **ease_size(cfg or TrainingSettings()))
    weighting = InputWeighting.of(x, choice.input_alpha)
    scales = {"ease": score_scale(anchor.score(weighting.apply(x)))}
    components: dict[str, Scorer] = {}
    for name, w in choice.weights.items():
        if name == "ease" or not w:
            continue
        scorer = fitters[name](FitContext(frame, matrix, item_ids, side or {}))
        scales[name] = score_scale(scorer.score(x, list(matrix.user_ids)))
        components[name] = scorer
    return WeightedHybrid(anchor, weighting, components, dict(choice.weights), scales)
