"""The landing zone on a local directory: batches land whole and immutable, named by time,
within a window; bad input is refused with its file and reason; dropped files are claimed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.datasets import RawDataset
from core.schemas import INTERACTIONS
from pipelines.landing import BATCHES, MANIFEST, LandingError, LandingZone, landed_at_of


def events(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [f"u{i % 7}" for i in range(start, start + n)],
            "item_id": [f"i{i % 11}" for i in range(start, start + n)],
            "event_type": "click",
            "timestamp": pd.date_range("2026-11-01", periods=n, freq="min", tz="UTC"),
            "event_id": [f"e{i}" for i in range(start, start + n)],
        }
    )


def write(frame: pd.DataFrame, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


def test_a_file_lands_as_one_named_batch_that_reads_back_as_a_raw_dataset(tmp_path):
    zone = LandingZone(str(tmp_path / "landing"))
    write(events(50), tmp_path / "in" / "events.parquet")
    batch = zone.land(tmp_path / "in" / "events.parquet")
    assert batch.rows == 50 and batch.source == "land"
    assert abs((landed_at_of(batch.name) - datetime.now(UTC)).total_seconds()) < 60
    dataset = zone.raw_dataset(batch, tmp_path / "stage")
    landed = pd.read_parquet(dataset.interactions)
    assert sorted(landed["event_id"]) == sorted(events(50)["event_id"])
    assert pq.read_table(dataset.users).num_rows == 0  # the batch brings no users
    assert [b.name for b in zone.batches()] == [batch.name]
    assert zone.batch(batch.name).rows == 50


def test_a_raw_dataset_directory_lands_with_its_users_and_items(tmp_path):
    source = RawDataset(tmp_path / "gen")
    write(events(20), source.interactions / "part-00000.parquet")
    write(events(5, 20), source.interactions / "part-00001.parquet")
    write(pd.DataFrame({"user_id": ["u1", "u2"], "age": [30, 40]}), source.users)
    write(pd.DataFrame({"item_id": ["i1"], "title": ["one"]}), source.items)
    zone = LandingZone(str(tmp_path / "landing"))
    batch = zone.land(source.root)
    assert batch.rows == 25
    landed = zone.raw_dataset(batch, tmp_path / "stage")
    assert pq.read_table(landed.users).column("user_id").to_pylist() == ["u1", "u2"]
    assert len(list(landed.interactions.glob("*.parquet"))) == 2


def test_batches_sort_by_landing_time_and_the_window_keeps_recent_ones(tmp_path):
    zone = LandingZone(str(tmp_path / "landing"))
    write(events(3), tmp_path / "e.parquet")
    now = datetime.now(UTC)
    old = zone.land(tmp_path / "e.parquet", now=now - timedelta(days=100))
    recent = zone.land(tmp_path / "e.parquet", now=now - timedelta(days=2))
    newest = zone.land(tmp_path / "e.parquet", now=now)
    assert [b.name for b in zone.batches()] == [old.name, recent.name, newest.name]
    assert [b.name for b in zone.batches(window_days=90, now=now)] == [recent.name, newest.name]


def test_an_unfinished_batch_is_invisible(tmp_path):
    zone = LandingZone(str(tmp_path / "landing"))
    write(events(3), tmp_path / "e.parquet")
    batch = zone.land(tmp_path / "e.parquet")
    (tmp_path / "landing" / BATCHES / batch.name / MANIFEST).unlink()  # as if the write had stopped
    assert zone.batches() == []


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("events.csv", "user_id,item_id\n1,2\n", "only Parquet files land"),
        ("events.parquet", "not parquet", "not a readable Parquet file"),
        ("events.parquet", None, "missing required interaction columns \\['event_type', 'timestamp'\\]"),
    ],
)
def test_bad_input_is_refused_naming_the_file_and_nothing_lands(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        write(pd.DataFrame({"user_id": ["u"], "item_id": ["i"]}), path)
    else:
        path.write_text(content)
    zone = LandingZone(str(tmp_path / "landing"))
    with pytest.raises(LandingError, match=message) as raised:
        zone.land(path)
    assert str(path) in str(raised.value)
    assert zone.batches() == []


def test_dropped_entries_are_claimed_and_a_bad_one_stays_reported(tmp_path):
    landing = tmp_path / "landing"
    write(events(4), landing / "incoming" / "good.parquet")
    write(events(6), landing / "incoming" / "day" / "part-0.parquet")
    (landing / "incoming" / "bad.parquet").write_text("junk")
    zone = LandingZone(str(landing))
    with pytest.raises(LandingError, match="1 dropped entry not landed: .*bad.parquet"):
        zone.claim_dropped()
    assert sorted(b.rows for b in zone.batches()) == [4, 6]
    assert {b.source for b in zone.batches()} == {"dropped"}
    assert sorted(p.name for p in (landing / "incoming").iterdir()) == ["bad.parquet"]


def test_events_land_conformed_with_their_event_ids(tmp_path):
    zone = LandingZone(str(tmp_path / "landing"))
    batch = zone.land_events(pa.Table.from_pandas(events(9), preserve_index=False), origin="stream")
    table = pq.read_table(zone.raw_dataset(batch, tmp_path).interactions)
    assert table.schema.names == INTERACTIONS.names
    assert table.column("event_id").to_pylist() == [f"e{i}" for i in range(9)]
    assert batch.source == "consumer"
