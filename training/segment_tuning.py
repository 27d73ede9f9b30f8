"""Per-segment fine-tuning of the neural recommender and its Optuna search: a copy of the
global model trained further on one segment's users is kept when it beats the global model
on that segment's validation users (NDCG@k) by more than ``tuning.min_gain``. See
docs/models.md for the definitions (fit/validation, segment NDCG, gain, search).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import scipy.sparse as sp
import torch

from core.settings import Settings, TuningSettings
from core.tracking import configure
from pipelines.split import user_kfold
from training.evaluation import relevant_items
from training.metrics import evaluate
from training.models import InteractionMatrix, top_k
from training.neural import NeuralConfig, NeuralData, NeuralNet, NeuralRecommender, fit_neural, train

__all__ = [
    "PARAM_NAMES",
    "SegmentSearch",
    "SegmentTuning",
    "SegmentedRecommender",
    "fine_tune",
    "finetune_config",
    "fine_tune_segments",
    "kept_params",
    "load_segment_models",
    "refit_segment_models",
    "save_segment_models",
    "search_segment",
    "train_global_models",
    "tune_segments",
    "validation_split",
]

PARAM_NAMES = ("lr", "weight_decay", "dropout", "embedding_dim")
"""Keys a fine-tuning parameter set may hold (see :func:`finetune_config`)."""
SEGMENTS_FILE = "segments.json"

Log = Callable[[str], None]


# --------------------------------------------------------------------------- validation data
@dataclass
class _Validation:
    """``fit_frame`` indexed once (the axis every global model shares) and the relevant items."""

    fit: InteractionMatrix
    relevant: dict
    k: int

    @classmethod
    def build(
        cls, fit_frame: pd.DataFrame, val_frame: pd.DataFrame, item_ids: np.ndarray, k: int, weight_col: str | None
    ) -> _Validation:
        for name, frame in (("fit_frame", fit_frame), ("val_frame", val_frame)):
            missing = [c for c in ("user_id", "item_id") if c not in frame.columns]
            if missing:
                raise ValueError(f"segment tuning: {name} lacks column(s) {missing}")
        fit = InteractionMatrix.from_frame(
            fit_frame, item_ids=np.asarray(item_ids, dtype=object), weight_col=weight_col
        )
        if fit.matrix.nnz == 0:
            raise ValueError("segment tuning: no interaction of fit_frame matches item_ids")
        return cls(fit, relevant_items(fit, val_frame), k)

    def rows(self, users: Sequence) -> np.ndarray:
        return np.array([self.fit.user_index[u] for u in users], dtype=np.int64)

    def ndcg(self, rec: NeuralRecommender, users: Sequence) -> float:
        """Segment NDCG@k of ``rec`` over ``users`` (validation users), fit history excluded."""
        if not len(users):
            return 0.0
        x = self.fit.matrix[self.rows(users)]
        top = top_k(rec.score(x, list(users)), x, self.k)
        recs = {u: list(self.fit.item_ids[t]) for u, t in zip(users, top)}
        return evaluate(recs, {u: self.relevant[u] for u in users}, self.k)[f"ndcg@{self.k}"]


def validation_split(train_frame: pd.DataFrame, settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(fit_frame, val_frame)``: fold 0 of :func:`pipelines.split.user_kfold` over the
    train split with ``training.validation_folds`` folds and ``training.validation_seed``."""
    return user_kfold(train_frame, settings.training.validation_folds, settings.training.validation_seed)[0]


def _segment_users(segment_of: Mapping[Hashable, Hashable], fit: InteractionMatrix) -> dict[Hashable, list]:
    """segment → its users present in ``fit``, in fit row order; segments sorted by ``str``."""
    groups: dict[Hashable, list] = {}
    for user in fit.user_ids:
        if user in segment_of:
            groups.setdefault(segment_of[user], []).append(user)
    for segment in set(segment_of.values()):
        groups.setdefault(segment, [])
    return {s: groups[s] for s in sorted(groups, key=str)}


