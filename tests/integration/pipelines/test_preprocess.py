"""Spark preprocessing on a synthetic feed with known dirt: every bad row quarantined with
its reason, duplicates removed, every good row kept, and a split without leakage."""

import json
from datetime import UTC, datetime

import pandas as pd
import pytest

from core.datasets.synthetic import generate
from pipelines.preprocess import preprocess

pytestmark = pytest.mark.spark
NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def processed(spark, settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("pre")
    raw = generate(root / "raw", events=6000, seed=3, malformed_fraction=0.03, duplicate_fraction=0.02, progress=False)
    report = preprocess(
        spark, raw.interactions, root / "out", settings.preprocess, users=raw.users, items=raw.items, now=NOW
    )
    manifest = json.loads((raw.ground_truth / "manifest.json").read_text())
    return report, manifest, root / "out"


def test_row_accounting_identity_holds(processed):
    report, manifest, out = processed
    counts = manifest["counts"]
    assert report.in_ == counts["total_rows"]
    assert report.in_ == report.clean + report.quarantined_total + report.duplicates
    assert report.duplicates == counts["duplicates"]
    assert report.clean == counts["good_events"]  # every good row kept
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["in"] == report.in_ and on_disk["clean"] == report.clean


def test_each_malformed_kind_is_quarantined_with_its_reason(processed):
    report, manifest, out = processed
    assert report.quarantined == {k: v for k, v in manifest["counts"]["malformed"].items() if v}
    quarantine = pd.read_parquet(out / "quarantine" / "interactions")
    assert len(quarantine) == report.quarantined_total
    assert quarantine["reason"].notna().all() and quarantine["raw_record"].str.startswith("{").all()


def test_clean_output_obeys_the_contract(processed):
    _, _, out = processed
    clean = pd.read_parquet(out / "clean" / "interactions")
    assert clean["scroll_depth"].between(0, 1).all() and (clean["dwell_time_s"] >= 0).all()
    assert clean["confidence"].between(0, 1, inclusive="right").all()
    rated = clean[clean["event_type"] == "rate"]
    assert (rated["confidence"] == rated["rating"] / 5).all()
    assert clean["session_id"].notna().all()
    assert not clean.duplicated(["user_id", "item_id", "event_type", "timestamp", "session_id"]).any()


def test_temporal_split_has_no_leakage(processed):
    _, _, out = processed
    train, test = pd.read_parquet(out / "split" / "train"), pd.read_parquet(out / "split" / "test")
    assert len(test) > 0
    last_train = train.groupby("user_id")["timestamp"].max()
    first_test = test.groupby("user_id")["timestamp"].min()
    both = first_test.index.intersection(last_train.index)
    assert (first_test[both] >= last_train[both]).all()
    assert set(test["user_id"]) <= set(train["user_id"])  # every test user keeps history


def test_normalization_and_sha256(spark, settings, tmp_path):
    from core.datasets import RawDataset
    from core.schemas import INTERACTIONS, ITEMS, USERS

    t = pd.Timestamp("2026-01-02 10:00", tz="UTC")
    raw = RawDataset(tmp_path / "raw")
    raw.interactions.mkdir(parents=True)
    events = pd.DataFrame(
        {
            "user_id": [" u1 ", "u1", "u1"],
            "item_id": ["i1", "i1", "i2"],
            "event_type": [" Click", "click", "VIEW"],
            "rating": [None, None, None],
            "dwell_time_s": [3.0, 3.0, None],
            "scroll_depth": [0.5, 0.5, 0.2],
            "device": ["Phone", "phone", " Desktop "],
            "session_id": ["s", "s", "s"],
            "timestamp": [t, t, t + pd.Timedelta("1min")],
        }
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        INTERACTIONS.conform(pa.Table.from_pandas(events, preserve_index=False)), raw.interactions / "p.parquet"
    )
    pq.write_table(
        USERS.conform(
            pa.Table.from_pandas(
                pd.DataFrame(
                    {"user_id": ["u1"], "age": [30], "gender": ["f"], "occupation": [" Writer"], "region": ["north"]}
                ),
                preserve_index=False,
            )
        ),
        raw.users,
    )
    pq.write_table(
        ITEMS.conform(
            pa.Table.from_pandas(
                pd.DataFrame(
                    {
                        "item_id": ["i1", "i2"],
                        "title": ["a", "b"],
                        "text": [None, None],
                        "categories": [["x "], ["y"]],
                        "published_at": [None, None],
                    }
                ),
                preserve_index=False,
            )
        ),
        raw.items,
    )
    cfg = settings.preprocess.model_copy(update={"hash_algorithm": "sha256"})
    report = preprocess(spark, raw.interactions, tmp_path / "out", cfg, users=raw.users, items=raw.items, now=NOW)
    assert (report.in_, report.duplicates, report.clean) == (
        3,
        1,
        2,
    )  # " Click"/"click" and " u1 "/"u1" normalize equal
    assert report.imputed == {"dwell_time_s": 1}
    clean = pd.read_parquet(tmp_path / "out" / "clean" / "interactions").sort_values("event_type")
    assert list(clean["event_type"]) == ["click", "view"] and list(clean["device"]) == ["mobile", "desktop"]
    assert list(clean["dwell_time_s"]) == [3.0, 3.0]  # the median of the observed dwell times
