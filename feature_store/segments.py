"""User segmentation on behavioural profile features.

:func:`segment_users` standardizes the users' category affinities, context shares and
activity, keeps the principal components above the Marchenko-Pastur noise edge, runs
K-Means, a Gaussian mixture, Ward agglomerative clustering and DBSCAN, and keeps the eligible
labeling with the best silhouette (labels renumbered by size: 0 is the largest segment);
:func:`plot_segments` and :func:`segment_summary` give the pictures and the table for review.
Segments feed per-segment fine-tuning, per-segment metrics and cold-start serving. Every
definition (features, noise reduction, sample, methods, eligibility, choice) is in
docs/models.md ("Segmentation").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from sklearn.cluster import DBSCAN, KMeans
from sklearn.metrics import pairwise_distances, silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

BEHAVIOURAL_PREFIXES: tuple[str, ...] = ("cat_", "share_")
ACTIVITY_COLUMNS: tuple[str, ...] = ("decayed_activity",)
"""Activity columns used (as ``log1p``) when the profiles have them."""
SILHOUETTE_SAMPLE = 5000
PLOT_SAMPLE = 3000
CATEGORY_PREFIX = "cat_"
METHODS: tuple[str, ...] = ("kmeans", "gmm", "agglomerative", "dbscan")
DBSCAN_QUANTILE = 0.9
MIN_SEGMENT_SHARE = 0.01
KNEE_MIN_GAP = 0.05
"""A knee counts only when the normalized curve lies at least this far below its chord."""


@dataclass
class MethodResult:
    """One method's outcome: ``k`` clusters in its labels, their ``silhouette`` on the sample,
    the silhouette (and for GMM the BIC) of every k tried, and method parameters."""

    method: str
    k: int
    silhouette: float
    silhouette_by_k: dict[int, float] = field(default_factory=dict)
    bic_by_k: dict[int, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    noise_share: float | None = None
    eligible: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (k keys become strings)."""
        out: dict[str, Any] = {
            "k": self.k,
            "silhouette": round(self.silhouette, 4),
            "params": self.params,
            "eligible": self.eligible,
        }
        if self.silhouette_by_k:
            out["silhouette_by_k"] = {str(k): round(v, 4) for k, v in self.silhouette_by_k.items()}
        if self.bic_by_k:
            out["bic_by_k"] = {str(k): round(v, 2) for k, v in self.bic_by_k.items()}
        if self.noise_share is not None:
            out["noise_share"] = round(self.noise_share, 4)
        return out


@dataclass
class Segmentation:
    """The chosen segmentation: ``labels`` is indexed by user_id; ``candidates`` maps each
    tried k to its K-Means silhouette; ``score`` is the silhouette of the kept ``method``;
    ``methods`` holds every method's result and ``method_labels`` its labels (same indexing);
    ``features`` are the standardized columns used, ``components`` the principal components kept."""

    method: str
    k: int
    labels: pd.Series
    score: float
    candidates: dict[int, float] = field(default_factory=dict)
    methods: dict[str, MethodResult] = field(default_factory=dict)
    features: list[str] = field(default_factory=list)
    sample_size: int = 0
    method_labels: dict[str, pd.Series] = field(default_factory=dict)
    components: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: method, k, silhouette, sizes, sample size, features, every method's scores."""
        return {
            "method": self.method,
            "k": self.k,
            "silhouette": round(self.score, 4),
            "sizes": self.labels.value_counts().sort_index().astype(int).tolist(),
            "sample_size": self.sample_size,
            "features": list(self.features),
            "components": self.components,
            "methods": {name: result.to_dict() for name, result in self.methods.items()},
        }


def behavioural_columns(profiles: pd.DataFrame) -> list[str]:
    """Profile columns that feed segmentation, in profile order: ``cat_*``, ``share_*`` and
    :data:`ACTIVITY_COLUMNS`."""
    return [c for c in profiles.columns if c.startswith(BEHAVIOURAL_PREFIXES) or c in ACTIVITY_COLUMNS]