def _check_global(rec: NeuralRecommender, fit: InteractionMatrix) -> None:
    if not isinstance(rec.net, NeuralNet) or any(
        type(m).__module__.startswith("torch.ao.nn.quantized") for m in rec.net.modules()
    ):
        raise ValueError("segment tuning: the global model must be a float NeuralNet (not quantized)")
    dim = rec.cfg.embedding_dim
    if len(rec.item_ids) != len(fit.item_ids) or not all(a == b for a, b in zip(rec.item_ids, fit.item_ids)):
        raise ValueError(
            f"segment tuning: the global model (embedding_dim {dim}) has {len(rec.item_ids)} items "
            f"that differ from item_ids ({len(fit.item_ids)}); pass the ids it was trained with"
        )
    if len(rec.user_ids) != len(fit.user_ids) or not all(a == b for a, b in zip(rec.user_ids, fit.user_ids)):
        extra = sorted(set(fit.user_ids) - set(rec.user_ids), key=str)[:3]
        raise ValueError(
            f"segment tuning: the global model (embedding_dim {dim}) knows {len(rec.user_ids)} users, "
            f"fit_frame has {len(fit.user_ids)} (e.g. unknown to the model: {extra}); "
            "it must be trained on fit_frame"
        )


# --------------------------------------------------------------------------- global models
def train_global_models(
    fit_frame: pd.DataFrame,
    item_ids: np.ndarray,
    settings: Settings,
    dims: Sequence[int],
    *,
    user_features: pd.DataFrame | None = None,
    item_features: np.ndarray | None = None,
    weight_col: str | None = None,
    known: Mapping[int, NeuralRecommender] | None = None,
    progress: bool = False,
) -> dict[int, NeuralRecommender]:
    """One global model per embedding dimension in ``dims``, trained on ``fit_frame`` with
    ``settings.neural`` (only ``embedding_dim`` changed); models in ``known`` are reused."""
    models = dict(known or {})
    missing = [d for d in dict.fromkeys(dims) if d not in models]
    if missing:
        data = NeuralData.build(fit_frame, item_ids, user_features, item_features, weight_col)
        for dim in missing:
            cfg = NeuralConfig(**(settings.neural.model_dump() | {"embedding_dim": int(dim)}))
            models[dim] = fit_neural(data, cfg, progress=progress, threads=cfg.threads)
    return {d: models[d] for d in sorted(models)}


# --------------------------------------------------------------------------- fine-tuning
def finetune_config(
    base: NeuralConfig, tuning: TuningSettings, params: Mapping[str, Any] | None = None
) -> NeuralConfig:
    """The fine-tuning config: ``base`` with ``tuning.segment_finetune_epochs`` epochs, lr
    ``base.lr × tuning.segment_lr_scale`` and ``params`` (lr, weight_decay, dropout) on top.
    ``params['embedding_dim']``, when given, must equal ``base.embedding_dim``."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAM_NAMES))
    if unknown:
        raise ValueError(f"finetune_config: unknown parameter(s) {unknown}; allowed {list(PARAM_NAMES)}")
    if "embedding_dim" in params and int(params["embedding_dim"]) != base.embedding_dim:
        raise ValueError(
            f"finetune_config: embedding_dim {params['embedding_dim']} differs from the starting "
            f"model's {base.embedding_dim}"
        )
    update = {"epochs": tuning.segment_finetune_epochs, "lr": base.lr * tuning.segment_lr_scale}
    update |= {name: float(params[name]) for name in ("lr", "weight_decay", "dropout") if name in params}
    return NeuralConfig(**(base.model_dump() | update))


def fine_tune(
    start: NeuralRecommender, fit: InteractionMatrix, users: Sequence, cfg: NeuralConfig
) -> NeuralRecommender:
    """Copy ``start``'s weights, train them on the rows of ``users`` in ``fit`` (the matrix
    ``start`` was trained on) with ``cfg``, and return a model over all of ``start``'s
    users: the fine-tuned towers and item parameters, the fine-tuned ID embeddings of
    ``users`` and ``start``'s ID embeddings for everyone else. ``start`` is not modified."""
    if not len(users):
        raise ValueError("fine_tune: no user to fine-tune on")
    unknown = [u for u in users if u not in fit.user_index]
    if unknown:
        raise ValueError(f"fine_tune: {len(unknown)} user(s) without fit interactions, e.g. {unknown[:3]}")
    src = start.net
    rows = np.array([fit.user_index[u] for u in users], dtype=np.int64)
    state = {name: value.detach().cpu().clone() for name, value in src.state_dict().items()}
    user_dense = state["user_dense"][:-1].numpy()
    item_dense = state["item_dense"].numpy()
    index = torch.as_tensor(rows)
    sub = InteractionMatrix(
        sp.csr_matrix(fit.matrix[rows]),
        fit.user_ids[rows],
        fit.item_ids,
        {u: i for i, u in enumerate(fit.user_ids[rows])},
        fit.item_index,
    )
    data = NeuralData(sub, user_dense[rows], item_dense, list(start.user_feature_names))
    sub_state = dict(state)
    sub_state["user_id.weight"] = torch.cat([state["user_id.weight"][index], state["user_id.weight"][-1:]])
    sub_state["user_dense"] = torch.cat([state["user_dense"][index], state["user_dense"][-1:]])
    with torch.random.fork_rng(devices=[]):  # the constructors' random init is overwritten below
        net = NeuralNet(len(rows), fit.matrix.shape[1], user_dense[rows], item_dense, cfg)
        net.load_state_dict(sub_state)
        results = train(net, data, cfg, progress=False)
        full = NeuralNet(len(start.user_ids), fit.matrix.shape[1], user_dense, item_dense, cfg)
    tuned = {name: value.detach().clone() for name, value in net.state_dict().items()}
    user_weight = state["user_id.weight"].clone()
    user_weight[index] = tuned["user_id.weight"][:-1]
    full.load_state_dict(tuned | {"user_id.weight": user_weight, "user_dense": state["user_dense"]})
    return NeuralRecommender(
        full, cfg, start.user_ids, start.item_ids, start.user_feature_names, [r.loss for r in results]
    )


