"""The `hyperrec benchmark` contract: files, fingerprint, metrics that match the files."""

import json
import math

import pandas as pd
import pytest

from training.benchmark import MODELS, export_raw_dataset, run_benchmark


@pytest.fixture(scope="module")
def ml100k(full_settings, tmp_path_factory):
    """Every model, the hybrid included (minutes: the validation search fits the neural
    model and ALS once per fold)."""
    out = tmp_path_factory.mktemp("bench")
    return run_benchmark(full_settings, dataset="ml-100k", protocol="u75", k=10, out=out), out


pytestmark = pytest.mark.slow


def test_u75_files_and_fingerprint(ml100k):
    metrics, out = ml100k
    assert metrics["protocol"] == "u75" and metrics["split_fingerprint"] == "a29e96aa82063170"
    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    assert list(train.columns) == ["user_id", "item_id", "rating", "timestamp"] and len(train) + len(test) == 100_000
    assert set(metrics["models"]) == set(MODELS)
    for name in MODELS:
        recs = pd.read_csv(out / f"recommendations-{name}.csv")
        assert list(recs.columns) == ["user_id", "item_id", "rank"]
        assert (recs.groupby("user_id").size() == 10).all() and recs["user_id"].nunique() == test["user_id"].nunique()
        seen = set(zip(train["user_id"], train["item_id"]))
        assert not any(pair in seen for pair in zip(recs["user_id"], recs["item_id"])), name


def test_metrics_json_matches_the_recommendation_files(ml100k):
    metrics, out = ml100k
    assert json.loads((out / "metrics.json").read_text()) == metrics
    test = pd.read_csv(out / "test.csv")
    relevant = test.groupby("user_id")["item_id"].apply(set)
    for name, reported in metrics["models"].items():
        recs = pd.read_csv(out / f"recommendations-{name}.csv").sort_values(["user_id", "rank"])
        ndcgs, precisions = [], []
        for user, items in recs.groupby("user_id")["item_id"]:
            rel, items = relevant[user], list(items)
            dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(items) if i in rel)
            ideal = sum(1 / math.log2(r + 2) for r in range(min(10, len(rel))))
            ndcgs.append(dcg / ideal)
            precisions.append(sum(i in rel for i in items) / 10)
        assert reported["ndcg"] == pytest.approx(sum(ndcgs) / len(ndcgs), abs=1e-12), name
        assert reported["precision"] == pytest.approx(sum(precisions) / len(precisions), abs=1e-12), name


def test_hybrid_beats_tuned_ease_on_u75(ml100k):
    metrics, _ = ml100k
    models, validation = metrics["models"], metrics["validation"]
    assert 0.47 <= models["ease"]["ndcg"] <= 0.49  # EASE alone on u75 is about 0.480
    assert metrics["best"] == "hybrid"
    assert models["hybrid"]["ndcg"] >= 0.485 and models["hybrid"]["ndcg"] > models["ease"]["ndcg"]
    assert models["ease"]["ndcg"] > models["item_knn"]["ndcg"] > models["popularity"]["ndcg"]
    # Every choice was made on the per-user folds of train, recorded with its validation score.
    assert validation["folds"] >= 2 and validation["validation"]["hybrid"] >= validation["validation"]["plain_ease"]
    assert validation["weights"]["ease"] == 1.0 and any(w > 0 for n, w in validation["weights"].items() if n != "ease")


def test_generic_dataset_directory(settings, tmp_path):
    from core.datasets.synthetic import generate

    raw = generate(tmp_path / "raw", events=6000, seed=9, progress=False)
    export_raw_dataset(raw, tmp_path / "ds")
    exported = pd.read_csv(tmp_path / "ds" / "interactions.csv")
    events = pd.read_parquet(raw.interactions)
    assert not exported.duplicated(["user_id", "item_id"]).any()
    assert len(exported) == len(events.drop_duplicates(["user_id", "item_id"]))
    assert exported["rating"].between(0.5, 5).all() and exported["timestamp"].between(1.5e9, 2.1e9).all()
    assert {"items.csv", "users.csv"} <= {p.name for p in (tmp_path / "ds").iterdir()}
    metrics = run_benchmark(
        settings, dataset=str(tmp_path / "ds"), protocol="u75", k=5, out=tmp_path / "out", models=("popularity", "ease")
    )
    assert set(metrics["models"]) == {"popularity", "ease"}
    assert metrics["models"]["ease"]["ndcg"] > metrics["models"]["popularity"]["ndcg"]
    with pytest.raises(ValueError, match="unknown model"):
        run_benchmark(settings, dataset="ml-100k", protocol="u75", k=5, out=tmp_path / "z", models=("ease", "magic"))
    with pytest.raises(ValueError, match="unknown protocol"):
        run_benchmark(settings, dataset="ml-100k", protocol="u80", k=5, out=tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="interactions.csv"):
        run_benchmark(settings, dataset=str(tmp_path / "nope"), protocol="u75", k=5, out=tmp_path / "y")


def test_beyond_accuracy_shows_popularity_bias(ml100k):
    metrics, _ = ml100k
    models = metrics["models"]
    for name, res in models.items():
        for key in ("coverage", "diversity", "novelty", "entropy", "popularity_percentile", "gini", "train_seconds"):
            assert key in res, (name, key)
        assert 0 <= res["coverage"] <= 1 and 0 <= res["gini"] <= 1 and 0 <= res["entropy"] <= 1
    pop, ease = models["popularity"], models["ease"]
    assert pop["coverage"] < ease["coverage"] and pop["novelty"] < ease["novelty"]
    assert pop["popularity_percentile"] > ease["popularity_percentile"] and pop["gini"] > ease["gini"]