def segmentation_features(profiles: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """(users, features) standardized matrix and its column names (docs/models.md, "Segmentation").

    Activity columns enter as ``log1p`` and are named ``log1p(<column>)``."""
    columns = behavioural_columns(profiles)
    if not columns:
        raise ValueError(f"profiles: no behavioural columns (prefixes {BEHAVIOURAL_PREFIXES})")
    x = profiles[columns].to_numpy(dtype=float)
    if np.isnan(x).any():
        row, col = np.argwhere(np.isnan(x))[0]
        raise ValueError(f"profiles: user {profiles['user_id'].iloc[row]!r} has NaN in {columns[col]!r}")
    activity = [j for j, c in enumerate(columns) if c in ACTIVITY_COLUMNS]
    if activity:
        if (x[:, activity] < 0).any():
            raise ValueError(f"profiles: negative values in activity columns {[columns[j] for j in activity]}")
        x[:, activity] = np.log1p(x[:, activity])
    names = [f"log1p({c})" if c in ACTIVITY_COLUMNS else c for c in columns]
    std = x.std(axis=0)
    varying = std > 1e-12
    if not varying.any():
        raise ValueError("profiles: every behavioural column is constant; nothing to segment")
    x = x[:, varying]
    x = (x - x.mean(axis=0)) / std[varying]
    return x, [n for n, keep in zip(names, varying) if keep]


def principal_components(x: np.ndarray) -> np.ndarray:
    """Scores of standardized ``x`` on its principal components with eigenvalue above the
    Marchenko-Pastur edge ``(1 + sqrt(d / n))**2`` (at least ``min(2, d)``), largest first."""
    n, d = x.shape
    eigenvalues, vectors = np.linalg.eigh(x.T @ x / n)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    edge = (1.0 + np.sqrt(d / n)) ** 2
    keep = max(min(2, d), int((eigenvalues > edge).sum()))
    return x @ vectors[:, :keep]


def feature_space(profiles: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """The matrix clustering and the pictures use: :func:`principal_components` of
    :func:`segmentation_features`; returns it and the standardized column names."""
    x, names = segmentation_features(profiles)
    return principal_components(x), names


def deterministic_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted row indices of ``min(n, size)`` rows drawn without replacement by ``default_rng(seed)``;
    every row when ``n <= size``."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def _silhouette(dist: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette from the sample's distance matrix; -1 unless 2 <= clusters <= rows - 1."""
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels > len(labels) - 1:
        return -1.0
    return float(silhouette_score(dist, labels, metric="precomputed"))


def _by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber labels so 0 is the largest segment (ties by the old label)."""
    values, counts = np.unique(labels, return_counts=True)
    order = values[np.lexsort((values, -counts))]
    remap = np.empty(int(values.max()) + 1, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return remap[labels]


def min_segment_size(n: int) -> int:
    """Smallest eligible segment among ``n`` users: ``max(2, ceil(MIN_SEGMENT_SHARE * n))``."""
    return max(2, int(np.ceil(MIN_SEGMENT_SHARE * n)))


def _eligible(labels: np.ndarray, min_size: int) -> bool:
    return int(np.unique(labels, return_counts=True)[1].min()) >= min_size


def _pick(ks: list[int], ok: dict[int, bool], key) -> int:
    """The k minimizing ``key`` among eligible ks (all ks when none is)."""
    pool = [k for k in ks if ok[k]] or ks
    return min(pool, key=key)


def nearest_centroid(x: np.ndarray, x_fit: np.ndarray, labels_fit: np.ndarray) -> np.ndarray:
    """Label of the nearest centroid (mean of ``x_fit`` rows per label >= 0) for every row of ``x``."""
    clusters = np.unique(labels_fit[labels_fit >= 0])
    if len(clusters) == 0:
        raise ValueError("nearest_centroid: no cluster to assign to")
    centroids = np.vstack([x_fit[labels_fit == c].mean(axis=0) for c in clusters])
    return clusters[pairwise_distances(x, centroids).argmin(axis=1)]


def knee_index(values: np.ndarray) -> int | None:
    """Knee of an increasing curve (sorted ``values``): the index where the curve, scaled to the unit
    square, lies farthest below its chord; None when that gap is under :data:`KNEE_MIN_GAP`."""
    y = np.sort(np.asarray(values, dtype=float))
    if len(y) < 3 or y[-1] - y[0] <= 1e-9 * max(abs(y[-1]), 1.0):
        return None
    xs = np.linspace(0.0, 1.0, len(y))
    gap = xs - (y - y[0]) / (y[-1] - y[0])
    best = int(gap.argmax())
    return best if gap[best] >= KNEE_MIN_GAP else None


def dbscan_params(x: np.ndarray) -> dict[str, Any]:
    """``min_samples`` = 2 * dimension clipped to [3, n / 10]; ``eps`` from the knee of the sorted
    distances to the ``min_samples``-th neighbour (the point itself counted), else their 90% quantile."""
    n, dim = x.shape
    min_samples = int(np.clip(2 * dim, 3, max(3, n // 10)))
    min_samples = min(min_samples, n)
    dist, _ = NearestNeighbors(n_neighbors=min_samples).fit(x).kneighbors(x)
    kdist = np.sort(dist[:, -1])
    knee = knee_index(kdist)
    if knee is not None and kdist[knee] > 0:
        eps, rule = float(kdist[knee]), "knee"
    else:
        eps, rule = float(np.quantile(kdist, DBSCAN_QUANTILE)), f"quantile_{DBSCAN_QUANTILE}"
    return {"eps": max(eps, 1e-9), "min_samples": min_samples, "eps_rule": rule}


def _fit_kmeans(
    x: np.ndarray, ks: list[int], dist: np.ndarray, sample: np.ndarray, seed: int, min_size: int
) -> tuple[MethodResult, np.ndarray]:
    fitted = {k: KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x) for k in ks}
    scores = {k: _silhouette(dist, fitted[k][sample]) for k in ks}
    ok = {k: _eligible(fitted[k], min_size) for k in ks}
    best = _pick(ks, ok, lambda k: (-scores[k], k))
    return MethodResult("kmeans", best, scores[best], scores, params={"n_init": 10}, eligible=ok[best]), fitted[best]


def _fit_gmm(
    x: np.ndarray, ks: list[int], dist: np.ndarray, sample: np.ndarray, seed: int, min_size: int
) -> tuple[MethodResult, np.ndarray]:
    fitted, bic, scores = {}, {}, {}
    for k in ks:
        gmm = GaussianMixture(n_components=k, covariance_type="diag", n_init=2, random_state=seed).fit(x)
        fitted[k] = gmm.predict(x)
        bic[k] = float(gmm.bic(x))
        scores[k] = _silhouette(dist, fitted[k][sample])
    ok = {k: _eligible(fitted[k], min_size) for k in ks}
    best = _pick(ks, ok, lambda k: (bic[k], k))
    k = int(len(np.unique(fitted[best])))  # a component may end up empty
    result = MethodResult(
        "gmm",
        k,
        scores[best],
        scores,
        bic,
        params={"covariance_type": "diag", "n_init": 2, "n_components": best},
        eligible=ok[best],
    )
    return result, fitted[best]


def _fit_agglomerative(
    x: np.ndarray, ks: list[int], dist: np.ndarray, sample: np.ndarray, min_size: int
) -> tuple[MethodResult, np.ndarray]:
    tree = linkage(x[sample], method="ward")
    cuts = {k: fcluster(tree, t=k, criterion="maxclust") - 1 for k in ks}
    scores = {k: _silhouette(dist, cuts[k]) for k in ks}
    extended = {}
    for k in ks:
        extended[k] = nearest_centroid(x, x[sample], cuts[k])
        extended[k][sample] = cuts[k]
    ok = {k: _eligible(extended[k], min_size) for k in ks}
    best = _pick(ks, ok, lambda k: (-scores[k], k))
    k = int(len(np.unique(cuts[best])))
    return MethodResult(
        "agglomerative", k, scores[best], scores, params={"linkage": "ward"}, eligible=ok[best]
    ), extended[best]


def _fit_dbscan(
    x: np.ndarray, dist: np.ndarray, sample: np.ndarray, min_size: int
) -> tuple[MethodResult, np.ndarray | None]:
    x_fit = x[sample]
    params = dbscan_params(x_fit)
    raw = DBSCAN(eps=params["eps"], min_samples=params["min_samples"]).fit_predict(x_fit)
    noise = raw < 0
    clusters = int(len(np.unique(raw[~noise])))
    params = {**params, "eps": round(params["eps"], 6)}
    if clusters == 0:
        return MethodResult("dbscan", 0, -1.0, params=params, noise_share=float(noise.mean()), eligible=False), None
    fit_labels = raw.copy()
    if noise.any():
        fit_labels[noise] = nearest_centroid(x_fit[noise], x_fit, raw)
    labels = nearest_centroid(x, x_fit, fit_labels)
    labels[sample] = fit_labels
    score = _silhouette(dist, fit_labels)
    ok = clusters >= 2 and _eligible(labels, min_size)
    return MethodResult("dbscan", clusters, score, params=params, noise_share=float(noise.mean()), eligible=ok), labels


def segment_users(
    profiles: pd.DataFrame, *, k_min: int = 2, k_max: int = 8, seed: int = 0, sample_size: int = SILHOUETTE_SAMPLE
) -> Segmentation:
    """Segment users by their standardized behavioural features (docs/models.md, "Segmentation")."""
    n = len(profiles)
    if k_min < 2 or k_max < k_min:
        raise ValueError(f"need 2 <= k_min <= k_max, got k_min={k_min}, k_max={k_max}")
    if n <= k_min:
        raise ValueError(f"profiles: {n} users cannot form {k_min} segments")
    if sample_size <= k_min:
        raise ValueError(f"sample_size must exceed k_min, got {sample_size}")
    if profiles["user_id"].duplicated().any():
        raise ValueError("profiles: user_id values are not unique")
    x, features = feature_space(profiles)
    sample = deterministic_sample(n, sample_size, seed)
    dist = pairwise_distances(x[sample]).astype(np.float32)
    ks = list(range(k_min, min(k_max, len(sample) - 1) + 1))
    min_size = min_segment_size(n)

    results: dict[str, MethodResult] = {}
    labels_of: dict[str, np.ndarray] = {}
    results["kmeans"], labels_of["kmeans"] = _fit_kmeans(x, ks, dist, sample, seed, min_size)
    results["gmm"], labels_of["gmm"] = _fit_gmm(x, ks, dist, sample, seed, min_size)
    results["agglomerative"], labels_of["agglomerative"] = _fit_agglomerative(x, ks, dist, sample, min_size)
    results["dbscan"], dbscan_labels = _fit_dbscan(x, dist, sample, min_size)
    if dbscan_labels is not None:
        labels_of["dbscan"] = dbscan_labels

    index = pd.Index(profiles["user_id"].astype(str), name="user_id")
    series = {m: pd.Series(_by_size(labels), index=index, name="segment") for m, labels in labels_of.items()}
    method = max(series, key=lambda m: (results[m].eligible, results[m].silhouette, -METHODS.index(m)))
    return Segmentation(
        method=method,
        k=int(series[method].nunique()),
        labels=series[method],
        score=results[method].silhouette,
        candidates=dict(results["kmeans"].silhouette_by_k),
        methods=results,
        features=features,
        sample_size=len(sample),
        method_labels=series,
        components=int(x.shape[1]),
    )


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
    top_categories = (
        [
            [c[len(CATEGORY_PREFIX) :] for c in row.sort_values(ascending=False, kind="stable").index[:top]]
            for _, row in affinity.iterrows()
        ]
        if cat_cols
        else [[] for _ in range(len(affinity))]
    )
    summary = pd.DataFrame(
        {
            "segment": groups.size().index.astype(int),
            "size": groups.size().to_numpy(),
            "top_categories": top_categories,
            "mean_events_30d": groups["events_30d"].mean().to_numpy() if "events_30d" in frame else np.nan,
        }
    )
    return summary.sort_values("segment").reset_index(drop=True)


def summary_markdown(summary: pd.DataFrame, seg: Segmentation) -> str:
    """Markdown report: the kept method, k and silhouette, every method's scores, and the summary table."""
    lines = [
        f"# User segments: {seg.method}, k={seg.k}",
        "",
        f"Silhouette {seg.score:.4f} on a sample of {seg.sample_size} users; {seg.components} principal "
        f"components of the standardized features {', '.join(seg.features)}.",
        "",
        "| method | k | silhouette | eligible | silhouette by k | BIC by k | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in seg.methods.items():
        by_k = ", ".join(f"{k}: {v:.3f}" for k, v in r.silhouette_by_k.items())
        bic = ", ".join(f"{k}: {v:.0f}" for k, v in r.bic_by_k.items())
        params = ", ".join(f"{k}={v}" for k, v in r.params.items())
        if r.noise_share is not None:
            params += f", noise_share={r.noise_share:.3f}"
        lines.append(
            f"| {name} | {r.k} | {r.silhouette:.4f} | {'yes' if r.eligible else 'no'} | {by_k} | {bic} | {params} |"
        )
    lines += ["", "| segment | size | top categories | mean events (30d) |", "|---|---|---|---|"]
    for row in summary.itertuples(index=False):
        lines.append(f"| {row.segment} | {row.size} | {', '.join(row.top_categories)} | {row.mean_events_30d:.2f} |")
    return "\n".join(lines) + "\n"


def _embeddings(x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """2-D t-SNE and UMAP embeddings of ``x`` (fixed seeds)."""
    from sklearn.manifold import TSNE

    try:
        import umap
    except ImportError as exc:  # umap-learn is a declared dependency of the segment pictures
        raise RuntimeError(f"segments_umap.png needs umap-learn (`import umap` failed: {exc})") from exc
    n = len(x)
    tsne = TSNE(
        n_components=2, perplexity=float(min(30.0, max(2.0, (n - 1) / 3))), init="pca", random_state=seed
    ).fit_transform(x)
    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(15, max(2, n - 1))), random_state=seed, n_jobs=1)
    return {"tsne": tsne, "umap": reducer.fit_transform(x)}


def plot_segments(
    profiles: pd.DataFrame, seg: Segmentation, out_dir: Path, *, seed: int = 0, sample_size: int = PLOT_SAMPLE
) -> list[Path]:
    """Write ``segments_tsne.png`` and ``segments_umap.png`` to ``out_dir``: 2-D t-SNE / UMAP embeddings
    of the :func:`feature_space` rows of a deterministic sample of at most ``sample_size``
    users, coloured by segment, titled with method and k. Returns the two paths."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    ids = profiles["user_id"].astype(str)
    if not ids.isin(seg.labels.index).all():
        raise ValueError(f"plot_segments: user {ids[~ids.isin(seg.labels.index)].iloc[0]!r} has no segment")
    if len(profiles) < 5:
        raise ValueError(f"plot_segments: {len(profiles)} users are too few to embed")
    x, _ = feature_space(profiles)
    rows = deterministic_sample(len(profiles), sample_size, seed)
    labels = seg.labels.reindex(ids.iloc[rows]).to_numpy()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmap = colormaps["tab10" if seg.k <= 10 else "tab20"]
    paths = []
    for name, emb in _embeddings(x[rows], seed).items():
        fig = Figure(figsize=(7, 6), dpi=100)
        ax = fig.subplots()
        for s in np.unique(labels):
            mask = labels == s
            ax.scatter(
                emb[mask, 0],
                emb[mask, 1],
                s=8,
                alpha=0.7,
                color=cmap(int(s) % cmap.N),
                label=f"segment {s} ({int(mask.sum())})",
            )
        title = "t-SNE" if name == "tsne" else "UMAP"
        ax.set_title(f"User segments ({title}): {seg.method}, k={seg.k}, {len(rows)} users")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8, markerscale=2)
        path = out_dir / f"segments_{name}.png"
        fig.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths
