"""Shared helpers for the serving tests: the tiny interaction set, a hand-built bundle and a free port.

Imported as ``from fixtures_serving import ...`` by unit and integration tests alike: pytest's
default ``prepend`` import mode puts ``tests/`` (the directory of its ``conftest.py``) on ``sys.path``.
The moto S3 fixture (``s3_endpoint``) lives in ``tests/conftest.py``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.net import free_port
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


HYBRID_CATEGORIES = ("action", "comedy", "drama", "news")


def hybrid_frames(seed: int = 0, n_users: int = 60, n_items: int = 40):
    """A synthetic catalogue with two user groups: young users (age < 30) mostly watch
    action/comedy, older users drama/news. Returns ``(interactions, items, users)`` frames;
    items have content embeddings (category one-hot + noise) in ``items["embedding"]``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    item_ids = [f"m{n:02d}" for n in range(n_items)]
    cats = [
        [HYBRID_CATEGORIES[n % 4]] + ([HYBRID_CATEGORIES[(n + 1) % 4]] if n % 7 == 0 else []) for n in range(n_items)
    ]
    emb = np.zeros((n_items, 8), dtype=np.float32)
    for n, cs in enumerate(cats):
        for c in cs:
            emb[n, HYBRID_CATEGORIES.index(c)] = 1.0
    emb[:, 4:] = rng.normal(0, 0.3, (n_items, 4))
    rows, users = [], []
    for u in range(n_users):
        young = u % 2 == 0
        liked = {"action", "comedy"} if young else {"drama", "news"}
        users.append(
            {
                "user_id": f"u{u}",
                "age": int(rng.integers(18, 29) if young else rng.integers(40, 70)),
                "gender": "F" if u % 4 < 2 else "M",
            }
        )
        weights = np.array([4.0 if set(c) & liked else 0.5 for c in cats])
        weights *= np.linspace(2.0, 0.5, n_items)  # a popularity slope
        chosen = rng.choice(n_items, size=int(rng.integers(5, 12)), replace=False, p=weights / weights.sum())
        for t, i in enumerate(chosen):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": item_ids[i],
                    "rating": float(rng.integers(1, 6)),
                    "timestamp": pd.Timestamp("2024-01-01") + pd.Timedelta(hours=t),
                }
            )
    items = pd.DataFrame({"item_id": item_ids, "title": [f"Movie {i}" for i in item_ids], "categories": cats})
    items["embedding"] = list(emb)
    return pd.DataFrame(rows), items, pd.DataFrame(users)


def hybrid_bundle(
    out_dir: Path,
    version: str = "v1",
    seed: int = 0,
    segments: bool = True,
    als: bool = False,
    segment_models: bool = False,
    n_users: int = 60,
) -> Path:
    """A bundle of a real :class:`training.hybrid.WeightedHybrid` (EASE anchor + neural +
    content + popularity, optionally a hand-made ALS component) fitted on :func:`hybrid_frames`;
    with ``segments``, the serving segment files (young/old segments) are added; with
    ``segment_models``, the neural component gets a model fine-tuned for the ``young``
    segment (``old`` users stay on the global model). ``n_users`` users (of :func:`hybrid_frames`)."""
    import numpy as np

    from core.settings import load_settings
    from serving.segments import write_segment_profiles
    from training.candidates import ALSScorer, component_fitters
    from training.hybrid import HybridChoice, fit_hybrid

    frame, items, users = hybrid_frames(seed, n_users=n_users)
    item_ids = items["item_id"].to_numpy(dtype=object)
    emb = np.stack(items["embedding"].to_list())
    cat_hot = np.array([[1.0 if c in cs else 0.0 for c in HYBRID_CATEGORIES] for cs in items["categories"]], np.float32)
    settings = load_settings(neural={"embedding_dim": 8, "hidden": [16], "epochs": 4, "batch_size": 16, "seed": seed})
    weights = {"ease": 1.0, "neural": 0.5, "content": 0.3, "popularity": 0.1}
    choice = HybridChoice(20.0, 20.0, 0.0, 0.0, weights, {}, 0)
    side = {"item_embeddings": emb, "item_categories": cat_hot}
    model = fit_hybrid(frame, item_ids, choice, component_fitters(settings), weight_col="rating", side=side)
    matrix = InteractionMatrix.from_frame(frame, item_ids=item_ids, weight_col="rating")
    if als:
        from training.als import FactorModel

        rng = np.random.default_rng(seed + 1)
        factors = FactorModel(
            np.array(matrix.user_ids, dtype=object),
            rng.normal(0, 1, (len(matrix.user_ids), 3)).astype(np.float32),
            rng.normal(0, 1, (len(item_ids), 3)).astype(np.float32),
            0.1,
            1.0,
        )
        model.components["als"] = ALSScorer(factors)
        model.weights["als"], model.scales["als"] = 0.2, 2.0
    seg = {row.user_id: "young" if row.age < 30 else "old" for row in users.itertuples()}
    if segment_models:
        from training.candidates import NeuralScorer, item_side_features
        from training.segment_tuning import refit_segment_models

        start = model.components["neural"].model
        young = refit_segment_models(
            start,
            frame,
            item_ids,
            {"young": {"lr": 0.02}},
            seg,
            settings,
            item_features=item_side_features(side),
            log=lambda _: None,
        )
        model.components["neural"] = NeuralScorer(start, young, seg)
    x = matrix.matrix
    write_bundle(
        out_dir,
        model=model,
        item_ids=item_ids,
        titles=items["title"].tolist(),
        categories=items["categories"].tolist(),
        history={u: x[r].indices.tolist() for u, r in matrix.user_index.items()},
        history_weights={u: x[r].data.tolist() for u, r in matrix.user_index.items()},
        popularity=popularity(x),
        metadata={"version": version, "k": 10, "metrics": {}, "model_name": "hybrid"},
    )
    if segments:
        write_segment_profiles(out_dir, item_ids, frame, seg, users=users)
    return out_dir


class LiveServer:
    """A real uvicorn server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = None

    def __enter__(self) -> LiveServer:
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
