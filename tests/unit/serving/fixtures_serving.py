"""Shared helpers for the serving tests: the tiny interaction set, a hand-built bundle and a free port.

Imported as ``from fixtures_serving import ...`` (pytest's default ``prepend`` import mode puts this
directory on ``sys.path``). The moto S3 fixture lives in ``conftest.py`` next to this file.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from training.bundle import write_bundle
from training.models import InteractionMatrix, fit_ease, fit_popularity, popularity

PAIRS = [
    ("u1", "i1"), ("u1", "i2"), ("u1", "i3"),
    ("u2", "i1"), ("u2", "i2"), ("u2", "i4"),
    ("u3", "i2"), ("u3", "i3"), ("u3", "i5"),
    ("u4", "i1"), ("u4", "i3"),
    ("u5", "i4"), ("u5", "i5"), ("u5", "i6"),
]  # fmt: skip


def tiny_bundle(
    out_dir: Path,
    version: str = "v1",
    model_kind: str = "ease",
    registered_model_version: str = "3",
    categories: list[list[str]] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """A 5-user × 6-item bundle built by hand (no trainer involved).

    ``categories`` defaults to alternating ``["comedy", "news"]`` / ``["drama"]`` per item;
    ``metrics`` defaults to ``{"ndcg@10": 0.5}``.
    """
    data = InteractionMatrix.from_frame(pd.DataFrame(PAIRS, columns=["user_id", "item_id"]))
    x = data.matrix
    model = fit_ease(x, lam=1.0) if model_kind == "ease" else fit_popularity(x)
    if categories is None:
        categories = [["drama"] if n % 2 else ["comedy", "news"] for n in range(len(data.item_ids))]
    return write_bundle(
        out_dir,
        model=model,
        item_ids=data.item_ids,
        titles=[f"Title {i}" for i in data.item_ids],
        categories=[list(c) for c in categories],
        history={u: x[i].indices.tolist() for u, i in data.user_index.items()},
        popularity=popularity(x),
        metadata={
            "version": version,
            "registered_model_version": registered_model_version,
            "metrics": {"ndcg@10": 0.5} if metrics is None else dict(metrics),
            "k": 10,
        },
    )


