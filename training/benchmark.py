"""``hyperrec benchmark``: offline evaluation on a fixed protocol (DESIGN.md contract).

Writes ``train.csv`` and ``test.csv`` (user_id,item_id,rating,timestamp), one
``recommendations-<model>.csv`` (user_id,item_id,rank; k rows per test user) per model,
and ``metrics.json`` with ``protocol``, ``split_fingerprint``, per-model
precision/recall/ndcg/map/hit at k plus the beyond-accuracy metrics of
:func:`training.metrics.beyond_accuracy` and the training time, and ``best``. The metrics are computed from the
recommendation files as written, so the two always agree. Every held-out rating is
relevant and items seen in train are never recommended.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hyperrec.datasets.movielens import ML100K_NAME, read_items, read_ratings, verify
from hyperrec.settings import Settings
from pipelines.split import split_fingerprint, u75_split
from training.metrics import METRICS, beyond_accuracy, evaluate
from training.models import InteractionMatrix, fit_ease, fit_item_knn, fit_popularity

PROTOCOLS = ("u75",)
COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


def load_ratings(dataset: str, settings: Settings) -> pd.DataFrame:
    """Ratings in file order: ``ml-100k`` (bundled, md5-checked) or a directory holding
    ``interactions.csv`` with columns user_id,item_id,rating,timestamp."""
    if dataset == ML100K_NAME:
        source = settings.data_dir / ML100K_NAME
        verify(source)
        return read_ratings(source)
    path = Path(dataset) / "interactions.csv"
    if not path.exists():
        raise FileNotFoundError(f"--dataset must be 'ml-100k' or a directory with interactions.csv; {path} not found")
    frame = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    return frame[COLUMNS]


def item_vectors(dataset: str, settings: Settings, item_dtype) -> dict | None:
    """Category one-hot vectors per item (for intra-list diversity): ml-100k genres, or
    ``items.csv`` (item_id,title,genres with ``|``-separated genres) when the directory has one."""
    if dataset == ML100K_NAME:
        items = read_items(settings.data_dir / ML100K_NAME)[["item_id", "categories"]]
    else:
        path = Path(dataset) / "items.csv"
        if not path.exists():
            return None
        raw = pd.read_csv(path)
        items = pd.DataFrame({"item_id": raw["item_id"], "categories": raw["genres"].fillna("").str.split("|")})
    labels = sorted({c for cats in items["categories"] for c in cats if c})
    index = {c: j for j, c in enumerate(labels)}
    vectors = {}
    for item, cats in zip(items["item_id"].astype(item_dtype), items["categories"]):
        v = np.zeros(len(labels))
        v[[index[c] for c in cats if c]] = 1.0
        vectors[item] = v
    return vectors


def recommend_for_test_users(name: str, train: pd.DataFrame, test_users: list, k: int, settings: Settings) -> pd.DataFrame:
    """Fit ``name`` on ``train`` and return k (user_id, item_id, rank) rows per test user."""
    matrix = InteractionMatrix.from_frame(train)
    fitters = {
        "popularity": lambda x: fit_popularity(x),
        "item_knn": lambda x: fit_item_knn(x, settings.training.knn_neighbours),
        "ease": lambda x: fit_ease(x, settings.training.ease_lambda),
    }
    model = fitters[name](matrix.matrix)
    users = [u for u in test_users if u in matrix.user_index]
    rows = np.array([matrix.user_index[u] for u in users], dtype=np.int64)
    top = model.recommend(matrix.matrix[rows], k) if len(rows) else np.empty((0, k), dtype=np.int64)
    return pd.DataFrame({
        "user_id": np.repeat(np.array(users, dtype=object), top.shape[1]),
        "item_id": matrix.item_ids[top.ravel()],
        "rank": np.tile(np.arange(1, top.shape[1] + 1), len(users)),
    })


def run_benchmark(settings: Settings, *, dataset: str, protocol: str, k: int, out: Path,
                  models: tuple[str, ...] = ("popularity", "item_knn", "ease")) -> dict:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    out.mkdir(parents=True, exist_ok=True)
    ratings = load_ratings(dataset, settings)
    train, test = u75_split(ratings)
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    relevant = test.groupby("user_id")["item_id"].apply(set).to_dict()
    n_items = ratings["item_id"].nunique()
    popularity = (train.groupby("item_id")["user_id"].nunique() / train["user_id"].nunique()).to_dict()
    vectors = item_vectors(dataset, settings, ratings["item_id"].dtype)
    results: dict[str, dict] = {}
    for name in models:
        start = time.perf_counter()
        recs = recommend_for_test_users(name, train, list(relevant), k, settings)
        seconds = time.perf_counter() - start
        path = out / f"recommendations-{name}.csv"
        recs.to_csv(path, index=False)
        written = pd.read_csv(path, dtype={"user_id": ratings["user_id"].dtype, "item_id": ratings["item_id"].dtype})
        lists = written.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
        scores = evaluate(lists, relevant, k)
        extra = beyond_accuracy(lists, n_items=n_items, popularity=popularity, item_vectors=vectors, k=k)
        results[name] = ({m: scores[f"{m}@{k}"] for m in METRICS} | {m.split("@")[0]: v for m, v in extra.items()}
                         | {"users": scores["users"], "train_seconds": round(seconds, 3)})
    best = max(results, key=lambda n: results[n]["ndcg"])
    metrics = {"protocol": protocol, "dataset": dataset, "k": k, "split_fingerprint": split_fingerprint(test),
               "models": results, "best": best}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics
