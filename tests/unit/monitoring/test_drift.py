"""Evidently drift detection (KS for numeric, chi-square or PSI for categorical columns) and
the drift feature extraction."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy.stats import chi2

from core.settings import DriftSettings
from monitoring.drift import (
    CATEGORICAL_FEATURES,
    DRIFT_FEATURES,
    EVIDENTLY_CHISQUARE,
    NUMERIC_FEATURES,
    DriftResult,
    chisquare_two_sample,
    detect_drift,
    drift_features,
)

N = 3000
DEVICE_SHARES = {"mobile": 0.5, "desktop": 0.3, "tablet": 0.12, "tv": 0.08}


def _features(
    seed: int,
    *,
    dwell_scale: float = 1.0,
    scroll_shift: float = 0.0,
    hour_shift: int = 0,
    devices: dict[str, float] = DEVICE_SHARES,
) -> pd.DataFrame:
    """Synthetic drift-feature frame: lognormal dwell, beta scroll, evening-peaked hour, sparse
    ratings, Poisson items per user, and a device column drawn with ``devices`` shares."""
    rng = np.random.default_rng(seed)
    rated = rng.random(N) < 0.2
    return pd.DataFrame(
        {
            "dwell_time_s": rng.lognormal(3.0, 0.8, N) * dwell_scale,
            "scroll_depth": np.clip(rng.beta(2.0, 3.0, N) + scroll_shift, 0.0, 1.0),
            "hour_of_day": ((np.rint(rng.normal(19.0, 4.0, N)) + hour_shift) % 24).astype(float),
            "rating": np.where(rated, rng.integers(1, 6, N), np.nan).astype(float),
            "items_per_user": rng.poisson(20, N).astype(float),
            "device": rng.choice(list(devices), N, p=list(devices.values())),
        }
    )


def test_same_distribution_is_not_drifted(tmp_path: Path) -> None:
    # Seeds 3 and 4 give no p-value below 0.05; other tests reuse them as the undrifted pair.
    result = detect_drift(_features(3), _features(4), out_dir=tmp_path, categorical=["device"])
    assert isinstance(result, DriftResult)
    assert result.drifted is False
    assert set(result.columns) == {*NUMERIC_FEATURES, "device"}
    assert result.share_drifted == 0.0
    for col, info in result.columns.items():
        assert info["method"] == ("chisquare" if col == "device" else "ks")
        assert info["kind"] == ("categorical" if col == "device" else "numeric")
        assert 0.0 <= info["p_value"] <= 1.0
        assert info["score"] == info["p_value"]
        assert info["drifted"] == (info["p_value"] < 0.05), col


def test_shifted_distribution_is_drifted(tmp_path: Path) -> None:
    current = _features(2, dwell_scale=2.0, scroll_shift=0.2, hour_shift=6)
    result = detect_drift(_features(1), current, out_dir=tmp_path, ks_threshold=0.05)
    assert result.drifted is True
    assert set(result.columns) == set(NUMERIC_FEATURES)  # device is not numeric: not picked by default
    for col in ("dwell_time_s", "scroll_depth", "hour_of_day"):
        assert result.columns[col]["p_value"] < 0.05, col
        assert result.columns[col]["drifted"] is True
    assert result.share_drifted == pytest.approx(3 / 5)


def test_categorical_shift_is_drifted_with_two_sample_chisquare(tmp_path: Path) -> None:
    shifted = {"mobile": 0.4, "desktop": 0.3, "tablet": 0.15, "tv": 0.15}
    result = detect_drift(
        _features(3), _features(4, devices=shifted), out_dir=tmp_path, numeric=["dwell_time_s"], categorical=["device"]
    )
    device = result.columns["device"]
    assert device["method"] == "chisquare" and device["kind"] == "categorical"
    assert device["drifted"] is True and device["p_value"] < 1e-6
    assert result.columns["dwell_time_s"]["drifted"] is False
    assert result.share_drifted == pytest.approx(1 / 2) and result.drifted is True
    payload = json.loads(result.json_path.read_text())
    value_drift = {m["config"]["column"]: m for m in payload["metrics"] if m["config"]["type"].endswith(":ValueDrift")}
    assert value_drift["device"]["config"]["method"] == EVIDENTLY_CHISQUARE
    assert value_drift["device"]["value"] == pytest.approx(device["p_value"])
    assert payload["hyperrec"]["columns"]["device"] == device
    assert payload["hyperrec"]["methods"]["categorical"] == "chisquare"


def test_chisquare_two_sample_is_pearsons_homogeneity_test() -> None:
    reference = pd.Series(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + [None] * 5)
    current = pd.Series(["a"] * 30 + ["b"] * 30 + ["d"] * 10)  # "c" only in reference, "d" only in current
    table = np.array([[50, 30, 20, 0], [30, 30, 0, 10]], dtype=float)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    assert chisquare_two_sample(reference, current) == pytest.approx(chi2.sf(statistic, df=3))
    assert chisquare_two_sample(reference, reference) == pytest.approx(1.0)
    assert chisquare_two_sample(pd.Series(["a", "a"]), pd.Series(["a"])) == 1.0


def test_values_absent_from_one_side_still_compare(tmp_path: Path) -> None:
    reference = pd.DataFrame({"device": ["mobile"] * 300 + ["desktop"] * 200})
    current = pd.DataFrame({"device": ["mobile"] * 290 + ["desktop"] * 200 + ["watch"] * 10})
    result = detect_drift(reference, current, out_dir=tmp_path, categorical=["device"])
    info = result.columns["device"]
    assert 0.0 < info["p_value"] < 0.05
    assert info["p_value"] == pytest.approx(chisquare_two_sample(reference["device"], current["device"]))


def test_psi_scores_categorical_columns(tmp_path: Path) -> None:
    reference = pd.DataFrame({"top_category": ["news"] * 600 + ["sports"] * 400})
    current = pd.DataFrame({"top_category": ["news"] * 400 + ["sports"] * 600})
    psi = (0.6 - 0.4) * np.log(0.6 / 0.4) + (0.4 - 0.6) * np.log(0.4 / 0.6)
    for threshold, drifted in ((0.1, True), (psi + 0.01, False)):
        result = detect_drift(
            reference,
            current,
            out_dir=tmp_path,
            categorical=["top_category"],
            categorical_method="psi",
            categorical_threshold=threshold,
        )
        info = result.columns["top_category"]
        assert info["p_value"] is None and info["method"] == "psi"
        assert info["score"] == pytest.approx(psi)
        assert info["drifted"] is drifted


def test_model_output_columns_next_to_event_features(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    reference, current = _features(3), _features(4)  # not drifted: see the first test
    reference["top_score"], current["top_score"] = rng.normal(0.5, 0.1, N), rng.normal(0.6, 0.1, N)
    reference["top_category"] = rng.choice(["news", "sports", "music"], N, p=[0.5, 0.3, 0.2])
    current["top_category"] = rng.choice(["news", "sports", "music"], N, p=[0.2, 0.3, 0.5])
    result = detect_drift(
        reference,
        current,
        out_dir=tmp_path,
        numeric=["dwell_time_s", "top_score"],
        categorical=["device", "top_category"],
    )
    assert list(result.columns) == ["dwell_time_s", "top_score", "device", "top_category"]
    assert [c for c, v in result.columns.items() if v["drifted"]] == ["top_score", "top_category"]
    assert result.share_drifted == pytest.approx(2 / 4)


def test_reports_written_with_summary(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "run1"
    result = detect_drift(
        _features(1), _features(2, dwell_scale=2.0), out_dir=out, drift_share=0.5, categorical=["device"]
    )
    assert result.html_path == out / "drift_report.html"
    assert result.json_path == out / "drift_report.json"
    assert "<html" in result.html_path.read_text(encoding="utf-8").lower()
    payload = json.loads(result.json_path.read_text())
    assert payload["metrics"], "Evidently's own metrics must be kept"
    value_drift = [m for m in payload["metrics"] if m["config"]["type"].endswith(":ValueDrift")]
    assert {m["config"]["column"]: m["config"]["method"] for m in value_drift} == {
        **{c: "ks" for c in NUMERIC_FEATURES},
        "device": EVIDENTLY_CHISQUARE,
    }
    summary = payload["hyperrec"]
    assert summary["drifted"] is False  # only dwell drifted: 1/6 < 0.5
    assert summary["share_drifted"] == pytest.approx(result.share_drifted) == pytest.approx(1 / 6)
    assert summary["columns"]["dwell_time_s"]["drifted"] is True
    assert summary["thresholds"] == {"ks_threshold": 0.05, "categorical_threshold": 0.05, "drift_share": 0.5}
    assert summary["methods"]["numeric"] == "ks"


def test_large_samples_still_use_ks_and_sampling_is_deterministic(tmp_path: Path) -> None:
    # Above 1000 rows Evidently would default to Wasserstein (numeric) and Jensen-Shannon (categorical).
    ref, cur = _features(1), _features(2, dwell_scale=1.1)
    a = detect_drift(ref, cur, out_dir=tmp_path / "a", max_rows=1500, seed=7, categorical=["device"])
    b = detect_drift(ref, cur, out_dir=tmp_path / "b", max_rows=1500, seed=7, categorical=["device"])
    assert a.columns == b.columns
    assert {info["method"] for info in a.columns.values()} == {"ks", "chisquare"}
    assert json.loads(a.json_path.read_text())["hyperrec"]["rows"]["reference"] == 1500


def test_columns_is_the_former_name_of_numeric(tmp_path: Path) -> None:
    ref, cur = _features(1), _features(2)
    old = detect_drift(ref, cur, out_dir=tmp_path / "old", columns=["dwell_time_s", "rating"])
    new = detect_drift(ref, cur, out_dir=tmp_path / "new", numeric=["dwell_time_s", "rating"])
    assert old.columns == new.columns and list(old.columns) == ["dwell_time_s", "rating"]
    with pytest.raises(ValueError, match="not both"):
        detect_drift(ref, cur, out_dir=tmp_path, columns=["rating"], numeric=["rating"])


def test_categorical_only_when_numeric_is_empty(tmp_path: Path) -> None:
    result = detect_drift(_features(1), _features(2), out_dir=tmp_path, numeric=[], categorical=["device"])
    assert list(result.columns) == ["device"]


def test_all_null_and_constant_columns_are_skipped(tmp_path: Path) -> None:
    ref, cur = _features(1), _features(2)
    ref["rating"] = np.nan
    ref["event_type"], cur["event_type"] = "view", "view"
    ref["category"], cur["category"] = None, "news"
    result = detect_drift(ref, cur, out_dir=tmp_path, categorical=["device", "event_type", "category"])
    assert set(result.columns) == set(NUMERIC_FEATURES) - {"rating"} | {"device"}
    skipped = json.loads(result.json_path.read_text())["hyperrec"]["skipped_columns"]
    assert skipped == {
        "rating": "no finite values in reference",
        "event_type": "constant 'view' in both frames",
        "category": "no values in reference",
    }


def test_bad_arguments_raise(tmp_path: Path) -> None:
    ref = pd.DataFrame({"a": [np.nan, np.nan], "b": ["x", "y"]})
    cur = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "z"]})
    with pytest.raises(ValueError, match="no common evaluable"):
        detect_drift(ref, cur, out_dir=tmp_path)
    with pytest.raises(ValueError, match=r"missing columns \['zzz'\]"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, columns=["dwell_time_s", "zzz"])
    with pytest.raises(ValueError, match=r"missing columns \['zzz'\]"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, categorical=["zzz"])
    with pytest.raises(ValueError, match="not numeric"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, numeric=["device"])
    with pytest.raises(ValueError, match="both numeric and categorical"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, numeric=["rating"], categorical=["rating"])
    with pytest.raises(ValueError, match="categorical_method"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, categorical_method="jensenshannon")
    with pytest.raises(ValueError, match="a p-value"):
        detect_drift(_features(1), _features(2), out_dir=tmp_path, categorical_threshold=1.2)


def _crafted_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u1", "u1", "u3"],
            "item_id": ["i1", "i2", "i3", "i1", "i4"],
            "event_type": ["view", "rate", "click", "rate", None],
            "rating": [None, 4.0, None, 5.0, None],
            "dwell_time_s": [12.5, 3.0, None, 40.0, 1.0],
            "scroll_depth": [0.5, 0.1, 0.9, None, 0.0],
            "device": ["mobile", None, "tv", "mobile", "desktop"],
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


def test_drift_features_on_crafted_frame() -> None:
    interactions = _crafted_interactions()
    items = pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3", "i1"],  # i4 unknown; a repeated id keeps its first row
            "categories": [["news", "tech"], np.array(["sports"]), [], ["music"]],
        }
    )
    feats = drift_features(interactions, items)
    assert list(feats.columns) == [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    assert DRIFT_FEATURES == NUMERIC_FEATURES
    assert len(feats) == len(interactions)
    assert feats["hour_of_day"].tolist() == [0.0, 13.0, 23.0, 7.0, 12.0]
    assert feats["items_per_user"].tolist() == [3.0, 1.0, 3.0, 3.0, 1.0]
    assert feats["dwell_time_s"].tolist()[:2] == [12.5, 3.0]
    assert np.isnan(feats["rating"].iloc[0]) and feats["rating"].iloc[3] == 5.0
    assert all(feats[c].dtype == np.float64 for c in NUMERIC_FEATURES)
    assert feats["device"].tolist() == ["mobile", "unknown", "tv", "mobile", "desktop"]
    assert feats["event_type"].tolist() == ["view", "rate", "click", "rate", "unknown"]
    assert feats["category"].tolist() == ["news", "sports", "none", "news", "none"]
    assert drift_features(interactions)["category"].tolist() == ["none"] * 5


def test_drift_features_rejects_missing_columns() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        drift_features(
            pd.DataFrame({"user_id": ["u1"], "dwell_time_s": [1.0], "scroll_depth": [0.1], "rating": [None]})
        )
    with pytest.raises(ValueError, match="categories"):
        drift_features(_crafted_interactions(), pd.DataFrame({"item_id": ["i1"]}))


def test_drift_settings_categorical_threshold_follows_method() -> None:
    assert DriftSettings().categorical_method == "chisquare"
    assert DriftSettings().categorical_threshold == 0.05
    assert DriftSettings(categorical_method="psi").categorical_threshold == 0.1
    assert DriftSettings(categorical_method="psi", categorical_threshold=0.2).categorical_threshold == 0.2
    with pytest.raises(ValidationError, match="p-value"):
        DriftSettings(categorical_threshold=1.5)
    with pytest.raises(ValidationError, match="categorical_method"):
        DriftSettings(categorical_method="jensenshannon")