@dataclass
class SegmentTuning:
    """Per-segment outcome: ``results`` holds one row per segment (``segment``, ``users``,
    ``validation_users``, ``global_ndcg``, ``finetuned_ndcg``, ``gain``, ``kept``,
    ``reason``, ``params``, ``seconds``; NDCG and gain are None for a skipped segment) and
    ``models`` the kept segment models."""

    global_model: NeuralRecommender
    results: list[dict]
    models: dict[Hashable, NeuralRecommender]
    k: int
    searches: dict[Hashable, SegmentSearch] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary (numpy scalars become Python numbers)."""
        return {
            "k": self.k,
            "kept": [_plain(r["segment"]) for r in self.results if r["kept"]],
            "results": [{key: _plain(value) for key, value in r.items()} for r in self.results],
            "searches": {str(s): v.to_dict() for s, v in self.searches.items()},
        }

    def recommender(self) -> SegmentedRecommender:
        return SegmentedRecommender(self.global_model, self.models)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _row(segment: Hashable, users: int, val_users: int) -> dict:
    return {
        "segment": segment,
        "users": users,
        "validation_users": val_users,
        "global_ndcg": None,
        "finetuned_ndcg": None,
        "gain": None,
        "kept": False,
        "reason": None,
        "params": {},
        "seconds": 0.0,
    }


def _fine_tune_one(
    ctx: _Validation,
    global_rec: NeuralRecommender,
    starts: Mapping[int, NeuralRecommender],
    segment: Hashable,
    users: list,
    val_users: list,
    params: Mapping[str, Any],
    tuning: TuningSettings,
) -> tuple[dict, NeuralRecommender | None]:
    """Fine-tune one segment and judge it on ``val_users`` against ``global_rec``."""
    row = _row(segment, len(users), len(val_users))
    if len(val_users) < tuning.min_validation_users:
        row["reason"] = (
            f"{len(val_users)} validation users < tuning.min_validation_users ({tuning.min_validation_users})"
        )
        return row, None
    started = time.perf_counter()
    dim = int(params.get("embedding_dim", global_rec.cfg.embedding_dim))
    start = starts[dim]
    cfg = finetune_config(start.cfg, tuning, params)
    model = fine_tune(start, ctx.fit, users, cfg)
    g, f = ctx.ndcg(global_rec, val_users), ctx.ndcg(model, val_users)
    kept = f - g > tuning.min_gain
    row |= {
        "global_ndcg": g,
        "finetuned_ndcg": f,
        "gain": f - g,
        "kept": bool(kept),
        "reason": None if kept else f"gain {f - g:+.4f} <= tuning.min_gain ({tuning.min_gain:g})",
        "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "dropout": cfg.dropout, "embedding_dim": dim},
        "seconds": time.perf_counter() - started,
    }
    return row, model if kept else None


def fine_tune_segments(
    global_rec: NeuralRecommender,
    fit_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    segment_of: Mapping[Hashable, Hashable],
    item_ids: np.ndarray,
    settings: Settings,
    *,
    user_features: pd.DataFrame | None = None,
    item_features: np.ndarray | None = None,
    weight_col: str | None = None,
    params_by_segment: Mapping[Hashable, Mapping[str, Any]] | None = None,
    globals_by_dim: Mapping[int, NeuralRecommender] | None = None,
    log: Log = print,
) -> SegmentTuning:
    """Fine-tune ``global_rec`` (trained on ``fit_frame``) on each segment of ``segment_of``
    (user → segment) and keep the segment models that beat it on the segment's validation
    users of ``val_frame`` (docs/models.md defines every term).

    ``params_by_segment[segment]`` overrides lr / weight_decay / dropout / embedding_dim;
    a segment starts from ``globals_by_dim[embedding_dim]`` (``global_rec`` for its own
    dimension), and a missing dimension is trained on ``fit_frame`` with the given features.
    """
    ctx = _Validation.build(fit_frame, val_frame, item_ids, settings.training.k, weight_col)
    _check_global(global_rec, ctx.fit)
    params_by_segment = params_by_segment or {}
    starts: dict[int, NeuralRecommender] = {global_rec.cfg.embedding_dim: global_rec} | dict(globals_by_dim or {})
    dims = {int(p.get("embedding_dim", global_rec.cfg.embedding_dim)) for p in params_by_segment.values()}
    starts = train_global_models(
        fit_frame,
        item_ids,
        settings,
        sorted(dims | set(starts)),
        user_features=user_features,
        item_features=item_features,
        weight_col=weight_col,
        known=starts,
    )
    for start in starts.values():
        _check_global(start, ctx.fit)
    results, models = [], {}
    for segment, users in _segment_users(segment_of, ctx.fit).items():
        val_users = [u for u in users if u in ctx.relevant]
        row, model = _fine_tune_one(
            ctx, global_rec, starts, segment, users, val_users, params_by_segment.get(segment, {}), settings.tuning
        )
        _log_row(log, row, ctx.k)
        results.append(row)
        if model is not None:
            models[segment] = model
    return SegmentTuning(global_rec, results, models, ctx.k)


def _log_row(log: Log, row: dict, k: int) -> None:
    if row["gain"] is None:
        log(f"  segment {row['segment']!r}: skipped ({row['reason']})")
    else:
        log(
            f"  segment {row['segment']!r}: ndcg@{k} global {row['global_ndcg']:.4f} → fine-tuned "
            f"{row['finetuned_ndcg']:.4f} (gain {row['gain']:+.4f}, {row['validation_users']} users) "
            f"{'kept' if row['kept'] else 'discarded'}"
        )


# --------------------------------------------------------------------------- search
@dataclass
class SegmentSearch:
    """One segment's Optuna study: the best parameters, their validation NDCG@k, the
    global model's NDCG@k on the same users and the MLflow run that logged it."""

    segment: Hashable
    best_params: dict[str, Any]
    best_value: float
    global_ndcg: float
    n_trials: int
    run_id: str | None
    study: optuna.Study = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "segment": _plain(self.segment),
            "best_params": dict(self.best_params),
            "best_value": self.best_value,
            "global_ndcg": self.global_ndcg,
            "n_trials": self.n_trials,
            "run_id": self.run_id,
        }


