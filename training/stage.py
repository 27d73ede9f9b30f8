"""The training stages of ``recsys_training``: train, evaluate, register, promote.

Each takes the settings and the run context, reads its inputs from the run
directory and overwrites its own outputs, so a re-run is safe.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from core.files import write_text_atomic
from core.run_context import RunContext
from core.settings import Settings
from feature_store.stage import read_segment_labels
from pipelines.split import load_split, split_fingerprint
from training import registry, warm_start
from training.bundle import load_bundle, write_bundle
from training.candidates import (
    BASELINES,
    COMPONENTS,
    NeuralScorer,
    as_blend,
    available,
    category_multi_hot,
    component_fitters,
    fit_candidate,
    fit_once,
    item_side_features,
    tune_choice,
)
from training.evaluation import recommend_ids, relevant_items, score_model
from training.hybrid import FitContext, WeightedHybrid
from training.metrics import evaluate_by_segment
from training.models import InteractionMatrix, popularity
from training.pyfunc import RecommenderPyfunc

CANDIDATES = (*BASELINES, *COMPONENTS, "hybrid")
WEIGHT_COLUMN = registry.WEIGHT_COLUMN
LOSS_FILE = "loss.json"
SEARCH_TAGS = ("mode", "reason", "from_version", "searched_at", "segment_tuning")
"""Keys of the run's ``search.json`` that register tags as ``hyperrec.search.<key>``."""


def _catalogue(run: RunContext) -> pd.DataFrame:
    items = pd.read_parquet(run.clean_dir / "items", columns=["item_id", "title", "categories"])
    return items.sort_values("item_id").reset_index(drop=True)


def side_data(settings: Settings, run: RunContext, items: pd.DataFrame) -> dict:
    """Side data of the components (:mod:`training.candidates`) from this run: category
    multi-hot and content embeddings (the feature store's item snapshot), user demographics
    plus segment, and the Spark session."""
    from feature_store.items import read_item_snapshot
    from pipelines.spark import get_spark
    from training.content import item_embeddings_for

    item_ids = items["item_id"].to_numpy(dtype=object)
    side: dict = {"item_categories": category_multi_hot(list(items["categories"])), "spark": get_spark(settings)}
    try:
        features, embeddings = read_item_snapshot(run.features_dir / "items")
        side["item_embeddings"] = item_embeddings_for(item_ids, features, embeddings)
    except FileNotFoundError:
        pass
    users_path = run.clean_dir / "users"
    if users_path.exists():
        users = pd.read_parquet(users_path)
        keep = [c for c in ("user_id", "age", "gender", "occupation", "region") if c in users.columns]
        users = users[keep].copy()
        segments = read_segment_labels(run)
        if segments:
            users["segment"] = users["user_id"].astype(str).map(segments)
        side["user_features"] = users
    return side


def pipeline_params(run: RunContext) -> dict:
    """The run's ``params.json`` (empty when it has none)."""
    return run.read_json("params.json") if run.path("params.json").exists() else {}


