"""The candidate recommenders (baselines, blend components, the hybrid), fitted the same way
by the benchmark and the nightly DAG, and the persistence of blend components. Every
candidate is a :class:`training.models.Scorer`; :func:`component_fitters` says which side
data each component needs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.settings import Settings
from training.hybrid import (
    ComponentFitter,
    FitContext,
    HybridChoice,
    InputWeighting,
    PopularityScorer,
    Scorer,
    WeightedHybrid,
    ease_size,
    fit_hybrid,
    tune_hybrid,
)
from training.models import ItemItemModel, RetrievalSpace, fit_ease, fit_item_knn, rows_dot

BASELINES = ("popularity", "item_knn", "ease")
COMPONENTS = ("als", "content", "neural")
NEEDS = {"als": ("spark",), "content": ("item_embeddings",), "neural": ()}


def binary(x: sp.csr_matrix) -> sp.csr_matrix:
    out = sp.csr_matrix(x, dtype=np.float32, copy=True)
    out.data[:] = 1.0
    return out


class ItemItemScorer(Scorer):
    """An :class:`ItemItemModel` fed the binary history."""

    kind: ClassVar[str] = "item_item"

    def __init__(self, model: ItemItemModel) -> None:
        self.model = model

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> sp.csr_matrix:
        return self.model.prepare(binary(x))

    def score_items(self, state: sp.csr_matrix, items: np.ndarray | None = None) -> np.ndarray:
        return self.model.score_items(state, items)


@dataclass
class ALSState:
    """Users' rows in the ALS model (-1: unknown) and the folded-in factors of the unknown ones."""

    rows: np.ndarray
    folded: np.ndarray


class ALSScorer(Scorer):
    """Implicit ALS: a known user's learned factors, an unknown user folded in from history."""

    kind: ClassVar[str] = "als"

    def __init__(self, model) -> None:
        self.model = model
        self.row_of = {u: r for r, u in enumerate(model.user_ids)}
        self._item_factors: np.ndarray | None = None

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> ALSState:
        ids = [None] * x.shape[0] if user_ids is None else user_ids
        rows = np.array([self.row_of.get(u, -1) for u in ids], dtype=np.int64)
        unknown = rows < 0
        folded = self.model.fold_in(binary(x)[unknown]) if unknown.any() else np.empty((0, self.model.rank), np.float32)
        return ALSState(rows, folded)

    def query(self, state: ALSState) -> np.ndarray:
        out = np.empty((len(state.rows), self.model.rank), dtype=np.float32)
        known = state.rows >= 0
        out[known] = self.model.user_factors[state.rows[known]]
        out[~known] = state.folded
        return out

    def score_items(self, state: ALSState, items: np.ndarray | None = None) -> np.ndarray:
        if items is not None:
            return rows_dot(self.query(state), self.retrieval_space().vectors[np.asarray(items)])
        out = np.empty((len(state.rows), self.model.item_factors.shape[0]), dtype=np.float32)
        known = state.rows >= 0
        if known.any():
            out[known] = self.model.score(state.rows[known])
        if (~known).any():
            out[~known] = self.model.score_factors(state.folded)
        return out

    def retrieval_space(self) -> RetrievalSpace:
        if self._item_factors is None:
            self._item_factors = np.asarray(self.model.item_factors, dtype=np.float32)
        return RetrievalSpace(self.kind, self._item_factors)