def _suggest(trial: optuna.Trial, tuning: TuningSettings) -> dict[str, Any]:
    return {
        "lr": trial.suggest_float("lr", *tuning.lr_range, log=True),
        "weight_decay": trial.suggest_float("weight_decay", *tuning.weight_decay_range, log=True),
        "dropout": trial.suggest_float("dropout", *tuning.dropout_range),
        "embedding_dim": trial.suggest_categorical("embedding_dim", list(tuning.embedding_dims)),
    }


def _start_study_run(settings: Settings, segment: Hashable) -> mlflow.ActiveRun:
    """An MLflow run for a segment study: nested under the active run, else top-level in
    the configured experiment."""
    tags = {"hyperrec.stage": "segment_search", "hyperrec.segment": str(segment)}
    parent = mlflow.active_run()
    if parent is None:
        configure(settings)
        return mlflow.start_run(run_name=f"segment-{segment}-search", tags=tags)
    return mlflow.start_run(
        run_name=f"segment-{segment}-search", nested=True, experiment_id=parent.info.experiment_id, tags=tags
    )


def _search(
    ctx: _Validation,
    global_rec: NeuralRecommender,
    starts: Mapping[int, NeuralRecommender],
    segment: Hashable,
    users: list,
    val_users: list,
    settings: Settings,
    log: Log,
    track: bool,
) -> SegmentSearch:
    tuning = settings.tuning
    if len(val_users) < tuning.min_validation_users:
        raise ValueError(
            f"search_segment: segment {segment!r} has {len(val_users)} validation users "
            f"< tuning.min_validation_users ({tuning.min_validation_users})"
        )
    missing = sorted(set(tuning.embedding_dims) - set(starts))
    if missing:
        raise ValueError(f"search_segment: no global model for embedding dimension(s) {missing}")
    global_ndcg = ctx.ndcg(global_rec, val_users)

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, tuning)
        start = starts[params["embedding_dim"]]
        model = fine_tune(start, ctx.fit, users, finetune_config(start.cfg, tuning, params))
        return ctx.ndcg(model, val_users)

    def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        log(f"  segment {segment!r} trial {trial.number}: ndcg@{ctx.k}={trial.value:.4f} {trial.params}")
        if track:
            mlflow.log_metrics(
                {"trial_value": float(trial.value)}
                | {f"trial_{name}": float(value) for name, value in trial.params.items()},
                step=trial.number,
            )

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are logged by on_trial
    try:
        study = optuna.create_study(
            direction="maximize",
            study_name=f"segment-{segment}",
            sampler=optuna.samplers.TPESampler(seed=tuning.optuna_seed, n_startup_trials=tuning.optuna_startup_trials),
        )
        run_id = _optimize(
            study,
            objective,
            on_trial,
            settings,
            segment,
            track,
            global_ndcg,
            {"users": len(users), "search_validation_users": len(val_users), "k": ctx.k},
        )
    finally:
        optuna.logging.set_verbosity(verbosity)
    return SegmentSearch(
        segment, dict(study.best_params), float(study.best_value), global_ndcg, len(study.trials), run_id, study
    )


