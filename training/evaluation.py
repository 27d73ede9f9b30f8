"""Scoring a trained model on a held-out split: relevant items, top-k lists, metrics.

Test data is only read here, after training, and never feeds a fitted parameter.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from training.metrics import catalog_coverage, evaluate
from training.models import InteractionMatrix, Scorer, top_k


def relevant_items(train: InteractionMatrix, test: pd.DataFrame) -> dict[str, set]:
    """Per known user, the test items they had not interacted with in train."""
    seen = {
        user: set(train.item_ids[train.matrix.indices[train.matrix.indptr[u] : train.matrix.indptr[u + 1]]])
        for user, u in train.user_index.items()
    }
    relevant: dict[str, set] = {}
    for user, items in test.groupby("user_id")["item_id"]:
        if user in seen:
            rel = set(items) - seen[user]
            if rel:
                relevant[user] = rel
    return relevant


def recommend_ids(
    model: Scorer, train: InteractionMatrix, users: list[str], k: int, batch: int = 2048
) -> dict[str, list[str]]:
    """Top-``k`` item ids for each known user in ``users`` from their rows of ``train``
    (the same weighted history the model is served with), seen items excluded."""
    rows = np.array([train.user_index[u] for u in users], dtype=np.int64)
    result: dict[str, list[str]] = {}
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        x = train.matrix[chunk]
        top = top_k(model.score(x, [train.user_ids[u] for u in chunk]), x, k)
        for u, idx in zip(chunk, top):
            result[train.user_ids[u]] = list(train.item_ids[idx])
    return result


def score_model(model: Scorer, train: InteractionMatrix, relevant: dict[str, set], k: int) -> dict[str, float]:
    recs = recommend_ids(model, train, list(relevant), k)
    metrics = evaluate(recs, relevant, k)
    metrics[f"coverage@{k}"] = catalog_coverage(recs, len(train.item_ids), k)
    return metrics


def history_of(train: InteractionMatrix) -> dict[str, np.ndarray]:
    """user_id → indices of the items the user interacted with in ``train``."""
    m = train.matrix
    return {user: m.indices[m.indptr[u] : m.indptr[u + 1]].astype(np.int32) for user, u in train.user_index.items()}