def train(settings: Settings, run: RunContext) -> dict:
    """Fit every candidate on the train split and write one bundle per candidate.

    EASE λ, the temporal β, the input α and the hybrid's blend weights are chosen on a
    per-user k-fold of the train split (``model_selection.json``); the test split is not
    read. A warm run (:func:`training.warm_start.decide`) reuses the champion's choices and,
    when its segmentation is the champion's, its kept segment fine-tuning parameters
    instead; ``search.json`` and ``train.json`` → ``search`` record which happened and why.
    The hybrid reuses the components fitted as their own candidates (same data and
    settings), so its ``fit_seconds`` counts its anchor and this run's validation search.
    """
    cfg = settings.training
    train_df, _ = load_split(run.split_dir)
    items = _catalogue(run)
    item_ids = items["item_id"].to_numpy(dtype=object)
    matrix = InteractionMatrix.from_frame(train_df, item_ids=item_ids, weight_col=WEIGHT_COLUMN)
    side = side_data(settings, run, items)
    context = FitContext(train_df, matrix, item_ids, side)
    params, components = pipeline_params(run), available(side)
    segmentation = run.read_json("segments.json") if run.path("segments.json").exists() else {}
    champion = warm_start.champion_record(settings) if cfg.search == "warm" else None
    search = warm_start.decide(
        settings,
        params=params,
        champion=champion,
        components=components,
        segmentation=segmentation,
        now=datetime.now(UTC),
    )
    print(f"train: choices {search.mode}: {search.reason}; segment tuning: {search.segment_tuning}")
    if search.segments_warm:
        tuning = {**champion[1]["tuning"], "reused_from": search.from_version}
        run.write_json("segment_tuning.json", tuning)
    else:
        tuning = tune_neural_segments(settings, run, train_df, item_ids, side)
    choice = (
        warm_start.choice_of(champion[1]) if search.warm else tune_choice(context, settings, weight_col=WEIGHT_COLUMN)
    )
    run.write_json("model_selection.json", choice.to_dict())
    run.write_json(
        warm_start.RECORD_FILE,
        warm_start.record(
            search,
            settings,
            params=params,
            components=components,
            segmentation=segmentation,
            choice=choice.to_dict(),
            tuning=tuning,
        ),
    )
    history = {
        u: matrix.matrix.indices[matrix.matrix.indptr[r] : matrix.matrix.indptr[r + 1]]
        for u, r in matrix.user_index.items()
    }
    weights = {
        u: matrix.matrix.data[matrix.matrix.indptr[r] : matrix.matrix.indptr[r + 1]]
        for u, r in matrix.user_index.items()
    }
    summary: dict = {}
    fitters, segments, refitted = fit_once(component_fitters(settings)), read_segment_labels(run), {}
    for name in CANDIDATES:
        if name in COMPONENTS and name not in available(side):
            continue
        start = time.perf_counter()
        scorer, _ = fit_candidate(name, context, settings, choice=choice, weight_col=WEIGHT_COLUMN, fitters=fitters)
        model = as_blend(name, scorer, len(item_ids))
        served_segments = attach_segment_models(model, tuning, context, segments, settings, refitted)
        seconds = time.perf_counter() - start + (choice.seconds if name == "hybrid" else 0.0)
        write_bundle(
            run.models_dir / name,
            model=model,
            item_ids=item_ids,
            titles=items["title"].to_numpy(dtype=object),
            categories=[list(c) if c is not None else [] for c in items["categories"]],
            history=history,
            history_weights=weights,
            popularity=popularity(matrix.matrix),
            metadata={
                "version": run.run_id,
                "k": cfg.k,
                "metrics": {},
                "model_name": name,
                "fit_seconds": seconds,
                "validation": choice.to_dict() if name in ("ease", "hybrid") else {},
                "segment_models": served_segments,
            },
        )
        write_loss_history(model, run.models_dir / name, name)
        summary[name] = {"fit_seconds": round(seconds, 3), "segment_models": served_segments}
    summary["train_users"], summary["items"] = len(matrix.user_ids), len(matrix.item_ids)
    summary["validation"] = choice.to_dict()
    summary["search"] = search.to_dict()
    summary["segment_tuning"] = (
        {"kept": tuning.get("kept", []), "segments": len(tuning.get("results", []))} if "results" in tuning else tuning
    )
    run.write_json("train.json", summary)
    return summary