def _optimize(
    study: optuna.Study,
    objective: Callable,
    on_trial: Callable,
    settings: Settings,
    segment: Hashable,
    track: bool,
    global_ndcg: float,
    facts: dict[str, Any],
) -> str | None:
    """Run ``study``; with ``track``, inside a segment study run that gets the search space,
    each trial (step-indexed ``trial_*`` metrics), the best parameters and ``trials.csv``."""
    tuning = settings.tuning
    if not track:
        study.optimize(objective, n_trials=tuning.optuna_trials, callbacks=[on_trial])
        return None
    with _start_study_run(settings, segment) as run:
        mlflow.log_params(
            {
                "segment": str(segment),
                "n_trials": tuning.optuna_trials,
                "sampler": "TPESampler",
                "startup_trials": tuning.optuna_startup_trials,
                "optuna_seed": tuning.optuna_seed,
                "lr_range": list(tuning.lr_range),
                "weight_decay_range": list(tuning.weight_decay_range),
                "dropout_range": list(tuning.dropout_range),
                "embedding_dims": list(tuning.embedding_dims),
                "finetune_epochs": tuning.segment_finetune_epochs,
            }
            | facts
        )
        study.optimize(objective, n_trials=tuning.optuna_trials, callbacks=[on_trial])
        mlflow.log_params({f"best_{name}": value for name, value in study.best_params.items()})
        mlflow.log_metrics(
            {"best_value": study.best_value, "global_ndcg": global_ndcg, "best_gain": study.best_value - global_ndcg}
        )
        mlflow.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
        return run.info.run_id


