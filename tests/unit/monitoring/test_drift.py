"""Evidently KS drift detection, drift feature extraction and the retrain trigger."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from monitoring.drift import DRIFT_FEATURES, DriftResult, detect_drift, drift_features
from monitoring.trigger import should_retrain

N = 3000


def _features(seed: int, *, dwell_scale: float = 1.0, scroll_shift: float = 0.0, hour_shift: int = 0) -> pd.DataFrame:
    """Synthetic drift-feature frame: lognormal dwell, beta scroll, evening-peaked hour, sparse ratings."""
    rng = np.random.default_rng(seed)
    rated = rng.random(N) < 0.2
    return pd.DataFrame(
        {
            "dwell_time_s": rng.lognormal(3.0, 0.8, N) * dwell_scale,
            "scroll_depth": np.clip(rng.beta(2.0, 3.0, N) + scroll_shift, 0.0, 1.0),
            "hour_of_day": ((np.rint(rng.normal(19.0, 4.0, N)) + hour_shift) % 24).astype(float),
            "rating": np.where(rated, rng.integers(1, 6, N), np.nan).astype(float),
            "items_per_user": rng.poisson(20, N).astype(float),
        }
    )


def test_same_distribution_is_not_drifted(tmp_path: Path) -> None:
    result = detect_drift(_features(3), _features(4), out_dir=tmp_path)
    assert isinstance(result, DriftResult)
    assert result.drifted is False
    assert set(result.columns) == set(DRIFT_FEATURES)
    assert result.share_drifted == 0.0
    for col, info in result.columns.items():
        assert info["method"] == "ks"
        assert 0.0 <= info["p_value"] <= 1.0
        assert info["drifted"] == (info["p_value"] < 0.05), col
    assert should_retrain(result) is False


def test_shifted_distribution_is_drifted(tmp_path: Path) -> None:
    current = _features(2, dwell_scale=2.0, scroll_shift=0.2, hour_shift=6)
    result = detect_drift(_features(1), current, out_dir=tmp_path, ks_threshold=0.05)
    assert result.drifted is True
    for col in ("dwell_time_s", "scroll_depth", "hour_of_day"):
        assert result.columns[col]["p_value"] < 0.05, col
        assert result.columns[col]["drifted"] is True
    assert result.share_drifted == pytest.approx(3 / 5)
    assert should_retrain(result) is True


def test_reports_written_with_summary(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "run1"
    result = detect_drift(_features(1), _features(2, dwell_scale=2.0), out_dir=out, drift_share=0.5)
    assert result.html_path == out / "drift_report.html"
    assert result.json_path == out / "drift_report.json"
    assert "<html" in result.html_path.read_text(encoding="utf-8").lower()
    payload = json.loads(result.json_path.read_text())
    assert payload["metrics"], "Evidently's own metrics must be kept"
    value_drift = [m for m in payload["metrics"] if m["config"]["type"].endswith(":ValueDrift")]
    assert {m["config"]["column"] for m in value_drift} == set(DRIFT_FEATURES)
    assert all(m["config"]["method"] == "ks" for m in value_drift)
    summary = payload["hyperrec"]
    assert summary["drifted"] is False  # only dwell drifted: 1/5 < 0.5
    assert summary["share_drifted"] == pytest.approx(result.share_drifted) == pytest.approx(1 / 5)
    assert summary["columns"]["dwell_time_s"]["drifted"] is True
    assert summary["thresholds"] == {"ks_threshold": 0.05, "drift_share": 0.5}


def test_large_samples_still_use_ks_and_sampling_is_deterministic(tmp_path: Path) -> None:
    # Above 1000 rows Evidently would default to Wasserstein distance for numeric columns.
    ref, cur = _features(1), _features(2, dwell_scale=1.1)
    a = detect_drift(ref, cur, out_dir=tmp_path / "a", max_rows=1500, seed=7)
    b = detect_drift(ref, cur, out_dir=tmp_path / "b", max_rows=1500, seed=7)
    assert a.columns == b.columns
    assert all(info["method"] == "ks" for info in a.columns.values())
    assert json.loads(a.json_path.read_text())["hyperrec"]["rows"]["reference"] == 1500


def test_all_null_column_is_skipped(tmp_path: Path) -> None:
    ref, cur = _features(1), _features(2)
    ref["rating"] = np.nan
    result = detect_drift(ref, cur, out_dir=tmp_path)
    assert "rating" not in result.columns
    assert set(result.columns) == set(DRIFT_FEATURES) - {"rating"}
    assert "rating" in json.loads(result.json_path.read_text())["hyperrec"]["skipped_columns"]


def test_no_evaluable_columns_raises(tmp_path: Path) -> None:
    ref = pd.DataFrame({"a": [np.nan, np.nan], "b": ["x", "y"]})
    cur = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "z"]})
    with pytest.raises(ValueError, match="no common evaluable"):
        detect_drift(ref, cur, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"missing columns \['zzz'\]"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, columns=["dwell_time_s", "zzz"])


def test_drift_features_on_crafted_frame() -> None:
    interactions = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u1", "u3"],
            "item_id": ["i1", "i2", "i3", "i1", "i4"],
            "event_type": ["view", "rate", "click", "rate", "view"],
            "rating": [None, 4.0, None, 5.0, None],
            "dwell_time_s": [12.5, 3.0, None, 40.0, 1.0],
            "scroll_depth": [0.5, 0.1, 0.9, None, 0.0],
            "device": ["mobile"] * 5,
            "session_id": ["s1", "s2", "s1", "s3", "s4"],
            "timestamp": pd.to_datetime(
                [
                    "2024-03-01T00:15:00Z",
                    "2024-03-01T13:59:59Z",
                    "2024-03-02T23:00:00Z",
                    # 09:30 at UTC+02:00 is 07:30 UTC
                    "2024-03-03T09:30:00+02:00",
                    "2024-03-03T12:00:00Z",
                ],
                utc=True,
            ),
        }
    )
    feats = drift_features(interactions)
    assert list(feats.columns) == list(DRIFT_FEATURES)
    assert len(feats) == len(interactions)
    assert feats["hour_of_day"].tolist() == [0.0, 13.0, 23.0, 7.0, 12.0]
    assert feats["items_per_user"].tolist() == [3.0, 1.0, 3.0, 3.0, 1.0]
    assert feats["dwell_time_s"].tolist()[:2] == [12.5, 3.0]
    assert np.isnan(feats["rating"].iloc[0]) and feats["rating"].iloc[3] == 5.0
    assert all(dtype == np.float64 for dtype in feats.dtypes)


def test_drift_features_rejects_missing_columns() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        drift_features(
            pd.DataFrame({"user_id": ["u1"], "dwell_time_s": [1.0], "scroll_depth": [0.1], "rating": [None]})
        )


def test_should_retrain_follows_drifted(tmp_path: Path) -> None:
    def result(drifted: bool) -> DriftResult:
        return DriftResult(drifted, 1.0 if drifted else 0.0, {}, tmp_path / "r.html", tmp_path / "r.json")

    assert should_retrain(result(True)) is True
    assert should_retrain(result(False)) is False