def write_loss_history(model: WeightedHybrid, out_dir: Path, name: str) -> Path | None:
    """``out_dir/loss.json``: the per-epoch (and per-step) training loss of ``model``'s
    neural component (:func:`training.neural.loss_curve`) and of its served segment models;
    removed when ``model`` has no neural component. The losses are the ones the fit
    recorded (in-process or DDP), so writing them changes no weight."""
    from training.neural import loss_curve

    path = Path(out_dir) / LOSS_FILE
    neural = [(c, s) for c, s in model.components.items() if isinstance(s, NeuralScorer)]
    if not neural:
        path.unlink(missing_ok=True)
        return None
    component, scorer = neural[0]
    cfg = scorer.model.cfg
    history = {
        "model": name,
        "component": component,
        "config": {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "embedding_dim")},
        **loss_curve(scorer.model),
        "segments": {str(seg): loss_curve(m) for seg, m in sorted(scorer.segment_models.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(history, indent=2))
    return path


def attach_segment_models(
    model: WeightedHybrid,
    tuning: dict,
    context: FitContext,
    segments: dict,
    settings: Settings,
    refitted: dict | None = None,
) -> dict:
    """Give every neural component of ``model`` the segment models validation kept
    (``tuning``, :func:`tune_neural_segments`), refitted from that component's own model on the
    whole train split (:func:`training.segment_tuning.refit_segment_models`), with the user →
    segment routing. ``refitted`` (id of a fitted scorer → its routed scorer) lets candidates
    sharing a component share its refit. Returns ``{"segments": [...], "users": n}`` (empty
    when none is kept)."""
    from training.segment_tuning import kept_params, refit_segment_models

    params = kept_params(tuning)
    neural = {name: s for name, s in model.components.items() if isinstance(s, NeuralScorer)}
    if not params or not neural:
        return {}
    refitted = {} if refitted is None else refitted
    for name, scorer in neural.items():
        if id(scorer) not in refitted:
            models = refit_segment_models(
                scorer.model,
                context.frame,
                context.item_ids,
                params,
                segments,
                settings,
                user_features=context.side.get("user_features"),
                item_features=item_side_features(dict(context.side)),
                weight_col=None,
            )
            refitted[id(scorer)] = NeuralScorer(scorer.model, models, segments)
        model.components[name] = refitted[id(scorer)]
    routed = next(iter(model.components[n] for n in neural))
    return {"segments": sorted(routed.segment_models), "users": len(routed.user_segments)}


def tune_neural_segments(
    settings: Settings, run: RunContext, train_df: pd.DataFrame, item_ids: np.ndarray, side: dict
) -> dict:
    """Per-segment Optuna search and fine-tuning of the neural model on a
    validation fold of the train split; every segment's gain, keep decision and chosen
    parameters go to ``segment_tuning.json`` (each study is an MLflow run) and are returned.
    The served segment models are refitted on the whole train split
    (:func:`attach_segment_models`)."""
    from training.segment_tuning import train_global_models, tune_segments, validation_split

    segments = read_segment_labels(run)
    if "neural" not in available(side) or len(set(segments.values())) < 2:
        result = {"skipped": "needs the neural component and at least two segments"}
        run.write_json("segment_tuning.json", result)
        return result
    fit_df, val_df = validation_split(train_df, settings)
    features = {"user_features": side.get("user_features"), "item_features": item_side_features(side)}
    dim = settings.neural.embedding_dim
    # Unweighted, as the neural component is trained and served (NeuralScorer scores binary
    # histories), so the keep decision judges the recipe that is served.
    global_rec = train_global_models(fit_df, item_ids, settings, [dim], weight_col=None, **features)[dim]
    tuning = tune_segments(
        global_rec, fit_df, val_df, segments, item_ids, settings, weight_col=None, progress=False, **features
    )
    result = tuning.to_dict()
    run.write_json("segment_tuning.json", result)
    return result


def evaluate(settings: Settings, run: RunContext) -> dict:
    """Score every candidate on the held-out split: accuracy and coverage for all known
    users, the same per segment with the best−worst gap, and cold-start users (test users
    absent from train, who get the popularity fallback) separately. The best by NDCG@k wins.
    For a candidate with served segment models, ``segment_models`` reports its NDCG@k without
    them as well (a report; nothing is chosen on it)."""
    k = settings.training.k
    train_df, test_df = load_split(run.split_dir)
    segments = read_segment_labels(run)
    results, by_segment, segment_models = {}, {}, {}
    trained = [name for name in CANDIDATES if (run.models_dir / name / "metadata.json").exists()]
    for name in trained:
        bundle = load_bundle(run.models_dir / name)
        matrix = InteractionMatrix.from_frame(train_df, item_ids=bundle.item_ids, weight_col=WEIGHT_COLUMN)
        relevant = relevant_items(matrix, test_df)
        recs = recommend_ids(bundle.model, matrix, list(relevant), k)
        results[name] = score_model(bundle.model, matrix, relevant, k)
        per = evaluate_by_segment(recs, relevant, segments, k, n_items=len(bundle.item_ids))
        by_segment[name] = per
        results[name]["segment_gap"] = per["gap"][f"ndcg@{k}"]
        plain = without_segment_models(bundle.model)
        if plain is not bundle.model:  # what the served segment models add, reported only
            without = score_model(plain, matrix, relevant, k)[f"ndcg@{k}"]
            segment_models[name] = {
                f"ndcg@{k}": results[name][f"ndcg@{k}"],
                f"ndcg@{k}_global_neural_only": without,
                "gain": results[name][f"ndcg@{k}"] - without,
                **bundle.metadata.get("segment_models", {}),
            }
    best = max(results, key=lambda n: results[n][f"ndcg@{k}"])
    baseline = results["popularity"][f"ndcg@{k}"]
    evaluation = {
        "k": k,
        "best": best,
        "models": results,
        "split_fingerprint": split_fingerprint(test_df),
        "lift_over_popularity": {
            n: (r[f"ndcg@{k}"] / baseline - 1.0) if baseline else None for n, r in results.items()
        },
        "segments": by_segment,
        "cold_start": cold_start_metrics(run, train_df, test_df, k),
        "segment_models": segment_models,
    }
    run.write_json("evaluation.json", evaluation)
    return evaluation


def without_segment_models(model):
    """``model`` with its neural components' segment models removed (``model`` itself when it has none)."""
    if not isinstance(model, WeightedHybrid) or not any(
        isinstance(c, NeuralScorer) and c.user_segments for c in model.components.values()
    ):
        return model
    return dataclasses.replace(
        model,
        components={n: c.without_segments() if isinstance(c, NeuralScorer) else c for n, c in model.components.items()},
    )


def cold_start_metrics(run: RunContext, train_df: pd.DataFrame, test_df: pd.DataFrame, k: int) -> dict:
    """Test users with no train history, served the popularity fallback of the popularity bundle."""
    known = set(train_df["user_id"])
    cold = test_df[~test_df["user_id"].isin(known)]
    if cold.empty:
        return {"users": 0}
    bundle = load_bundle(run.models_dir / "popularity")
    relevant = cold.groupby("user_id")["item_id"].apply(set).to_dict()
    top = [str(bundle.item_ids[i]) for i in np.lexsort((np.arange(bundle.n_items), -bundle.popularity))[:k]]
    return evaluate({u: top for u in relevant}, relevant, k)


def _metric_columns(metrics: dict, k: int) -> list[str]:
    order = [
        f"ndcg@{k}",
        f"precision@{k}",
        f"recall@{k}",
        f"map@{k}",
        f"hit@{k}",
        f"coverage@{k}",
        "segment_gap",
        "users",
    ]
    return [c for c in order if c in metrics] + sorted(c for c in metrics if c not in order)


def metrics_markdown(evaluation: dict) -> str:
    """``metrics.md``: every candidate's held-out metrics (the registered one first and in
    bold) with its lift over popularity, the registered model per segment, and cold start."""
    k, best = evaluation["k"], evaluation["best"]
    models = evaluation["models"]
    columns = _metric_columns(models[best], k)
    names = [best, *sorted((n for n in models if n != best), key=lambda n: -models[n][f"ndcg@{k}"])]
    lift = evaluation.get("lift_over_popularity", {})
    rows = [
        [
            f"**{n}**" if n == best else n,
            *[models[n].get(c) for c in columns],
            None if lift.get(n) is None else f"{100 * lift[n]:+.1f}%",
        ]
        for n in names
    ]
    parts = [
        f"# Held-out evaluation (k={k})",
        "",
        f"Registered: **{best}**, the best NDCG@{k} of {len(models)} candidates on the test split "
        f"(split fingerprint `{evaluation.get('split_fingerprint')}`).",
        "",
        registry.markdown_table(["model", *columns, "lift vs popularity"], rows),
    ]
    per = evaluation.get("segments", {}).get(best, {}).get("segments", {})
    if per:
        seg_columns = _metric_columns(next(iter(per.values())), k)
        parts += [
            "",
            f"## {best} per user segment",
            "",
            registry.markdown_table(
                ["segment", *seg_columns], [[seg, *[m.get(c) for c in seg_columns]] for seg, m in sorted(per.items())]
            ),
        ]
        gap = evaluation["segments"][best].get("gap", {}).get(f"ndcg@{k}")
        if gap is not None:
            parts += ["", f"Fairness gap (best − worst segment NDCG@{k}): {gap:.4f}"]
    cold = evaluation.get("cold_start") or {}
    if cold.get("users"):
        cold_columns = _metric_columns(cold, k)
        parts += [
            "",
            "## Cold-start users (popularity fallback)",
            "",
            registry.markdown_table(cold_columns, [[cold.get(c) for c in cold_columns]], "r" * len(cold_columns)),
        ]
    return "\n".join(parts) + "\n"


def write_evaluation_tables(evaluation: dict, out: Path) -> Path:
    """``models.csv`` (one row per candidate), ``segments.csv`` (candidate × segment) and
    ``metrics.md`` (:func:`metrics_markdown`, readable in the MLflow artifact view) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame.from_dict(evaluation["models"], orient="index").rename_axis("model").to_csv(out / "models.csv")
    rows = [
        {"model": name, "segment": seg, **m}
        for name, per in evaluation["segments"].items()
        for seg, m in per["segments"].items()
    ]
    pd.DataFrame(rows).to_csv(out / "segments.csv", index=False)
    (out / "metrics.md").write_text(metrics_markdown(evaluation))
    return out


def plot_loss(history: dict, path: Path) -> Path:
    """A PNG line plot of a ``loss.json`` (:func:`write_loss_history`): the loss of every
    step (faint), its per-epoch mean and each served segment model's per-epoch loss."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.subplots()
    n = history.get("steps_per_epoch") or 0
    if history.get("step_loss") and n:
        steps = np.arange(1, len(history["step_loss"]) + 1) / n
        ax.plot(steps, history["step_loss"], color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    if history.get("loss"):
        ax.plot(
            np.arange(1, len(history["loss"]) + 1),
            history["loss"],
            color="tab:blue",
            marker="o",
            markersize=3,
            linewidth=2,
            label="loss per epoch (global model)",
        )
    for seg, curve in history.get("segments", {}).items():
        if curve.get("loss"):
            ax.plot(
                np.arange(1, len(curve["loss"]) + 1),
                curve["loss"],
                linestyle="--",
                marker=".",
                label=f"segment {seg} fine-tuning",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (multinomial NLL per user)")
    ax.set_title(f"Training loss: {history.get('component', 'neural')} component of {history.get('model', '?')}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def _metric_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\- /]", "_", str(text))


def training_curves(run: RunContext, best: str, out: Path) -> tuple[dict | None, dict[str, list[float]]]:
    """Copy the registered model's ``loss.json`` (else the ``neural`` candidate's, the
    standalone fit the hybrid shares) to ``out`` with its ``loss.png``; returns the history
    (None without one) and its MLflow step metrics (loss per epoch, per step)."""
    if out.exists():
        shutil.rmtree(out)
    source = next(
        (run.models_dir / n / LOSS_FILE for n in (best, "neural") if (run.models_dir / n / LOSS_FILE).exists()), None
    )
    if source is None:
        return None, {}
    history = json.loads(source.read_text())
    history["registered"] = history.get("model") == best
    out.mkdir(parents=True)
    write_text_atomic(out / LOSS_FILE, json.dumps(history, indent=2))
    plot_loss(history, out / "loss.png")
    prefix = _metric_key(history.get("component", "neural"))
    steps = {f"{prefix}.train_loss": history.get("loss", []), f"{prefix}.step_loss": history.get("step_loss", [])}
    for seg, curve in history.get("segments", {}).items():
        steps[f"{prefix}.segment_{_metric_key(seg)}.train_loss"] = curve.get("loss", [])
    return history, {key: values for key, values in steps.items() if values}


def drift_files(report: str) -> list[Path]:
    """The drift report behind a drift-triggered run (``params.json`` → ``drift_report``,
    the JSON the monitor wrote), the HTML reports beside it and the monitor run's
    ``drift.json`` summary, those that exist."""
    if not report:
        return []
    path = Path(report)
    candidates = [path, *sorted(path.parent.glob("*.html")), path.parent.parent / "drift.json"]
    found: list[Path] = []
    for p in candidates:
        if p.is_file() and p not in found:
            found.append(p)
    return found


def airflow_run_id(run: RunContext) -> str:
    """The Airflow run id ``airflow_run.json`` records for ``run``, else the run directory's name."""
    recorded = run.path("airflow_run.json")
    return run.read_json("airflow_run.json")["run_id"] if recorded.exists() else run.run_id


def review_markdown(
    evaluation: dict,
    *,
    run: RunContext,
    airflow_id: str,
    reason: str,
    drift_report: str,
    drift_found: bool,
    loss: dict | None,
    search: dict | None = None,
) -> str:
    """The ``## Training run`` section of the version description: what was registered and
    how it scored, why the run started, how its choices were made (``search``, the run's
    ``search.json``), where it lives, and which artifacts to open."""
    k, best = evaluation["k"], evaluation["best"]
    models, m = evaluation["models"], evaluation["models"][best]
    popularity = models.get("popularity", {}).get(f"ndcg@{k}")
    lift = evaluation.get("lift_over_popularity", {}).get(best)
    ndcg = f"{m[f'ndcg@{k}']:.4f}" + (f" (popularity {popularity:.4f}, {100 * lift:+.1f}%)" if lift is not None else "")
    started = reason + (
        f" (report `{drift_report}`{'' if drift_found else ', not found on this machine'})" if drift_report else ""
    )
    facts = [["model", f"`{best}` (best NDCG@{k} of {len(models)} candidates)"], [f"NDCG@{k}", ndcg]]
    facts += [[c, f"{m[c]:.4f}"] for c in (f"precision@{k}", f"recall@{k}", f"coverage@{k}") if c in m]
    if "segment_gap" in m:
        facts.append([f"segment gap (best − worst NDCG@{k})", f"{m['segment_gap']:.4f}"])
    cold = evaluation.get("cold_start") or {}
    if cold.get("users"):
        facts.append(
            ["cold-start users", f"{cold['users']} (NDCG@{k} {cold.get(f'ndcg@{k}', 0.0):.4f}, popularity fallback)"]
        )
    if loss and loss.get("loss"):
        facts.append(
            [
                "neural training loss",
                f"{loss['loss'][0]:.4f} → {loss['loss'][-1]:.4f} over {len(loss['loss'])} epochs ({loss.get('model')})",
            ]
        )
    if search:
        facts.append(["choices", f"{search['mode']}: {search['reason']}; searched at {search['searched_at']}"])
    facts += [
        ["started because", started],
        ["Airflow run", f"`{airflow_id}`"],
        ["run directory", f"`{run.root}`"],
        ["split fingerprint", f"`{evaluation.get('split_fingerprint')}`"],
    ]
    columns = [c for c in (f"ndcg@{k}", f"recall@{k}", f"coverage@{k}", "segment_gap") if c in m]
    names = [best, *sorted((n for n in models if n != best), key=lambda n: -models[n][f"ndcg@{k}"])]
    parts = [
        registry.TRAINING_HEADING,
        "",
        registry.markdown_table(["", ""], facts, "ll"),
        "",
        f"### Candidates (held-out split, k={k})",
        "",
        registry.markdown_table(
            ["model", *columns], [[f"**{n}**" if n == best else n, *[models[n].get(c) for c in columns]] for n in names]
        ),
    ]
    per = evaluation.get("segments", {}).get(best, {}).get("segments", {})
    if per:
        parts += [
            "",
            f"### {best} per user segment",
            "",
            registry.markdown_table(
                ["segment", "users", f"ndcg@{k}"],
                [[seg, v.get("users"), v.get(f"ndcg@{k}")] for seg, v in sorted(per.items())],
            ),
        ]
    artifacts = [
        "`evaluation/metrics.md` (tables; CSV beside it)",
        "`segments/` (segment pictures)",
        "`gx_data_docs/index.html` (data quality)",
    ]
    if loss:
        artifacts.append("`training/loss.png` (training loss curves; also the run's `neural.train_loss` chart)")
    if drift_report:
        artifacts.append("`drift/` (the drift report that triggered this run)")
    parts += ["", "Run artifacts: " + ", ".join(artifacts) + "."]
    return "\n".join(parts)


def register(settings: Settings, run: RunContext, python_model: RecommenderPyfunc | None = None) -> dict:
    """Log the run to MLflow and register the best candidate (alias ``challenger``) as
    ``python_model``, the serving tier's pyfunc: the ``register`` task runs
    :func:`serving.publish.register`, which passes it (training cannot import serving).

    The run carries the metrics, parameters and, for review in the MLflow UI, artifacts:
    ``evaluation/`` (metrics.md, models.csv, segments.csv), ``segments/`` (pictures),
    ``gx_data_docs/``, ``training/`` (loss.json, loss.png), ``drift/`` (when a drift
    report started the run), ``warm_start/search.json`` (the run's choices, which a later
    warm run reads from the champion: :mod:`training.warm_start`) and ``pipeline/`` (params,
    ingest, evaluation, train, timings JSON). The version gets a markdown description
    (:func:`review_markdown`) and the tags model, run directory, Airflow run id, reason,
    drift report and ``hyperrec.search.*`` (:data:`SEARCH_TAGS`). A retry of this task returns
    the version its earlier attempt registered (:func:`training.registry.log_and_register`).
    """
    if python_model is None:
        raise ValueError("register: no pyfunc model given; the register task runs serving.publish.register")
    evaluation = run.read_json("evaluation.json")
    best, k = evaluation["best"], evaluation["k"]
    metrics = {f"{name}.{metric}": value for name, res in evaluation["models"].items() for metric, value in res.items()}
    metrics.update({m: v for m, v in evaluation["models"][best].items()})
    for segment, seg_metrics in evaluation["segments"][best]["segments"].items():
        metrics.update({f"segment.{segment}.{m}": v for m, v in seg_metrics.items()})
    metrics.update({f"cold_start.{m}": v for m, v in evaluation["cold_start"].items()})
    served = evaluation.get("segment_models", {}).get(best)
    if served:
        metrics[f"segment_models.ndcg@{k}_global_neural_only"] = served[f"ndcg@{k}_global_neural_only"]
        metrics["segment_models.gain"] = served["gain"]
    segments = run.read_json("segments.json")
    validation = run.read_json("model_selection.json")
    params = {
        "best_model": best,
        "k": k,
        "ease_lambda": validation["ease_lambda"],
        "plain_ease_lambda": validation["plain_ease_lambda"],
        "temporal_beta": validation["temporal_beta"],
        "input_alpha": validation["input_alpha"],
        **{f"blend_weight.{n}": w for n, w in validation["weights"].items()},
        "validation_folds": validation["folds"],
        "knn_neighbours": settings.training.knn_neighbours,
        "split_fingerprint": evaluation["split_fingerprint"],
        "segmentation_method": segments["method"],
        "segmentation_k": segments["k"],
    }
    metrics.update({f"validation.{n}": v for n, v in validation["validation"].items()})
    tuning = run.read_json("segment_tuning.json")
    for row in tuning.get("results", []):
        if row.get("gain") is not None:
            metrics[f"segment_tuning.{row['segment']}.gain"] = row["gain"]
            metrics[f"segment_tuning.{row['segment']}.kept"] = float(row["kept"])
    tables = write_evaluation_tables(evaluation, run.path("evaluation"))
    write_text_atomic(tables / "segment_tuning.json", json.dumps(tuning, indent=2, default=str))

    run_params = pipeline_params(run)
    reason = str(run_params.get("reason") or "unknown")
    drift_report = str(run_params.get("drift_report") or "")
    drift = drift_files(drift_report)
    loss, step_metrics = training_curves(run, best, run.path("training"))
    airflow_id = airflow_run_id(run)
    tags = {
        registry.RUN_DIR_TAG: str(run.root),
        "hyperrec.model": best,
        "hyperrec.airflow_run_id": airflow_id,
        "hyperrec.reason": reason,
        f"eval.ndcg_at_{k}": f"{evaluation['models'][best][f'ndcg@{k}']:.4f}",
    }
    if drift_report:
        tags["hyperrec.drift_report"] = drift_report
    if run.path("ingest.json").exists():
        tags["hyperrec.landed_batches"] = str(len(run.read_json("ingest.json")["landed_batches"]))
    search = run.read_json(warm_start.RECORD_FILE) if run.path(warm_start.RECORD_FILE).exists() else {}
    if search:
        params["search_mode"] = search["mode"]
        tags.update(
            {f"hyperrec.search.{key}": "none" if search[key] is None else str(search[key]) for key in SEARCH_TAGS}
        )
    description = review_markdown(
        evaluation,
        run=run,
        airflow_id=airflow_id,
        reason=reason,
        drift_report=drift_report,
        drift_found=bool(drift),
        loss=loss,
        search=search,
    )
    reg = registry.log_and_register(
        settings,
        run_name=run.run_id,
        params=params,
        metrics=metrics,
        bundle_dir=run.models_dir / best,
        python_model=python_model,
        artifact_dirs={
            "gx_data_docs": run.gx_dir,
            "reports": run.path("reports"),
            "segments": run.features_dir / "segments",
            "evaluation": tables,
            "training": run.path("training"),
            "drift": drift,
            warm_start.ARTIFACT_DIR: run.path(warm_start.RECORD_FILE),
            "pipeline": [
                run.path(n)
                for n in ("params.json", "ingest.json", "evaluation.json", "train.json", "timings.json")
                if run.path(n).exists()
            ],
        },
        tags=tags,
        description=description,
        step_metrics=step_metrics,
    )
    result = {
        "run_id": reg.run_id,
        "version": reg.version,
        "model_uri": reg.model_uri,
        "model": best,
        "reused": reg.reused,
    }
    run.write_json("registration.json", result)
    return result


def promote(settings: Settings, run: RunContext) -> dict:
    """Apply the promotion gate to this run's challenger."""
    registration, evaluation = run.read_json("registration.json"), run.read_json("evaluation.json")
    train_df, test_df = load_split(run.split_dir)
    k = evaluation["k"]
    decision = registry.promotion_gate(
        settings,
        challenger_version=registration["version"],
        challenger_ndcg=evaluation["models"][evaluation["best"]][f"ndcg@{k}"],
        train_df=train_df,
        test_df=test_df,
        workdir=run.path("gate"),
        challenger_metrics=evaluation["models"][evaluation["best"]],
        segments=read_segment_labels(run) or None,
    )
    result = {
        "promoted": decision.promote,
        "reason": decision.reason,
        "version": decision.challenger_version,
        "champion": registry.champion_version(settings),
    }
    run.write_json("promotion.json", result)
    return result