def search_segment(
    segment: Hashable,
    users: Sequence,
    fit_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    globals_by_dim: Mapping[int, NeuralRecommender],
    item_ids: np.ndarray,
    settings: Settings,
    *,
    global_rec: NeuralRecommender | None = None,
    weight_col: str | None = None,
    track: bool = True,
    log: Log = print,
) -> SegmentSearch:
    """Optuna TPE search of the fine-tuning parameters for ``segment`` (its ``users``):
    ``tuning.optuna_trials`` trials scored by the segment NDCG@k on ``val_frame``, each
    starting from ``globals_by_dim[embedding_dim]`` (one model per ``tuning.embedding_dims``,
    all trained on ``fit_frame``). ``global_rec`` (default: the model of
    ``neural.embedding_dim``, else the first) is the baseline logged as ``global_ndcg``.
    With ``track`` the study is one MLflow run (see :func:`_start_study_run`)."""
    ctx = _Validation.build(fit_frame, val_frame, item_ids, settings.training.k, weight_col)
    for start in globals_by_dim.values():
        _check_global(start, ctx.fit)
    if global_rec is None:
        if not globals_by_dim:
            raise ValueError("search_segment: globals_by_dim is empty")
        global_rec = globals_by_dim.get(settings.neural.embedding_dim) or next(iter(globals_by_dim.values()))
    members = [u for u in users if u in ctx.fit.user_index]
    val_users = [u for u in members if u in ctx.relevant]
    return _search(ctx, global_rec, globals_by_dim, segment, members, val_users, settings, log, track)


# --------------------------------------------------------------------------- search + fine-tune
def _split_users(segment: Hashable, users: list, share: float, seed: int) -> tuple[list, list]:
    """(search users, decision users): a seeded shuffle of ``users`` cut at ``round(share·n)``;
    the seed mixes ``seed`` with a CRC32 of ``str(segment)``, so segments split independently."""
    rng = np.random.default_rng([seed, zlib.crc32(str(segment).encode())])
    order = rng.permutation(len(users))
    cut = int(round(share * len(users)))
    return [users[i] for i in sorted(order[:cut])], [users[i] for i in sorted(order[cut:])]


