"""The training stages of ``recsys_training``: train, evaluate, register, promote.

Each takes the settings and the run context, reads its inputs from the run
directory and overwrites its own outputs, so a re-run is safe.
"""

from __future__ import annotations

import time

import pandas as pd

from hyperrec.run_context import RunContext
from hyperrec.settings import Settings
from training import registry
from training.bundle import load_bundle, write_bundle
from training.models import InteractionMatrix, fit_ease, fit_item_knn, fit_popularity, popularity
from pipelines.split import split_fingerprint
from training.evaluation import history_of, load_split, relevant_items, score_model

CANDIDATES = ("popularity", "item_knn", "ease")


def _catalogue(run: RunContext) -> pd.DataFrame:
    items = pd.read_parquet(run.clean_dir / "items", columns=["item_id", "title", "categories"])
    return items.sort_values("item_id").reset_index(drop=True)


def train(settings: Settings, run: RunContext) -> dict:
    """Fit every candidate on the train split; write one bundle per candidate."""
    cfg = settings.training
    train_df, _ = load_split(run.split_dir)
    items = _catalogue(run)
    matrix = InteractionMatrix.from_frame(train_df, item_ids=items["item_id"].to_numpy(dtype=object))
    fitters = {
        "popularity": lambda x: fit_popularity(x),
        "item_knn": lambda x: fit_item_knn(x, cfg.knn_neighbours),
        "ease": lambda x: fit_ease(x, cfg.ease_lambda),
    }
    summary = {}
    for name in CANDIDATES:
        start = time.perf_counter()
        model = fitters[name](matrix.matrix)
        seconds = time.perf_counter() - start
        write_bundle(
            run.models_dir / name,
            model=model,
            item_ids=matrix.item_ids,
            titles=items["title"].to_numpy(dtype=object),
            categories=[list(c) if c is not None else [] for c in items["categories"]],
            history=history_of(matrix),
            popularity=popularity(matrix.matrix),
            metadata={"version": run.run_id, "k": cfg.k, "metrics": {}, "model_name": name, "fit_seconds": seconds},
        )
        summary[name] = {"fit_seconds": round(seconds, 3)}
    summary["train_users"], summary["items"] = len(matrix.user_ids), len(matrix.item_ids)
    run.write_json("train.json", summary)
    return summary


def evaluate(settings: Settings, run: RunContext) -> dict:
    """Score every candidate on the held-out split; the best by NDCG@k wins."""
    k = settings.training.k
    train_df, test_df = load_split(run.split_dir)
    results = {}
    for name in CANDIDATES:
        bundle = load_bundle(run.models_dir / name)
        matrix = InteractionMatrix.from_frame(train_df, item_ids=bundle.item_ids)
        results[name] = score_model(bundle.model, matrix, relevant_items(matrix, test_df), k)
    best = max(results, key=lambda n: results[n][f"ndcg@{k}"])
    baseline = results["popularity"][f"ndcg@{k}"]
    evaluation = {
        "k": k, "best": best, "models": results, "split_fingerprint": split_fingerprint(test_df),
        "lift_over_popularity": {n: (r[f"ndcg@{k}"] / baseline - 1.0) if baseline else None for n, r in results.items()},
    }
    run.write_json("evaluation.json", evaluation)
    return evaluation


def register(settings: Settings, run: RunContext) -> dict:
    """Log the run to MLflow and register the best candidate (alias ``challenger``)."""
    evaluation = run.read_json("evaluation.json")
    best, k = evaluation["best"], evaluation["k"]
    metrics = {f"{name}.{metric}": value for name, res in evaluation["models"].items() for metric, value in res.items()}
    metrics.update({m: v for m, v in evaluation["models"][best].items()})
    segments = run.read_json("segments.json")
    params = {"best_model": best, "k": k, "ease_lambda": settings.training.ease_lambda,
              "knn_neighbours": settings.training.knn_neighbours, "split_fingerprint": evaluation["split_fingerprint"],
              "segmentation_method": segments["method"], "segmentation_k": segments["k"]}
    reg = registry.log_and_register(
        settings,
        run_name=run.run_id,
        params=params,
        metrics=metrics,
        bundle_dir=run.models_dir / best,
        artifact_dirs={"gx_data_docs": run.gx_dir, "reports": run.path("reports"), "segments": run.features_dir / "segments"},
        tags={"hyperrec.run_dir": str(run.root), "hyperrec.model": best},
    )
    result = {"run_id": reg.run_id, "version": reg.version, "model_uri": reg.model_uri, "model": best}
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
    )
    result = {"promoted": decision.promote, "reason": decision.reason, "version": decision.challenger_version,
              "champion": registry.champion_version(settings)}
    run.write_json("promotion.json", result)
    return result
