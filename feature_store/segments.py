"""User segmentation on the behavioural profile features.

Features are the profile columns starting with :data:`BEHAVIOURAL_PREFIXES`,
standardized (zero mean, unit variance; constant columns dropped). K-Means is
fitted for every k in [k_min, k_max] and k is chosen by the silhouette score
(Euclidean, on a deterministic sample of at most :data:`SILHOUETTE_SAMPLE`
users). A Gaussian mixture (diagonal covariances) with the chosen k is fitted
too and kept when its silhouette is higher. Segment labels are renumbered by size: 0 is the largest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.preprocessing import StandardScaler

BEHAVIOURAL_PREFIXES: tuple[str, ...] = ("cat_", "share_")
SILHOUETTE_SAMPLE = 5000
CATEGORY_PREFIX = "cat_"


@dataclass
class Segmentation:
    """The chosen segmentation: ``labels`` is indexed by user_id; ``candidates`` maps each
    tried k to its K-Means silhouette; ``score`` is the silhouette of the kept ``method``."""

    method: str
    k: int
    labels: pd.Series
    score: float
    candidates: dict[int, float] = field(default_factory=dict)


def behavioural_columns(profiles: pd.DataFrame) -> list[str]:
    """Profile columns that feed segmentation, in profile order."""
    return [c for c in profiles.columns if c.startswith(BEHAVIOURAL_PREFIXES)]


def _standardized(profiles: pd.DataFrame) -> np.ndarray:
    columns = behavioural_columns(profiles)
    if not columns:
        raise ValueError(f"profiles: no behavioural columns (prefixes {BEHAVIOURAL_PREFIXES})")
    x = profiles[columns].to_numpy(dtype=float)
    if np.isnan(x).any():
        row, col = np.argwhere(np.isnan(x))[0]
        raise ValueError(f"profiles: user {profiles['user_id'].iloc[row]!r} has NaN in {columns[col]!r}")
    varying = x.std(axis=0) > 0
    if not varying.any():
        raise ValueError("profiles: every behavioural column is constant; nothing to segment")
    return StandardScaler().fit_transform(x[:, varying])


def _silhouette(x: np.ndarray, labels: np.ndarray, sample: np.ndarray) -> float:
    """Silhouette on ``sample`` rows; -1 when fewer than two clusters appear there."""
    if len(np.unique(labels[sample])) < 2:
        return -1.0
    return float(silhouette_score(x[sample], labels[sample]))


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels so 0 is the largest segment (ties by the old label)."""
    values, counts = np.unique(labels, return_counts=True)
    order = values[np.lexsort((values, -counts))]
    remap = np.empty(int(values.max()) + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


def segment_users(profiles: pd.DataFrame, *, k_min: int = 2, k_max: int = 8, seed: int = 0) -> Segmentation:
    """Segment users by their standardized behavioural features (see the module docstring)."""
    n = len(profiles)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if n <= k_min:
        raise ValueError(f"profiles: {n} users cannot form {k_min} segments")
    if profiles["user_id"].duplicated().any():
        raise ValueError("profiles: user_id values are not unique")
    x = _standardized(profiles)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(n, size=min(n, SILHOUETTE_SAMPLE), replace=False))

    candidates: dict[int, float] = {}
    fitted: dict[int, np.ndarray] = {}
    for k in range(k_min, min(k_max, n - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        candidates[k] = _silhouette(x, labels, sample)
        fitted[k] = labels
    best_k = max(candidates, key=lambda k: (candidates[k], -k))
    method, labels, score = "kmeans", fitted[best_k], candidates[best_k]

    gmm = GaussianMixture(n_components=best_k, covariance_type="diag", random_state=seed, n_init=2)
    gmm_labels = gmm.fit_predict(x)
    gmm_score = _silhouette(x, gmm_labels, sample)
    if gmm_score > score:
        method, labels, score = "gmm", gmm_labels, gmm_score

    index = pd.Index(profiles["user_id"].astype(str), name="user_id")
    series = pd.Series(_by_size(labels), index=index, name="segment")
    return Segmentation(method=method, k=int(len(np.unique(labels))), labels=series, score=score, candidates=candidates)


def segment_summary(profiles: pd.DataFrame, seg: Segmentation, *, top: int = 3) -> pd.DataFrame:
    """Per segment (sorted): ``size``, ``top_categories`` (the ``top`` categories by mean affinity in
    the segment, highest first) and ``mean_events_30d``."""
    frame = profiles.assign(user_id=profiles["user_id"].astype(str)).set_index("user_id")
    missing = seg.labels.index.difference(frame.index)
    if len(missing):
        raise ValueError(f"segmentation: user {missing[0]!r} is not in profiles")
    frame = frame.loc[seg.labels.index]
    groups = frame.groupby(seg.labels.to_numpy())
    cat_cols = [c for c in frame.columns if c.startswith(CATEGORY_PREFIX)]
    affinity = groups[cat_cols].mean() if cat_cols else pd.DataFrame(index=groups.size().index)
    top_categories = [
        [c[len(CATEGORY_PREFIX):] for c in row.sort_values(ascending=False, kind="stable").index[:top]]
        for _, row in affinity.iterrows()
    ] if cat_cols else [[] for _ in range(len(affinity))]
    summary = pd.DataFrame({
        "segment": groups.size().index.astype(int),
        "size": groups.size().to_numpy(),
        "top_categories": top_categories,
        "mean_events_30d": groups["events_30d"].mean().to_numpy() if "events_30d" in frame else np.nan,
    })
    return summary.sort_values("segment").reset_index(drop=True)