def tune_segments(
    global_rec: NeuralRecommender,
    fit_frame: pd.DataFrame,
    val_frame: pd.DataFrame,
    segment_of: Mapping[Hashable, Hashable],
    item_ids: np.ndarray,
    settings: Settings,
    *,
    user_features: pd.DataFrame | None = None,
    item_features: np.ndarray | None = None,
    weight_col: str | None = None,
    globals_by_dim: Mapping[int, NeuralRecommender] | None = None,
    track: bool = True,
    progress: bool = True,
    log: Log = print,
) -> SegmentTuning:
    """Per segment: split its validation users into a search share (``tuning.search_share``)
    and a decision share (seed ``training.validation_seed``), run :func:`search_segment` on
    the first, fine-tune with the best parameters and keep the model iff it beats
    ``global_rec`` on the second. Result rows count the decision users as
    ``validation_users`` and add ``search_users`` and ``search_value``. Global models for
    every ``tuning.embedding_dims`` are trained once on ``fit_frame`` (``global_rec`` and
    ``globals_by_dim`` are reused). Each
    study's MLflow run also gets the decision metrics (``decision_global_ndcg``,
    ``finetuned_ndcg``, ``gain``, ``kept``)."""
    tuning = settings.tuning
    ctx = _Validation.build(fit_frame, val_frame, item_ids, settings.training.k, weight_col)
    _check_global(global_rec, ctx.fit)
    known = {global_rec.cfg.embedding_dim: global_rec} | dict(globals_by_dim or {})
    starts = train_global_models(
        fit_frame,
        item_ids,
        settings,
        list(tuning.embedding_dims),
        user_features=user_features,
        item_features=item_features,
        weight_col=weight_col,
        known=known,
        progress=progress,
    )
    for start in starts.values():
        _check_global(start, ctx.fit)
    groups = _segment_users(segment_of, ctx.fit)
    results, models, searches = [], {}, {}
    from tqdm.auto import tqdm

    for segment, users in tqdm(
        groups.items(), desc="segment tuning", unit="segment", disable=not progress, leave=False
    ):
        val_users = [u for u in users if u in ctx.relevant]
        search_users, decide_users = _split_users(
            segment, val_users, tuning.search_share, settings.training.validation_seed
        )
        smallest = min(len(search_users), len(decide_users))
        if smallest < tuning.min_validation_users:
            row = _row(segment, len(users), len(decide_users)) | {"search_users": len(search_users)}
            row["reason"] = (
                f"{len(val_users)} validation users split {len(search_users)} search / "
                f"{len(decide_users)} decision; each needs tuning.min_validation_users "
                f"({tuning.min_validation_users})"
            )
            _log_row(log, row, ctx.k)
            results.append(row)
            continue
        search = _search(ctx, global_rec, starts, segment, users, search_users, settings, log, track)
        searches[segment] = search
        row, model = _fine_tune_one(ctx, global_rec, starts, segment, users, decide_users, search.best_params, tuning)
        row |= {"search_users": len(search_users), "search_value": search.best_value}
        _log_row(log, row, ctx.k)
        results.append(row)
        if model is not None:
            models[segment] = model
        if search.run_id is not None:
            mlflow.MlflowClient().log_batch(
                search.run_id,
                metrics=[
                    mlflow.entities.Metric(name, float(value), int(time.time() * 1000), 0)
                    for name, value in (
                        ("decision_global_ndcg", row["global_ndcg"]),
                        ("finetuned_ndcg", row["finetuned_ndcg"]),
                        ("gain", row["gain"]),
                        ("kept", float(row["kept"])),
                        ("decision_users", len(decide_users)),
                    )
                ],
            )
    return SegmentTuning(global_rec, results, models, ctx.k, searches)


