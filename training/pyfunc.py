"""The MLflow pyfunc flavour of a hyperrec model: input rows ``(user_id[, k])``, output rows
``(user_id, item_id, rank, score)``, read from the serving bundle logged as the artifact
``bundle``.

This module fixes the flavour's contract; how a bundle answers is the serving tier's
(:class:`serving.publish.ServedPyfunc` builds the API's own served model), so the registered
model ranks exactly as the API does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

Recommend = Callable[[str, int], list[dict[str, Any]]]
"""``(user_id, k)`` → the ranked items, each with ``item_id``, ``rank`` and ``score``."""

COLUMNS = ["user_id", "item_id", "rank", "score"]
DEFAULT_K = 10


def recommendations_frame(recommend: Recommend, model_input: pd.DataFrame) -> pd.DataFrame:
    """The output rows of ``recommend`` for each input row (``k`` defaults to 10)."""
    ks = model_input["k"] if "k" in model_input else pd.Series([DEFAULT_K] * len(model_input))
    rows = []
    for user_id, k in zip(model_input["user_id"].astype(str), ks):
        rows.extend(
            {"user_id": user_id, "item_id": it["item_id"], "rank": int(it["rank"]), "score": float(it["score"])}
            for it in recommend(user_id, int(k))
        )
    return pd.DataFrame(rows, columns=COLUMNS)


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc model; a subclass says how a bundle directory becomes a :data:`Recommend`."""

    def open(self, bundle_dir: Path) -> Recommend:  # pragma: no cover - interface
        raise NotImplementedError

    def load_context(self, context) -> None:
        self._recommend = self.open(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return recommendations_frame(self._recommend, model_input)

    def __getstate__(self) -> dict[str, Any]:
        # The loaded recommender is never pickled with the model: it is rebuilt from the bundle.
        return {k: v for k, v in self.__dict__.items() if k != "_recommend"}