class ContentScorer(Scorer):
    """The content model (:class:`training.content.ContentModel`): cosine between the user's
    content profile and each item's embedding."""

    kind: ClassVar[str] = "content"
    retrieval_rank: ClassVar[int | None] = 1

    def __init__(self, model) -> None:
        self.model = model

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> np.ndarray:
        return self.model.profiles(x)

    def score_items(self, state: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        return self.model.score_profiles(state, items)

    def retrieval_space(self) -> RetrievalSpace:
        return RetrievalSpace(self.kind, self.model.item_vectors())

    def query(self, state: np.ndarray) -> np.ndarray:
        return state.astype(np.float32)


@dataclass
class NeuralState:
    """The binary history rows, their user ids and, per group of rows scored by one model
    (the global one: segment None), the user-tower outputs of those rows."""

    x: sp.csr_matrix
    user_ids: list
    groups: list[tuple[str | None, list[int], Any]]


class NeuralScorer(Scorer):
    """The neural recommender ``model``. With ``segment_models`` (segment → a model fine-tuned
    for it, :func:`training.segment_tuning.refit_segment_models`), a user whose segment in
    ``user_segments`` (user id → segment) has a model is scored by that model; every other
    user, and an unknown one, by ``model``. Candidates are retrieved in the global model's
    space (item-tower outputs and item biases)."""

    kind: ClassVar[str] = "neural"
    retrieval_rank: ClassVar[int | None] = 0

    def __init__(
        self, model, segment_models: Mapping[str, Any] | None = None, user_segments: Mapping[str, str] | None = None
    ) -> None:
        self.model = model
        self.segment_models = {str(s): m for s, m in (segment_models or {}).items()}
        self.user_segments = {str(u): str(s) for u, s in (user_segments or {}).items() if str(s) in self.segment_models}
        self._routed = None
        if self.user_segments:
            from training.segment_tuning import SegmentedRecommender

            self._routed = SegmentedRecommender(model, self.segment_models)

    def segment_of(self, user_id: Any) -> str | None:
        """The segment whose model scores ``user_id``; None when that is the global model."""
        return None if user_id is None else self.user_segments.get(str(user_id))

    def segment_labels(self) -> list[str]:
        return sorted(self.segment_models)

    def without_segments(self) -> NeuralScorer:
        return NeuralScorer(self.model)

    def _model(self, segment: str | None):
        return self.model if segment is None else self.segment_models[segment]

    def prepare(self, x: sp.csr_matrix, user_ids: Sequence | None = None) -> NeuralState:
        x = binary(x)
        ids = [None] * x.shape[0] if user_ids is None else list(user_ids)
        if self._routed is None:
            return NeuralState(x, ids, [(None, list(range(x.shape[0])), self.model.user_tensor(x, ids))])
        segments = [self.segment_of(u) for u in ids]
        groups = []
        for segment, rows in self._routed.groups(segments):
            model = self._model(segment)
            groups.append((segment, rows, model.user_tensor(x[rows], [ids[r] for r in rows])))
        return NeuralState(x, ids, groups)

    def score_items(self, state: NeuralState, items: np.ndarray | None = None) -> np.ndarray:
        if len(state.groups) == 1 and state.groups[0][0] is None:
            return self.model.score_users(state.groups[0][2], items)
        n_items = len(self.model.item_ids) if items is None else len(items)
        out = np.empty((len(state.user_ids), n_items), dtype=np.float32)
        for segment, rows, users in state.groups:
            out[rows] = self._model(segment).score_users(users, items)
        return out

    def query(self, state: NeuralState) -> np.ndarray:
        """The global model's user vectors (segment models only re-rank the candidates)."""
        if len(state.groups) == 1 and state.groups[0][0] is None:
            return state.groups[0][2].numpy()
        out = np.empty((len(state.user_ids), self.model.cfg.embedding_dim), dtype=np.float32)
        for segment, rows, users in state.groups:
            if segment is not None:
                users = self.model.user_tensor(state.x[rows], [state.user_ids[r] for r in rows])
            out[rows] = users.numpy()
        return out

    def retrieval_space(self) -> RetrievalSpace:
        vectors, bias = self.model.item_side()
        return RetrievalSpace(self.kind, vectors, bias)

    def quantized(self) -> NeuralScorer:
        from training.neural import quantize_int8

        return NeuralScorer(
            quantize_int8(self.model),
            {segment: quantize_int8(m) for segment, m in self.segment_models.items()},
            self.user_segments,
        )

    def is_quantized(self) -> bool:
        from training.neural import is_quantized

        return is_quantized(self.model.net)


def category_multi_hot(categories: Sequence[Sequence[str] | None]) -> np.ndarray:
    """Rows of 0/1 over the sorted distinct category labels; None or empty rows are all 0."""
    labels = sorted({c for cats in categories if cats is not None for c in cats if c})
    index = {c: j for j, c in enumerate(labels)}
    out = np.zeros((len(categories), len(labels)), dtype=np.float32)
    for row, cats in enumerate(categories):
        out[row, [index[c] for c in (cats if cats is not None else []) if c]] = 1.0
    return out


def item_side_features(side: dict) -> np.ndarray | None:
    """The neural item tower's dense input: category multi-hot next to content embeddings."""
    parts = [
        np.asarray(side[key], dtype=np.float32)
        for key in ("item_categories", "item_embeddings")
        if side.get(key) is not None
    ]
    return np.hstack(parts) if parts else None


def component_fitters(settings: Settings, progress: bool = False) -> dict[str, ComponentFitter]:
    """Fitters for the blendable components (ALS, content, neural) and popularity. Side data
    they read from ``FitContext.side``: ``item_embeddings`` (content embeddings, one row per item
    id: content model, neural item tower), ``item_categories`` (category multi-hot: neural item
    tower), ``user_features`` (a frame with ``user_id`` and demographic/context/segment
    columns: neural user tower) and ``spark`` (the Spark session: ALS). A component whose side
    data is missing is not offered (:func:`available`)."""
    cfg = settings.training

    def als(ctx: FitContext) -> Scorer:
        from training.als import fit_als

        return ALSScorer(
            fit_als(
                ctx.side["spark"],
                ctx.frame,
                ctx.item_ids,
                rank=cfg.als_rank,
                reg=cfg.als_reg,
                alpha=cfg.als_alpha,
                max_iter=cfg.als_iterations,
            )
        )

    def content(ctx: FitContext) -> Scorer:
        from training.content import fit_content

        return ContentScorer(fit_content(binary(ctx.matrix.matrix), np.asarray(ctx.side["item_embeddings"])))

    def neural(ctx: FitContext) -> Scorer:
        from training.neural import NeuralData, NeuralRecommender, fit_neural

        data = NeuralData.build(
            ctx.frame,
            ctx.item_ids,
            user_features=ctx.side.get("user_features"),
            item_features=item_side_features(dict(ctx.side)),
        )
        ncfg = settings.neural
        if ncfg.nproc == 1 and ncfg.device == "cpu":
            return NeuralScorer(fit_neural(data, ncfg, progress=progress, threads=ncfg.threads))
        import tempfile

        from training.ddp import launch, write_training_data

        with tempfile.TemporaryDirectory(prefix="hyperrec-ddp-") as tmp:
            write_training_data(data, Path(tmp) / "data")
            result = launch(
                Path(tmp) / "data",
                Path(tmp) / "out",
                nproc=ncfg.nproc,
                device=ncfg.device,
                cfg=ncfg,
                threads=ncfg.threads,
                progress=progress,
            )
            return NeuralScorer(NeuralRecommender.load(result["model_dir"]))

    return {
        "popularity": lambda ctx: PopularityScorer(ctx.matrix.matrix),
        "als": als,
        "content": content,
        "neural": neural,
    }


def available(side: dict) -> list[str]:
    """Components whose side data is present."""
    return [name for name in COMPONENTS if all(side.get(key) is not None for key in NEEDS[name])]


def tune_choice(
    ctx: FitContext,
    settings: Settings,
    *,
    weight_col: str | None = "rating",
    progress: bool = False,
    blend: bool = True,
    log: Callable[[str], None] = print,
) -> HybridChoice:
    """:func:`training.hybrid.tune_hybrid` over popularity and every available component
    (``blend=False``: only the EASE λ/β/α search, no component is fitted)."""
    fitters = component_fitters(settings, progress)
    offered = {n: f for n, f in fitters.items() if blend and (n == "popularity" or n in available(dict(ctx.side)))}
    return tune_hybrid(
        ctx.frame,
        ctx.item_ids,
        settings.training,
        offered,
        k=settings.training.k,
        weight_col=weight_col,
        side=ctx.side,
        log=log,
    )


def fit_once(fitters: Mapping[str, ComponentFitter]) -> dict[str, ComponentFitter]:
    """``fitters`` that each fit once and return that scorer on later calls: for fitting
    every candidate on one frame, where the hybrid's components are the standalone ones."""
    fitted: dict[str, Scorer] = {}

    def once(name: str, fit: ComponentFitter) -> ComponentFitter:
        def fit_or_reuse(ctx: FitContext) -> Scorer:
            if name not in fitted:
                fitted[name] = fit(ctx)
            return fitted[name]

        return fit_or_reuse

    return {name: once(name, fit) for name, fit in fitters.items()}


def fit_candidate(
    name: str,
    ctx: FitContext,
    settings: Settings,
    *,
    choice: HybridChoice | None = None,
    weight_col: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    fitters: Mapping[str, ComponentFitter] | None = None,
) -> tuple[Scorer, HybridChoice | None]:
    """Fit candidate ``name`` on ``ctx``; ``hybrid`` (and ``ease``, for its λ) use ``choice``,
    running :func:`tune_hybrid` first when it is None. Components come from ``fitters``
    (default :func:`component_fitters`). Returns the scorer and the choice."""
    cfg = settings.training
    fitters = fitters or component_fitters(settings, progress)
    if name in ("ease", "hybrid") and choice is None:
        choice = tune_choice(ctx, settings, weight_col=weight_col, progress=progress, log=log)
    x = ctx.matrix.matrix
    if name == "popularity":
        return PopularityScorer(x), choice
    if name == "item_knn":
        return ItemItemScorer(fit_item_knn(binary(x), cfg.knn_neighbours)), choice
    if name == "ease":
        return ItemItemScorer(fit_ease(binary(x), choice.plain_ease_lambda, **ease_size(cfg))), choice
    if name == "hybrid":
        return fit_hybrid(
            ctx.frame,
            ctx.item_ids,
            choice,
            fitters,
            weight_col=weight_col,
            temporal_window=cfg.temporal_window,
            side=ctx.side,
            cfg=cfg,
        ), choice
    if name in fitters:
        return fitters[name](ctx), choice
    raise ValueError(f"unknown candidate {name!r}; known: {', '.join(BASELINES + COMPONENTS + ('hybrid',))}")


# --------------------------------------------------------------------------- persistence
SCORER_FILE = "scorer.json"


def save_scorer(scorer: Scorer, directory: Path) -> Path:
    """Write a blend component to ``directory`` (``scorer.json`` names its kind last)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(scorer, PopularityScorer):
        kind = "popularity"
        np.save(directory / "popularity.npy", scorer.values.astype(np.float32))
    elif isinstance(scorer, ALSScorer):
        kind, m = "als", scorer.model
        np.save(directory / "user_factors.npy", m.user_factors.astype(np.float32))
        np.save(directory / "item_factors.npy", m.item_factors.astype(np.float32))
        (directory / "users.json").write_text(json.dumps([str(u) for u in m.user_ids]))
        extra = {"reg": m.reg, "alpha": m.alpha}
    elif isinstance(scorer, ContentScorer):
        kind, m = "content", scorer.model
        np.save(directory / "item_embeddings.npy", m.item_embeddings.astype(np.float32))
        np.save(directory / "item_weights.npy", np.asarray(m.item_weights, dtype=np.float32))
    elif isinstance(scorer, NeuralScorer):
        kind = "neural"
        scorer.model.save(directory / "neural")
        _save_segment_models(scorer, directory / SEGMENT_MODELS_DIR)
    else:
        raise TypeError(f"cannot save a {type(scorer).__name__} blend component")
    meta = {"kind": kind} | (extra if kind == "als" else {})
    (directory / SCORER_FILE).write_text(json.dumps(meta))
    return directory


def load_scorer(directory: Path) -> Scorer:
    """Read a component written by :func:`save_scorer`; user ids are strings after loading."""
    directory = Path(directory)
    path = directory / SCORER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"blend component {directory} is missing {SCORER_FILE}")
    meta = json.loads(path.read_text())
    kind = meta.get("kind")
    if kind == "popularity":
        return PopularityScorer.of(np.load(directory / "popularity.npy"))
    if kind == "als":
        from training.als import FactorModel

        users = np.array(json.loads((directory / "users.json").read_text()), dtype=object)
        return ALSScorer(
            FactorModel(
                users,
                np.load(directory / "user_factors.npy"),
                np.load(directory / "item_factors.npy"),
                float(meta["reg"]),
                float(meta["alpha"]),
            )
        )
    if kind == "content":
        from training.content import ContentModel

        return ContentScorer(
            ContentModel(np.load(directory / "item_embeddings.npy"), np.load(directory / "item_weights.npy"))
        )
    if kind == "neural":
        from training.neural import NeuralRecommender

        segment_models, user_segments = _load_segment_models(directory / SEGMENT_MODELS_DIR)
        return NeuralScorer(NeuralRecommender.load(directory / "neural"), segment_models, user_segments)
    raise ValueError(f"{path}: unknown blend component kind {kind!r}")


SEGMENT_MODELS_DIR = "segments"


def _save_segment_models(scorer: NeuralScorer, directory: Path) -> None:
    """The segment models (:func:`training.segment_tuning.save_segment_models`) and
    ``users.parquet`` (user_id, segment) of the users they score; nothing without segment models."""
    import shutil

    if directory.exists():
        shutil.rmtree(directory)
    if not scorer.segment_models:
        return
    from training.segment_tuning import save_segment_models

    save_segment_models(scorer.segment_models, directory)
    users = pd.DataFrame(
        {"user_id": list(scorer.user_segments), "segment": list(scorer.user_segments.values())}, dtype=str
    )
    users.to_parquet(directory / "users.parquet", index=False)


def _load_segment_models(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not directory.is_dir():
        return {}, {}
    from training.segment_tuning import load_segment_models

    try:
        models = {str(s): m for s, m in load_segment_models(directory).items()}
        users = pd.read_parquet(directory / "users.parquet")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{directory}: unreadable segment models ({type(exc).__name__}: {exc})") from exc
    unknown = sorted(set(users["segment"].astype(str)) - set(models))
    if unknown:
        raise ValueError(f"{directory / 'users.parquet'}: segments {unknown[:5]} have no model in segments.json")
    return models, dict(zip(users["user_id"].astype(str), users["segment"].astype(str)))


def as_blend(name: str, scorer: Scorer | ItemItemModel, n_items: int) -> WeightedHybrid:
    """Any candidate as a :class:`WeightedHybrid`, the one form bundles and evaluation use:
    an item-item model becomes the anchor (binary input), a component gets a zero anchor."""
    if isinstance(scorer, WeightedHybrid):
        return scorer
    if isinstance(scorer, ItemItemScorer):
        scorer = scorer.model
    if isinstance(scorer, ItemItemModel):
        return WeightedHybrid(scorer, InputWeighting(), {}, {"ease": 1.0}, {"ease": 1.0}, name=name)
    if isinstance(scorer, PopularityScorer):
        return WeightedHybrid(
            ItemItemModel(name, bias=scorer.values.astype(np.float32)),
            InputWeighting(),
            {},
            {"ease": 1.0},
            {"ease": 1.0},
            name=name,
        )
    zero = ItemItemModel(name, bias=np.zeros(n_items, dtype=np.float32))
    return WeightedHybrid(
        zero, InputWeighting(), {name: scorer}, {"ease": 0.0, name: 1.0}, {"ease": 1.0, name: 1.0}, name=name
    )