def kept_params(tuning: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """segment → the fine-tuning parameters of each kept segment in a :meth:`SegmentTuning.to_dict`."""
    return {str(r["segment"]): dict(r["params"]) for r in tuning.get("results", []) if r.get("kept")}


def refit_segment_models(
    start: NeuralRecommender,
    fit_frame: pd.DataFrame,
    item_ids: np.ndarray,
    params_by_segment: Mapping[Hashable, Mapping[str, Any]],
    segment_of: Mapping[Hashable, Hashable],
    settings: Settings,
    *,
    user_features: pd.DataFrame | None = None,
    item_features: np.ndarray | None = None,
    weight_col: str | None = None,
    log: Log = print,
) -> dict[Hashable, NeuralRecommender]:
    """The served segment models: for each segment of ``params_by_segment`` (those validation
    kept, with the parameters it chose), :func:`fine_tune` of ``start`` (trained on all of
    ``fit_frame``, e.g. the whole train split) on the segment's users in ``fit_frame``.

    No keep/discard decision is made here. A segment whose chosen ``embedding_dim`` differs
    from ``start``'s starts from a global model of that dimension trained on ``fit_frame``
    (:func:`train_global_models`); a segment without users in ``fit_frame`` gets no model.
    """
    fit = InteractionMatrix.from_frame(fit_frame, item_ids=np.asarray(item_ids, dtype=object), weight_col=weight_col)
    _check_global(start, fit)
    own = start.cfg.embedding_dim
    dims = sorted({int(p.get("embedding_dim", own)) for p in params_by_segment.values()} | {own})
    starts = train_global_models(
        fit_frame,
        item_ids,
        settings,
        dims,
        user_features=user_features,
        item_features=item_features,
        weight_col=weight_col,
        known={own: start},
    )
    groups = _segment_users(segment_of, fit)
    models: dict[Hashable, NeuralRecommender] = {}
    for segment, params in params_by_segment.items():
        users = groups.get(segment, [])
        if not users:
            log(f"  segment {segment!r}: no user in the fit frame, no served model")
            continue
        begin = starts[int(params.get("embedding_dim", own))]
        started = time.perf_counter()
        models[segment] = fine_tune(begin, fit, users, finetune_config(begin.cfg, settings.tuning, params))
        log(
            f"  segment {segment!r}: served model fine-tuned on {len(users)} users "
            f"in {time.perf_counter() - started:.1f}s"
        )
    return models


# --------------------------------------------------------------------------- serving
class SegmentedRecommender:
    """Scores each user with their segment's kept model, else with the global model."""

    def __init__(self, global_model: NeuralRecommender, models: Mapping[Hashable, NeuralRecommender]):
        for segment, model in models.items():
            if len(model.item_ids) != len(global_model.item_ids) or any(
                a != b for a, b in zip(model.item_ids, global_model.item_ids)
            ):
                raise ValueError(f"SegmentedRecommender: segment {segment!r} model has a different item axis")
        self.global_model = global_model
        self.models = dict(models)
        self.item_ids = global_model.item_ids

    def groups(self, segments: Sequence[Hashable | None]) -> list[tuple[Hashable | None, list[int]]]:
        """The rows of each model, in order of first appearance: ``(segment, rows)`` with
        segment None for the global model (a row whose segment is None or has no kept model)."""
        by_model: dict[Hashable | None, list[int]] = {}
        for r, segment in enumerate(segments):
            by_model.setdefault(segment if segment is not None and segment in self.models else None, []).append(r)
        return list(by_model.items())

    def score(
        self, x: sp.csr_matrix, user_ids: Sequence | None = None, segments: Sequence[Hashable | None] | None = None
    ) -> np.ndarray:
        """users×items scores for history rows ``x``; row r uses the model of
        ``segments[r]`` (None or a segment without a kept model: the global model)."""
        x = sp.csr_matrix(x, dtype=np.float32)
        n = x.shape[0]
        if segments is None:
            return self.global_model.score(x, user_ids)
        if len(segments) != n:
            raise ValueError(f"SegmentedRecommender.score: {len(segments)} segments for {n} history rows")
        if user_ids is not None and len(user_ids) != n:
            raise ValueError(f"SegmentedRecommender.score: {len(user_ids)} user ids for {n} history rows")
        out = np.empty((n, len(self.item_ids)), dtype=np.float32)
        for segment, rows in self.groups(segments):
            model = self.global_model if segment is None else self.models[segment]
            ids = None if user_ids is None else [user_ids[r] for r in rows]
            out[rows] = model.score(x[rows], ids)
        return out

    def recommend(
        self,
        x: sp.csr_matrix,
        k: int,
        user_ids: Sequence | None = None,
        segments: Sequence[Hashable | None] | None = None,
    ) -> np.ndarray:
        """Top-``k`` item indices per history row, best first; seen items excluded."""
        return top_k(self.score(x, user_ids, segments), sp.csr_matrix(x), k)

    def save(self, directory: str | Path) -> Path:
        """``global/`` plus the segment models (:func:`save_segment_models`)."""
        directory = Path(directory)
        self.global_model.save(directory / "global")
        save_segment_models(self.models, directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SegmentedRecommender:
        directory = Path(directory)
        return cls(NeuralRecommender.load(directory / "global"), load_segment_models(directory))


def save_segment_models(models: Mapping[Hashable, NeuralRecommender], directory: str | Path) -> Path:
    """One ``segment-<n>/`` model directory per segment (in ``str`` order) and ``segments.json``
    naming each one's segment."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, (segment, model) in enumerate(sorted(models.items(), key=lambda kv: str(kv[0]))):
        model.save(directory / f"segment-{n}")
        entries.append({"segment": _plain(segment), "path": f"segment-{n}"})
    (directory / SEGMENTS_FILE).write_text(json.dumps({"segments": entries}))
    return directory


def load_segment_models(directory: str | Path) -> dict[Hashable, NeuralRecommender]:
    """The models written by :func:`save_segment_models`, by segment."""
    directory = Path(directory)
    if not (directory / SEGMENTS_FILE).exists():
        raise FileNotFoundError(f"load_segment_models: {directory / SEGMENTS_FILE} not found")
    entries = json.loads((directory / SEGMENTS_FILE).read_text())["segments"]
    return {e["segment"]: NeuralRecommender.load(directory / e["path"]) for e in entries}
