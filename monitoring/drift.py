"""Feature drift detection with Evidently: KS for numeric columns, chi-square or PSI for
categorical ones.

A numeric column is *drifted* when the two-sample Kolmogorov-Smirnov p-value of its
reference vs current values is below ``ks_threshold``. A categorical column is drifted,
with ``categorical_method="chisquare"``, when the p-value of Pearson's chi-square test of
homogeneity is below ``categorical_threshold``, or, with ``"psi"``, when its Population
Stability Index reaches ``categorical_threshold``. The dataset is drifted when the share of
drifted columns among the evaluated ones reaches ``drift_share``. Evidently's report is
kept as HTML and JSON next to a ``"hyperrec"`` summary block.

Evidently's own ``"chisquare"`` is a goodness-of-fit test that takes the reference shares
as exact; on reference and current of equal size it flagged 48 % of stable categorical
columns at p < 0.05 (docs/benchmarks.md, "Drift quality"). The chi-square used here is
the two-sample (homogeneity) form, registered with Evidently as
:data:`EVIDENTLY_CHISQUARE` so that it runs inside Evidently's report like its built-ins.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2_contingency

from core.files import write_text_atomic

NUMERIC_FEATURES: tuple[str, ...] = ("dwell_time_s", "scroll_depth", "hour_of_day", "rating", "items_per_user")
CATEGORICAL_FEATURES: tuple[str, ...] = ("device", "event_type", "category")
DRIFT_FEATURES: tuple[str, ...] = NUMERIC_FEATURES
"""Former name of :data:`NUMERIC_FEATURES`, kept for existing callers."""

KS_METHOD = "ks"
CHISQUARE_METHOD = "chisquare"
PSI_METHOD = "psi"
CATEGORICAL_METHODS: tuple[str, ...] = (CHISQUARE_METHOD, PSI_METHOD)
EVIDENTLY_CHISQUARE = "chisquare_two_sample"
"""Name under which the two-sample chi-square test is registered with Evidently."""
_EVIDENTLY_METHOD = {KS_METHOD: "ks", CHISQUARE_METHOD: EVIDENTLY_CHISQUARE, PSI_METHOD: "psi"}

UNKNOWN = "unknown"
"""Value of ``device`` and ``event_type`` where the event has none."""
NO_CATEGORY = "none"
"""Value of ``category`` where the item is unknown or lists no category."""

HTML_NAME = "drift_report.html"
JSON_NAME = "drift_report.json"

_SOURCE_COLUMNS: tuple[str, ...] = (
    "user_id",
    "dwell_time_s",
    "scroll_depth",
    "rating",
    "timestamp",
    "device",
    "event_type",
)


@dataclass
class DriftResult:
    """Outcome of one drift check.

    ``drifted`` is ``share_drifted >= drift_share``; ``share_drifted`` is the
    number of drifted columns divided by the number of evaluated columns;
    ``columns`` maps each evaluated column to ``{"p_value": float | None,
    "score": float, "drifted": bool, "method": "ks" | "chisquare" | "psi",
    "kind": "numeric" | "categorical"}``. For the p-value tests (ks, chisquare)
    ``score == p_value``; for psi ``p_value`` is None and ``score`` is the PSI.
    """

    drifted: bool
    share_drifted: float
    columns: dict[str, dict]
    html_path: Path
    json_path: Path


def _primary_category(categories: Any) -> str:
    """First listed category of an item's ``categories`` (list, array or a lone string);
    :data:`NO_CATEGORY` when there is none."""
    if categories is None or isinstance(categories, float):  # None / NaN: no list
        return NO_CATEGORY
    listed = [categories] if isinstance(categories, str) else list(categories)
    first = listed[0] if listed else None
    return str(first) if isinstance(first, str) and first else NO_CATEGORY


def _labels(values: pd.Series, missing: str) -> pd.Series:
    """``values`` as Python strings, nulls replaced by ``missing``."""
    return values.astype(object).where(values.notna(), missing).map(str)


def drift_features(interactions: pd.DataFrame, items: pd.DataFrame | None = None) -> pd.DataFrame:
    """Event-level frame for drift checks from an INTERACTIONS-schema frame.

    One row per event. Float columns, in ``NUMERIC_FEATURES`` order:
    ``dwell_time_s``, ``scroll_depth``, ``rating`` (copied, nulls kept),
    ``hour_of_day`` (UTC hour 0-23 of ``timestamp``; naive timestamps are read
    as UTC) and ``items_per_user`` (number of events of that event's user in
    ``interactions``). Then string columns, in ``CATEGORICAL_FEATURES`` order:
    ``device`` and ``event_type`` (null -> ``"unknown"``) and ``category``, the
    primary category of the event's item, i.e. the first entry of its
    ``categories`` in ``items`` (columns ``item_id``, ``categories``); ``"none"``
    when ``items`` is None, the item is not in ``items`` or lists no category.
    """
    missing = [c for c in _SOURCE_COLUMNS if c not in interactions.columns]
    if items is not None and "item_id" not in interactions.columns:
        missing.append("item_id")
    if missing:
        raise ValueError(f"drift_features: interactions frame is missing columns {missing}")
    ts = pd.to_datetime(interactions["timestamp"], utc=True)
    features = pd.DataFrame(
        {
            "dwell_time_s": pd.to_numeric(interactions["dwell_time_s"], errors="coerce"),
            "scroll_depth": pd.to_numeric(interactions["scroll_depth"], errors="coerce"),
            "hour_of_day": ts.dt.hour,
            "rating": pd.to_numeric(interactions["rating"], errors="coerce"),
            "items_per_user": interactions.groupby("user_id", dropna=False)["user_id"].transform("size"),
        },
        index=interactions.index,
    )[list(NUMERIC_FEATURES)].astype("float64")
    features["device"] = _labels(interactions["device"], UNKNOWN)
    features["event_type"] = _labels(interactions["event_type"], UNKNOWN)
    if items is None:
        features["category"] = NO_CATEGORY
    else:
        absent = [c for c in ("item_id", "categories") if c not in items.columns]
        if absent:
            raise ValueError(f"drift_features: items frame is missing columns {absent}")
        catalogue = items.drop_duplicates("item_id").set_index("item_id")["categories"]
        primary = catalogue.map(_primary_category)
        features["category"] = interactions["item_id"].map(primary).fillna(NO_CATEGORY).astype(object)
    return features


def chisquare_two_sample(reference: pd.Series, current: pd.Series) -> float:
    """p-value of Pearson's chi-square test of homogeneity of two categorical samples.

    The 2 x k table holds the counts of each of the k values seen (non-null) in
    either sample; under the null hypothesis both samples come from one
    distribution, estimated from the pooled counts, and the statistic has
    k - 1 degrees of freedom. No continuity correction. A value absent from one
    sample is a zero cell, which is allowed. k < 2 gives 1.0 (nothing to compare).
    """
    counts = pd.concat([reference.value_counts(), current.value_counts()], axis=1).fillna(0)
    if len(counts) < 2:
        return 1.0
    return float(chi2_contingency(counts.to_numpy().T, correction=False)[1])


def _evidently_chisquare(reference: pd.Series, current: pd.Series, feature_type: object, threshold: float):
    """Evidently stattest adapter of :func:`chisquare_two_sample`: ``(p_value, p_value < threshold)``."""
    p_value = chisquare_two_sample(reference, current)
    return p_value, p_value < threshold


@functools.cache
def _register_chisquare() -> None:
    """Register :func:`chisquare_two_sample` with Evidently as :data:`EVIDENTLY_CHISQUARE` (once)."""
    from evidently.legacy.calculations.stattests.registry import StatTest, register_stattest
    from evidently.legacy.core import ColumnType

    test = StatTest(
        name=EVIDENTLY_CHISQUARE,
        display_name="chi-square (two-sample) p_value",
        allowed_feature_types=[ColumnType.Categorical],
    )
    register_stattest(test, default_impl=_evidently_chisquare)


def _sample(frame: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """At most ``max_rows`` rows of ``frame``, drawn without replacement with ``seed``."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).sort_index()


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _candidates(
    reference: pd.DataFrame, current: pd.DataFrame, numeric: Sequence[str] | None, categorical: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Numeric and categorical columns to consider.

    ``numeric=None`` means every numeric (non-bool) column present in both frames
    and not named in ``categorical``. Named columns must exist in both frames;
    named numeric ones must be numeric there. A column may not be in both lists.
    """
    cat = list(dict.fromkeys(categorical))
    if numeric is None:
        num = [
            c
            for c in reference.columns
            if c in current.columns and c not in cat and _is_numeric(reference[c]) and _is_numeric(current[c])
        ]
    else:
        num = list(dict.fromkeys(numeric))
    both = sorted(set(num) & set(cat))
    if both:
        raise ValueError(f"detect_drift: columns {both} are listed as both numeric and categorical")
    for name, frame in (("reference", reference), ("current", current)):
        absent = [c for c in num + cat if c not in frame.columns]
        if absent:
            raise ValueError(f"detect_drift: {name} frame is missing columns {absent}")
        non_numeric = [c for c in num if not _is_numeric(frame[c])]
        if non_numeric:
            raise ValueError(f"detect_drift: {name} columns {non_numeric} are not numeric; KS needs numbers")
    return num, cat


def _numeric_frame(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` as float64, with +-inf turned into NaN (dropped per column by Evidently)."""
    out = frame[columns].astype("float64")
    return out.replace([np.inf, -np.inf], np.nan)


def _categorical_frame(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` as Python strings, nulls kept as NaN (dropped per column by Evidently)."""
    return pd.DataFrame(
        {c: frame[c].astype(object).where(frame[c].notna(), np.nan).map(str, na_action="ignore") for c in columns},
        index=frame.index,
    )


def _skip_reasons(ref: pd.DataFrame, cur: pd.DataFrame, num: list[str], cat: list[str]) -> dict[str, str]:
    """Columns that cannot be tested, with the reason: a numeric column without a finite
    value in a frame; a categorical column without a value in a frame, or with one value
    in total (the same constant in both frames)."""
    skipped: dict[str, str] = {}
    frames = (("reference", ref), ("current", cur))
    for col in num:
        empty = [name for name, f in frames if not np.isfinite(f[col].to_numpy(dtype="float64")).any()]
        if empty:
            skipped[col] = f"no finite values in {' and '.join(empty)}"
    for col in cat:
        empty = [name for name, f in frames if not f[col].notna().any()]
        if empty:
            skipped[col] = f"no values in {' and '.join(empty)}"
            continue
        values = set(ref[col].dropna()) | set(cur[col].dropna())
        if len(values) < 2:
            skipped[col] = f"constant {next(iter(values))!r} in both frames"
    return skipped


def _scores(snapshot_dict: dict, methods: dict[str, str]) -> dict[str, float]:
    """Drift score of each column from the ``ValueDrift`` metrics of an Evidently snapshot,
    checking that Evidently ran the Evidently-named method in ``methods[column]``."""
    found: dict[str, float] = {}
    for metric in snapshot_dict.get("metrics", []):
        config = metric.get("config", {})
        column = config.get("column")
        if config.get("type", "").endswith(":ValueDrift") and column in methods:
            if config.get("method") != methods[column]:
                raise RuntimeError(
                    f"detect_drift: column {column!r} used {config.get('method')!r}, not {methods[column]!r}"
                )
            found[column] = float(metric["value"])
    missing = [c for c in methods if c not in found]
    if missing:
        raise RuntimeError(f"detect_drift: Evidently returned no ValueDrift result for columns {missing}")
    return found


def _column_result(score: float, method: str, kind: str, threshold: float) -> dict:
    """Per-column entry of :class:`DriftResult`: p-value tests drift below ``threshold``, PSI at or above it."""
    if method == PSI_METHOD:
        return {"p_value": None, "score": score, "drifted": bool(score >= threshold), "method": method, "kind": kind}
    return {"p_value": score, "score": score, "drifted": bool(score < threshold), "method": method, "kind": kind}


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    out_dir: Path,
    numeric: Sequence[str] | None = None,
    categorical: Sequence[str] = (),
    ks_threshold: float = 0.05,
    drift_share: float = 0.3,
    categorical_method: str = CHISQUARE_METHOD,
    categorical_threshold: float = 0.05,
    max_rows: int = 50_000,
    seed: int = 0,
    columns: Sequence[str] | None = None,
) -> DriftResult:
    """Compare ``current`` against ``reference`` column by column with Evidently.

    ``numeric`` columns get the two-sample KS test (forced, also for large samples
    where Evidently would pick Wasserstein); drifted when p < ``ks_threshold``.
    ``numeric=None`` means every numeric column of both frames not listed in
    ``categorical``; ``columns`` is the former name of ``numeric``.
    ``categorical`` columns (values compared as strings) get
    ``categorical_method``: ``"chisquare"``, Pearson's chi-square test of
    homogeneity over the union of the values of both frames (drifted when
    p < ``categorical_threshold``), or ``"psi"``, the Population Stability Index
    ``sum((r - c) * ln(r / c))`` over the value shares, empty shares set to 1e-4
    by Evidently (drifted when PSI >= ``categorical_threshold``; 0.1 and 0.2 are
    the usual "moderate" and "major" shift levels).

    Each frame is first sampled down to ``max_rows`` rows (deterministic for a
    given ``seed``). Nulls are dropped per column. Skipped: numeric columns with
    no finite value in a frame, categorical ones with no value in a frame or a
    single value across both. The result is drifted when drifted columns /
    evaluated columns >= ``drift_share``.

    Writes ``out_dir/drift_report.html`` and ``out_dir/drift_report.json``
    (Evidently's snapshot JSON plus a ``"hyperrec"`` summary), overwriting any
    previous report. Raises ``ValueError`` when no column can be evaluated.
    """
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if not 0.0 < ks_threshold < 1.0:
        raise ValueError(f"ks_threshold must be in (0, 1), got {ks_threshold}")
    if not 0.0 < drift_share <= 1.0:
        raise ValueError(f"drift_share must be in (0, 1], got {drift_share}")
    if categorical_method not in CATEGORICAL_METHODS:
        raise ValueError(f"categorical_method must be one of {CATEGORICAL_METHODS}, got {categorical_method!r}")
    if categorical_method == CHISQUARE_METHOD and not 0.0 < categorical_threshold < 1.0:
        raise ValueError(f"categorical_threshold (a p-value) must be in (0, 1), got {categorical_threshold}")
    if categorical_method == PSI_METHOD and not categorical_threshold > 0.0:
        raise ValueError(f"categorical_threshold (a PSI) must be > 0, got {categorical_threshold}")
    if columns is not None and numeric is not None:
        raise ValueError("detect_drift: pass numeric or its former name columns, not both")
    ref = _sample(reference, max_rows, seed)
    cur = _sample(current, max_rows, seed)
    num, cat = _candidates(ref, cur, numeric if numeric is not None else columns, categorical)
    ref = pd.concat([_numeric_frame(ref, num), _categorical_frame(ref, cat)], axis=1)
    cur = pd.concat([_numeric_frame(cur, num), _categorical_frame(cur, cat)], axis=1)
    skipped = _skip_reasons(ref, cur, num, cat)
    num = [c for c in num if c not in skipped]
    cat = [c for c in cat if c not in skipped]
    if not num and not cat:
        detail = f"; skipped: {skipped}" if skipped else ""
        raise ValueError(
            "detect_drift: no common evaluable columns between reference "
            f"({list(reference.columns)}) and current ({list(current.columns)}){detail}"
        )

    _register_chisquare()
    evaluated = num + cat
    definition = DataDefinition(numerical_columns=num, categorical_columns=cat)
    report = Report(
        [
            DataDriftPreset(
                columns=evaluated,
                num_method=_EVIDENTLY_METHOD[KS_METHOD],
                cat_method=_EVIDENTLY_METHOD[categorical_method],
                num_threshold=ks_threshold,
                cat_threshold=categorical_threshold,
                drift_share=drift_share,
            )
        ]
    )
    snapshot = report.run(
        current_data=Dataset.from_pandas(cur[evaluated], data_definition=definition),
        reference_data=Dataset.from_pandas(ref[evaluated], data_definition=definition),
    )

    method = {c: KS_METHOD for c in num} | {c: categorical_method for c in cat}
    scores = _scores(snapshot.dict(), {c: _EVIDENTLY_METHOD[m] for c, m in method.items()})
    per_column = {c: _column_result(scores[c], KS_METHOD, "numeric", ks_threshold) for c in num} | {
        c: _column_result(scores[c], categorical_method, "categorical", categorical_threshold) for c in cat
    }
    share = sum(v["drifted"] for v in per_column.values()) / len(per_column)
    drifted = share >= drift_share

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out_dir / HTML_NAME, out_dir / JSON_NAME
    snapshot.save_html(str(html_path))
    payload = json.loads(snapshot.json())
    payload["hyperrec"] = {
        "drifted": drifted,
        "share_drifted": share,
        "columns": per_column,
        "skipped_columns": skipped,
        "thresholds": {
            "ks_threshold": ks_threshold,
            "categorical_threshold": categorical_threshold,
            "drift_share": drift_share,
        },
        "methods": {
            "numeric": KS_METHOD,
            "categorical": categorical_method,
            "evidently": {m: _EVIDENTLY_METHOD[m] for m in (KS_METHOD, categorical_method)},
        },
        "rows": {"reference": len(ref), "current": len(cur), "max_rows": max_rows, "seed": seed},
    }
    write_text_atomic(json_path, json.dumps(payload, indent=2))
    return DriftResult(drifted, share, per_column, html_path, json_path)
