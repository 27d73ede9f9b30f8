"""``hyperrec benchmark``: offline evaluation of the candidates on a fixed protocol (e.g.
ml-100k u75). Writes ``train.csv``, ``test.csv``, one ``recommendations-<model>.csv`` per
model and ``metrics.json`` (computed from the recommendation files as written, so the two
always agree); every held-out rating is relevant and items seen in train are never
recommended.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.datasets import RawDataset
from core.datasets.movielens import ML100K_NAME, read_items, read_ratings, read_users, verify
from core.files import write_text_atomic
from core.settings import Settings
from pipelines.split import split_fingerprint, u75_split
from training.candidates import (
    BASELINES,
    COMPONENTS,
    NEEDS,
    available,
    category_multi_hot,
    component_fitters,
    fit_candidate,
    fit_once,
    tune_choice,
)
from training.hybrid import FitContext
from training.metrics import METRICS, beyond_accuracy, evaluate, long_tail_mask
from training.models import InteractionMatrix, top_k
from training.models import popularity as item_popularity
from training.rerank import item_genre_matrix, rerank_rows

PROTOCOLS = ("u75",)
COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
MODELS = (*BASELINES, *COMPONENTS, "hybrid")


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


def export_raw_dataset(raw: RawDataset, out: Path) -> Path:
    """Write a raw dataset (``hyperrec generate`` layout) in the generic benchmark format.

    ``interactions.csv``: one row per (user, item), in first-event order, with ``rating`` the
    explicit rating when one was given, else 5 × the event type's base confidence
    (:data:`pipelines.preprocess.EVENT_CONFIDENCE`, the strongest event counts), and
    ``timestamp`` the first event's Unix seconds. Also ``items.csv`` (item_id,title,genres)
    and ``users.csv`` (user_id and the demographic columns).
    """
    from pipelines.preprocess import EVENT_CONFIDENCE

    events = pd.read_parquet(raw.interactions, columns=["user_id", "item_id", "event_type", "rating", "timestamp"])
    events = events.dropna(subset=["user_id", "item_id", "timestamp"])
    implicit = events["event_type"].map(EVENT_CONFIDENCE).astype(float) * 5.0
    events = events.assign(
        rating=events["rating"].where(events["event_type"] == "rate", implicit).fillna(1.0),
        timestamp=(pd.to_datetime(events["timestamp"], utc=True) - pd.Timestamp(0, tz="UTC"))
        // pd.Timedelta(seconds=1),
    )
    events = events.sort_values("timestamp", kind="stable")
    pairs = (
        events.groupby(["user_id", "item_id"], sort=False)
        .agg(rating=("rating", "max"), timestamp=("timestamp", "min"))
        .reset_index()
    )
    out.mkdir(parents=True, exist_ok=True)
    pairs.sort_values(["timestamp", "user_id", "item_id"], kind="stable")[COLUMNS].to_csv(
        out / "interactions.csv", index=False
    )
    items = pd.read_parquet(raw.items)
    pd.DataFrame(
        {
            "item_id": items["item_id"],
            "title": items["title"],
            "genres": ["|".join(c) if c is not None else "" for c in items["categories"]],
        }
    ).to_csv(out / "items.csv", index=False)
    pd.read_parquet(raw.users).to_csv(out / "users.csv", index=False)
    return out


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
    matrix = category_multi_hot(list(items["categories"])).astype(np.float64)
    return dict(zip(items["item_id"].astype(item_dtype), matrix))


def side_data(
    dataset: str,
    settings: Settings,
    item_ids: np.ndarray,
    ratings: pd.DataFrame,
    vectors: dict | None,
    *,
    spark: bool = True,
) -> dict:
    """Side data for the content, neural and ALS components (see :mod:`training.candidates`):
    item category multi-hot and content embeddings aligned with ``item_ids``, user features
    (ml-100k ``u.user`` or ``users.csv``) and the Spark session. Missing files leave keys out."""
    from feature_store.items import content_embeddings
    from training.content import item_embeddings_for

    side: dict = {}
    user_dtype = ratings["user_id"].dtype
    if vectors:
        width = len(next(iter(vectors.values())))
        side["item_categories"] = np.array([vectors.get(i, np.zeros(width)) for i in item_ids], dtype=np.float32)
    if dataset == ML100K_NAME:
        items = read_items(settings.data_dir / ML100K_NAME)
        users = read_users(settings.data_dir / ML100K_NAME)
    else:
        items_path, users_path = Path(dataset) / "items.csv", Path(dataset) / "users.csv"
        items = pd.read_csv(items_path) if items_path.exists() else None
        if items is not None and "genres" in items.columns:
            items["text"] = (
                items["title"].fillna("").astype(str) + ". " + items["genres"].fillna("").str.replace("|", ", ")
            )
        users = pd.read_csv(users_path) if users_path.exists() else None
    if items is not None:
        embeddings, _ = content_embeddings(items)
        side["item_embeddings"] = item_embeddings_for(item_ids, items, embeddings)
    if users is not None:
        users = users.copy()
        users["user_id"] = users["user_id"].astype(user_dtype)
        side["user_features"] = users.drop(columns=[c for c in ("zip",) if c in users.columns])
    if spark:
        from pipelines.spark import get_spark

        side["spark"] = get_spark(settings)
    return side


def run_benchmark(
    settings: Settings, *, dataset: str, protocol: str, k: int, out: Path, models: tuple[str, ...] = MODELS, log=print
) -> dict:
    """Fit and score ``models`` on ``protocol``'s split of ``dataset``; write to ``out``
    ``train.csv`` and ``test.csv`` (user_id,item_id,rating,timestamp), one
    ``recommendations-<model>.csv`` (user_id,item_id,rank; ``k`` rows per test user) per model
    and ``metrics.json`` (``protocol``, ``split_fingerprint``, per model precision/recall/ndcg/
    map/hit at ``k``, the beyond-accuracy metrics of :func:`training.metrics.beyond_accuracy`
    and the training time, and ``best``), which is returned. With ``serving.exposure_strength
    > 0`` it also holds ``exposure_rerank``: the best model's metrics after the exposure-aware
    re-ranker, as serving applies it (the recommendation files stay the plain ranking)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    out.mkdir(parents=True, exist_ok=True)
    ratings = load_ratings(dataset, settings)
    train, test = u75_split(ratings)
    train.to_csv(out / "train.csv", index=False)
    test.to_csv(out / "test.csv", index=False)
    relevant = test.groupby("user_id")["item_id"].apply(set).to_dict()
    n_items = ratings["item_id"].nunique()
    popularity = (train.groupby("item_id")["user_id"].nunique() / train["user_id"].nunique()).to_dict()
    vectors = item_vectors(dataset, settings, ratings["item_id"].dtype)
    item_ids = np.array(sorted(train["item_id"].unique()), dtype=object)
    matrix = InteractionMatrix.from_frame(train, item_ids=item_ids, weight_col="rating")
    side = side_data(dataset, settings, item_ids, ratings, vectors, spark="als" in models)
    context = FitContext(train, matrix, item_ids, side)
    users = [u for u in relevant if u in matrix.user_index]
    rows = np.array([matrix.user_index[u] for u in users], dtype=np.int64)
    exposure = settings.serving
    pools: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    choice = None
    if "ease" in models or "hybrid" in models:
        log("validation: tuning EASE λ, temporal β, input α and the blend weights on a per-user k-fold of train")
        choice = tune_choice(context, settings, weight_col="rating", blend="hybrid" in models, log=log)
    results: dict[str, dict] = {}
    # Each component is fitted once on train: the hybrid blends the standalone fits.
    fitters = fit_once(component_fitters(settings))
    fit_seconds: dict[str, float] = {}
    for name in models:
        if name in COMPONENTS and name not in available(side):
            log(f"{name}: skipped, its side data ({', '.join(NEEDS[name])}) is missing")
            continue
        log(f"{name}: fitting")
        start = time.perf_counter()
        scorer, _ = fit_candidate(name, context, settings, choice=choice, weight_col="rating", log=log, fitters=fitters)
        x = matrix.matrix[rows]
        scores_all = scorer.score(x, users)
        top = top_k(scores_all, x, k)  # seen items are now -inf in scores_all
        if exposure.exposure_strength > 0:
            pool = top_k(scores_all, None, max(k, exposure.exposure_pool))
            pools[name] = (pool, np.take_along_axis(scores_all, pool, axis=1))
        seconds = time.perf_counter() - start
        if name == "hybrid":  # its validation search and the fits of the components it reused
            reused = [c for c, w in scorer.weights.items() if w and c in results]
            seconds += choice.seconds + sum(fit_seconds[c] for c in reused)
        fit_seconds[name] = seconds
        recs = pd.DataFrame(
            {
                "user_id": np.repeat(np.array(users, dtype=object), top.shape[1]),
                "item_id": item_ids[top.ravel()],
                "rank": np.tile(np.arange(1, top.shape[1] + 1), len(users)),
            }
        )
        path = out / f"recommendations-{name}.csv"
        recs.to_csv(path, index=False)
        written = pd.read_csv(path, dtype={"user_id": ratings["user_id"].dtype, "item_id": ratings["item_id"].dtype})
        lists = written.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
        scores = evaluate(lists, relevant, k)
        extra = beyond_accuracy(lists, n_items=n_items, popularity=popularity, item_vectors=vectors, k=k)
        results[name] = (
            {m: scores[f"{m}@{k}"] for m in METRICS}
            | {m.split("@")[0]: v for m, v in extra.items()}
            | {"users": scores["users"], "train_seconds": round(seconds, 3)}
        )
        log(f"{name}: ndcg@{k}={results[name]['ndcg']:.4f} ({seconds:.1f} s)")
    best = max(results, key=lambda n: results[n]["ndcg"])
    metrics = {
        "protocol": protocol,
        "dataset": dataset,
        "k": k,
        "split_fingerprint": split_fingerprint(test),
        "models": results,
        "best": best,
    }
    if choice is not None:
        metrics["validation"] = choice.to_dict()
    if best in pools:
        metrics["exposure_rerank"] = _exposure_rerank_metrics(
            pools[best], matrix, rows, users, item_ids, vectors, relevant, popularity, n_items, k, settings
        )
        log(f"{best} + exposure re-ranking: ndcg@{k}={metrics['exposure_rerank']['ndcg']:.4f}")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


