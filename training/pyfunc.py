"""The MLflow pyfunc flavour of a hyperrec model: input rows ``(user_id, k)``,
output rows ``(user_id, item_id, rank, score)``."""

from __future__ import annotations

import mlflow.pyfunc
import pandas as pd

from training.bundle import Bundle, load_bundle


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.bundle = load_bundle(context.artifacts["bundle"])

    @staticmethod
    def recommend(bundle: Bundle, model_input: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for user_id, k in zip(
            model_input["user_id"].astype(str), model_input.get("k", pd.Series([10] * len(model_input)))
        ):
            items, _cold = bundle.recommend(user_id, int(k))
            rows.extend(
                {"user_id": user_id, "item_id": it["item_id"], "rank": it["rank"], "score": float(it["score"])}
                for it in items
            )
        return pd.DataFrame(rows, columns=["user_id", "item_id", "rank", "score"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.recommend(self.bundle, model_input)
