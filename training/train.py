"""Train the candidate recommenders on the train split and evaluate them on the
held-out test split. Nothing here looks at test data before evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hyperrec.settings import TrainingSettings
from pipelines.split import split_fingerprint
from training.metrics import catalog_coverage, evaluate
from training.models import InteractionMatrix, ItemItemModel, fit_ease, fit_item_knn, fit_popularity


@dataclass
class CandidateResult:
    name: str
    model: ItemItemModel
    metrics: dict[str, float]
    fit_seconds: float


@dataclass
class TrainingResult:
    """Every candidate, the best one by NDCG@k, and the data they were trained on."""

    k: int
    train: InteractionMatrix
    candidates: dict[str, CandidateResult]
    best: str
    split_fingerprint: str
    relevant: dict[str, set] = field(repr=False)

    @property
    def best_model(self) -> ItemItemModel:
        return self.candidates[self.best].model


def relevant_items(train: InteractionMatrix, test: pd.DataFrame) -> dict[str, set]:
    """Per known user, the test items they had not interacted with in train."""
    seen = {
        user: set(train.item_ids[train.matrix.indices[train.matrix.indptr[u]:train.matrix.indptr[u + 1]]])
        for user, u in train.user_index.items()
    }
    relevant: dict[str, set] = {}
    for user, items in test.groupby("user_id")["item_id"]:
        if user in seen:
            rel = set(items) - seen[user]
            if rel:
                relevant[user] = rel
    return relevant


def recommend_ids(model: ItemItemModel, train: InteractionMatrix, users: list[str], k: int, batch: int = 2048) -> dict[str, list[str]]:
    """Top-``k`` item ids for each known user in ``users``, seen items excluded."""
    rows = np.array([train.user_index[u] for u in users], dtype=np.int64)
    result: dict[str, list[str]] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        top = model.recommend(train.matrix[chunk], k)
        for u, idx in zip(chunk, top):
            result[train.user_ids[u]] = list(train.item_ids[idx])
    return result


def score_model(model: ItemItemModel, train: InteractionMatrix, relevant: dict[str, set], k: int) -> dict[str, float]:
    recs = recommend_ids(model, train, list(relevant), k)
    metrics = evaluate(recs, relevant, k)
    metrics[f"coverage@{k}"] = catalog_coverage(recs, len(train.item_ids), k)
    return metrics


def train_and_evaluate(train_df: pd.DataFrame, test_df: pd.DataFrame, items: pd.DataFrame, settings: TrainingSettings) -> TrainingResult:
    """Fit popularity, item-kNN and EASE on ``train_df``; evaluate on ``test_df``.

    The item axis is the catalogue (``items``), so items never interacted with in
    train still exist (with zero scores).
    """
    catalogue = np.array(sorted(items["item_id"].astype(str).unique()), dtype=object)
    train = InteractionMatrix.from_frame(train_df, item_ids=catalogue)
    relevant = relevant_items(train, test_df)
    if not relevant:
        raise ValueError("no test user has held-out items unseen in train: cannot evaluate")
    fitters = {
        "popularity": lambda x: fit_popularity(x),
        "item_knn": lambda x: fit_item_knn(x, settings.knn_neighbours),
        "ease": lambda x: fit_ease(x, settings.ease_lambda),
    }
    candidates = {}
    for name, fit in fitters.items():
        start = time.perf_counter()
        model = fit(train.matrix)
        elapsed = time.perf_counter() - start
        candidates[name] = CandidateResult(name, model, score_model(model, train, relevant, settings.k), elapsed)
    best = max(candidates, key=lambda n: candidates[n].metrics[f"ndcg@{settings.k}"])
    return TrainingResult(settings.k, train, candidates, best, split_fingerprint(test_df), relevant)


def history_of(train: InteractionMatrix) -> dict[str, np.ndarray]:
    """user_id → indices of the items the user interacted with in ``train``."""
    m = train.matrix
    return {user: m.indices[m.indptr[u]:m.indptr[u + 1]].astype(np.int32) for user, u in train.user_index.items()}


def load_split(split_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    cols = ["user_id", "item_id", "confidence", "timestamp"]
    return (pd.read_parquet(split_dir / "train", columns=cols), pd.read_parquet(split_dir / "test", columns=cols))