def _exposure_rerank_metrics(
    pool: tuple[np.ndarray, np.ndarray],
    matrix: InteractionMatrix,
    rows: np.ndarray,
    users: list,
    item_ids: np.ndarray,
    vectors: dict | None,
    relevant: dict,
    popularity: dict,
    n_items: int,
    k: int,
    settings: Settings,
) -> dict:
    """The best model's lists as serving would serve them with ``serving.exposure_*``
    (:func:`training.rerank.rerank_rows` over its top ``max(k, exposure_pool)``, calibrated to
    each user's train history): its accuracy and beyond-accuracy metrics and the settings."""
    serving = settings.serving
    genres = None
    if vectors:
        width = len(next(iter(vectors.values())))
        genres = item_genre_matrix(np.array([vectors.get(i, np.zeros(width)) for i in item_ids]))
    x = matrix.matrix[rows]
    histories = [x.indices[x.indptr[r] : x.indptr[r + 1]] for r in range(x.shape[0])]
    picks = rerank_rows(
        pool[0],
        pool[1],
        histories,
        users,
        k,
        strength=serving.exposure_strength,
        tail=long_tail_mask(item_popularity(matrix.matrix)),
        tail_share=serving.exposure_tail_share,
        genres=genres,
    )
    lists = {user: list(item_ids[p]) for user, p in zip(users, picks)}
    scores = evaluate(lists, relevant, k)
    extra = beyond_accuracy(lists, n_items=n_items, popularity=popularity, item_vectors=vectors, k=k)
    return (
        {
            "strength": serving.exposure_strength,
            "tail_share": serving.exposure_tail_share,
            "pool": serving.exposure_pool,
        }
        | {m: scores[f"{m}@{k}"] for m in METRICS}
        | {m.split("@")[0]: v for m, v in extra.items()}
    )
