"""Feature drift detection with Evidently's two-sample Kolmogorov-Smirnov test.

A column is *drifted* when the KS p-value of its reference vs current values is
below ``ks_threshold``; the dataset is drifted when the share of drifted
columns among the evaluated ones reaches ``drift_share``. Evidently's report is
kept as HTML and JSON next to a ``"hyperrec"`` summary block.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

DRIFT_FEATURES: tuple[str, ...] = ("dwell_time_s", "scroll_depth", "hour_of_day", "rating", "items_per_user")

KS_METHOD = "ks"
HTML_NAME = "drift_report.html"
JSON_NAME = "drift_report.json"

_SOURCE_COLUMNS: tuple[str, ...] = ("user_id", "dwell_time_s", "scroll_depth", "rating", "timestamp")


@dataclass
class DriftResult:
    """Outcome of one drift check.

    ``drifted`` is ``share_drifted >= drift_share``; ``share_drifted`` is the
    number of drifted columns divided by the number of evaluated columns;
    ``columns`` maps each evaluated column to
    ``{"p_value": float, "drifted": bool, "method": "ks"}``.
    """

    drifted: bool
    share_drifted: float
    columns: dict[str, dict]
    html_path: Path
    json_path: Path


def drift_features(interactions: pd.DataFrame) -> pd.DataFrame:
    """Event-level numeric frame for drift checks from an INTERACTIONS-schema frame.

    One row per event with float columns in ``DRIFT_FEATURES`` order:
    ``dwell_time_s``, ``scroll_depth``, ``rating`` (copied, nulls kept),
    ``hour_of_day`` (UTC hour 0-23 of ``timestamp``; naive timestamps are read
    as UTC) and ``items_per_user`` (number of events of that event's user in
    ``interactions``). Columns that are entirely null in both frames are left
    out by :func:`detect_drift`.
    """
    missing = [c for c in _SOURCE_COLUMNS if c not in interactions.columns]
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
    )
    return features[list(DRIFT_FEATURES)].astype("float64")


def _sample(frame: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    """At most ``max_rows`` rows of ``frame``, drawn without replacement with ``seed``."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    if len(frame) <= max_rows:
        return frame
    return frame.sample(n=max_rows, random_state=seed).sort_index()


def _select_columns(
    reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """Columns to test, and the skipped ones with the reason.

    ``columns=None`` means every numeric column present in both frames.
    Explicitly named columns must exist in both frames and be numeric.
    A column that is entirely null (or infinite) in either frame is skipped.
    """
    if columns is None:
        candidates = [
            c
            for c in reference.columns
            if c in current.columns
            and pd.api.types.is_numeric_dtype(reference[c])
            and pd.api.types.is_numeric_dtype(current[c])
            and not pd.api.types.is_bool_dtype(reference[c])
        ]
    else:
        candidates = list(dict.fromkeys(columns))
        for name, frame in (("reference", reference), ("current", current)):
            absent = [c for c in candidates if c not in frame.columns]
            if absent:
                raise ValueError(f"detect_drift: {name} frame is missing columns {absent}")
            non_numeric = [c for c in candidates if not pd.api.types.is_numeric_dtype(frame[c])]
            if non_numeric:
                raise ValueError(f"detect_drift: {name} columns {non_numeric} are not numeric; KS needs numbers")
    evaluable: list[str] = []
    skipped: dict[str, str] = {}
    for col in candidates:
        empty = [
            name
            for name, frame in (("reference", reference), ("current", current))
            if not np.isfinite(frame[col].to_numpy(dtype="float64", na_value=np.nan)).any()
        ]
        if empty:
            skipped[col] = f"no finite values in {' and '.join(empty)}"
        else:
            evaluable.append(col)
    return evaluable, skipped


def _numeric_frame(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``columns`` of ``frame`` as float64, with +-inf turned into NaN (dropped per column by Evidently)."""
    out = frame[columns].astype("float64")
    return out.replace([np.inf, -np.inf], np.nan)


def _p_values(snapshot_dict: dict, columns: list[str]) -> dict[str, float]:
    """KS p-value of each column from the ``ValueDrift`` metrics of an Evidently snapshot."""
    found: dict[str, float] = {}
    for metric in snapshot_dict.get("metrics", []):
        config = metric.get("config", {})
        if config.get("type", "").endswith(":ValueDrift") and config.get("column") in columns:
            if config.get("method") != KS_METHOD:
                raise RuntimeError(f"detect_drift: column {config['column']!r} used {config.get('method')!r}, not KS")
            found[config["column"]] = float(metric["value"])
    missing = [c for c in columns if c not in found]
    if missing:
        raise RuntimeError(f"detect_drift: Evidently returned no ValueDrift result for columns {missing}")
    return found


def detect_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    out_dir: Path,
    ks_threshold: float = 0.05,
    drift_share: float = 0.3,
    columns: Sequence[str] | None = None,
    max_rows: int = 50_000,
    seed: int = 0,
) -> DriftResult:
    """Compare ``current`` against ``reference`` column by column with Evidently's KS test.

    Each frame is first sampled down to ``max_rows`` rows (deterministic for a
    given ``seed``). KS is forced for every column, also for large samples
    where Evidently would pick Wasserstein. NaNs are dropped per column;
    columns with no finite value in either frame are skipped. A column is
    drifted when its p-value < ``ks_threshold``; the result is drifted when
    drifted columns / evaluated columns >= ``drift_share``.

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
    ref = _sample(reference, max_rows, seed)
    cur = _sample(current, max_rows, seed)
    evaluable, skipped = _select_columns(ref, cur, columns)
    if not evaluable:
        detail = f"; skipped: {skipped}" if skipped else ""
        raise ValueError(
            "detect_drift: no common evaluable numeric columns between reference "
            f"({list(reference.columns)}) and current ({list(current.columns)}){detail}"
        )

    definition = DataDefinition(numerical_columns=evaluable)
    report = Report(
        [DataDriftPreset(columns=evaluable, method=KS_METHOD, threshold=ks_threshold, drift_share=drift_share)]
    )
    snapshot = report.run(
        current_data=Dataset.from_pandas(_numeric_frame(cur, evaluable), data_definition=definition),
        reference_data=Dataset.from_pandas(_numeric_frame(ref, evaluable), data_definition=definition),
    )

    p_values = _p_values(snapshot.dict(), evaluable)
    per_column = {
        c: {"p_value": p_values[c], "drifted": bool(p_values[c] < ks_threshold), "method": KS_METHOD} for c in evaluable
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
        "thresholds": {"ks_threshold": ks_threshold, "drift_share": drift_share},
        "rows": {"reference": len(ref), "current": len(cur), "max_rows": max_rows, "seed": seed},
    }
    json_path.write_text(json.dumps(payload, indent=2))
    return DriftResult(drifted, share, per_column, html_path, json_path)
