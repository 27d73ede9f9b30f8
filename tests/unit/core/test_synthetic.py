"""The synthetic generator: reproducibility, contracts, row accounting, signal and drift."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import ks_2samp

from core.datasets import RawDataset
from core.datasets.synthetic import MALFORMED_KINDS, RAW_INTERACTIONS_SCHEMA, TOPIC_WORDS, TOPICS, generate
from core.schemas import DEVICES, EVENT_TYPES, INTERACTIONS, ITEMS, USERS

START = datetime(2026, 1, 1, tzinfo=UTC)
DAYS = 30
N = 12_000


def _gen(root: Path, **kwargs) -> RawDataset:
    kwargs.setdefault("events", N)
    return generate(root, progress=False, **kwargs)


def _events(ds: RawDataset) -> pd.DataFrame:
    return pq.read_table(ds.interactions).to_pandas()


def _manifest(ds: RawDataset) -> dict:
    return json.loads((ds.ground_truth / "manifest.json").read_text())


def _files(ds: RawDataset) -> dict[str, bytes]:
    return {str(p.relative_to(ds.root)): p.read_bytes() for p in sorted(ds.root.rglob("*")) if p.is_file()}


def _defects(df: pd.DataFrame, users: set[str], items: set[str]) -> pd.DataFrame:
    """One boolean column per malformed kind, computed from the data alone."""
    end = pd.Timestamp(START + timedelta(days=DAYS))
    return pd.DataFrame(
        {
            "missing_user_id": df.user_id.isna(),
            "missing_item_id": df.item_id.isna(),
            "unknown_event_type": ~df.event_type.isin(EVENT_TYPES),
            "rating_out_of_range": df.rating.notna() & ~df.rating.between(1.0, 5.0),
            "scroll_depth_out_of_range": ~df.scroll_depth.between(0.0, 1.0),
            "negative_dwell_time": df.dwell_time_s < 0,
            "future_timestamp": df.timestamp >= end,
            "unknown_user": df.user_id.notna() & ~df.user_id.isin(users),
            "unknown_item": df.item_id.notna() & ~df.item_id.isin(items),
        }
    )


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    """Two generator blocks (BLOCK = 16384) with malformed rows and duplicates."""
    return _gen(
        tmp_path_factory.mktemp("dirty"), events=20_000, seed=7, malformed_fraction=0.02, duplicate_fraction=0.03
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    return _gen(tmp_path_factory.mktemp("clean"), seed=1)


def test_same_arguments_give_byte_identical_files(dirty: RawDataset, tmp_path: Path) -> None:
    again = _gen(tmp_path / "again", events=20_000, seed=7, malformed_fraction=0.02, duplicate_fraction=0.03)
    assert _files(again) == _files(dirty)
    other = _gen(tmp_path / "other", events=20_000, seed=8, malformed_fraction=0.02, duplicate_fraction=0.03)
    assert not _events(other).equals(_events(dirty))
    assert not pq.read_table(other.users).equals(pq.read_table(dirty.users))


def test_rerun_into_the_same_directory_replaces_the_output(tmp_path: Path) -> None:
    _gen(tmp_path, events=3_000, chunk_size=500)
    ds = _gen(tmp_path, events=2_000, chunk_size=100_000)
    assert sorted(p.name for p in ds.interactions.iterdir()) == ["part-00000.parquet"]
    assert pq.read_table(ds.interactions).num_rows == 2_000


def test_files_conform_to_the_data_contracts(clean: RawDataset) -> None:
    table = pq.read_table(clean.interactions)
    assert table.schema == RAW_INTERACTIONS_SCHEMA
    assert INTERACTIONS.conform(table).num_rows == N  # no nulls in required columns
    assert pq.read_table(clean.users).schema == USERS.arrow()
    assert pq.read_table(clean.items).schema == ITEMS.arrow()

    df = table.to_pandas()
    users = pq.read_table(clean.users).to_pandas()
    items = pq.read_table(clean.items).to_pandas()
    assert len(users) == max(50, N // 50) and len(items) == max(50, N // 100)
    assert users.user_id.str.fullmatch(r"u\d{6}").all() and users.user_id.is_unique
    assert set(df.user_id) <= set(users.user_id) and set(df.item_id) <= set(items.item_id)
    assert set(df.event_type) == set(EVENT_TYPES)
    assert set(df.device) == set(DEVICES)
    rated = df.event_type == "rate"
    assert df.rating[~rated].isna().all()
    assert df.rating[rated].between(1, 5).all() and (df.rating[rated] % 1 == 0).all()
    assert (df.dwell_time_s >= 0).all() and df.scroll_depth.between(0, 1).all()
    assert df.session_id.notna().all()
    assert df.timestamp.min() >= pd.Timestamp(START) and df.timestamp.max() < pd.Timestamp(START + timedelta(days=DAYS))
    assert items.published_at.max() < df.timestamp.min()
    assert items.categories.map(lambda c: 1 <= len(c) <= 2 and set(c) <= set(TOPICS)).all()
    # A generated session belongs to one user.
    assert (df.groupby("session_id").user_id.nunique() == 1).all()
    # No accidental duplicates among good rows (the preprocessing dedup key).
    assert not df.duplicated(list(INTERACTIONS.key)).any()


def test_item_text_reflects_its_topic(clean: RawDataset) -> None:
    items = pq.read_table(clean.items).to_pandas()
    for _, item in items.iterrows():
        words = item.text.lower().rstrip(".").split()
        main = item.categories[0]
        on_topic = sum(w in TOPIC_WORDS[main] for w in words) / len(words)
        assert on_topic > 0.4, f"item {item.item_id}: {on_topic:.2f} of its words are {main} words"
        assert any(w in TOPIC_WORDS[main] for w in item.title.lower().split())


def test_manifest_counts_match_the_files(dirty: RawDataset) -> None:
    manifest = _manifest(dirty)
    counts = manifest["counts"]
    df = _events(dirty)
    assert len(df) == counts["total_rows"] == counts["good_events"] + counts["malformed_total"] + counts["duplicates"]
    assert counts["good_events"] == 20_000
    assert counts["malformed_total"] == round(0.02 * 20_000) == sum(counts["malformed"].values())
    assert counts["duplicates"] == round(0.03 * 20_000)
    assert manifest["parameters"]["seed"] == 7
    assert sorted(manifest["parts"]) == sorted(p.name for p in dirty.interactions.glob("part-*.parquet"))

    users = set(pq.read_table(dirty.users).column("user_id").to_pylist())
    items = set(pq.read_table(dirty.items).column("item_id").to_pylist())
    defects = _defects(df, users, items)
    assert defects.sum(axis=1).max() == 1, "a malformed row should be broken in exactly one way"
    assert defects.sum().to_dict() == counts["malformed"]
    assert list(counts["malformed"]) == list(MALFORMED_KINDS)
    per_kind = np.array(list(counts["malformed"].values()))
    assert per_kind.min() > 0 and per_kind.max() - per_kind.min() <= 1  # kinds are cycled
    assert set(df.event_type[defects.unknown_event_type]) == {"hover"}
    assert set(df.rating[defects.rating_out_of_range]) == {0.0, 7.0}
    assert (df.timestamp[defects.future_timestamp].dt.year == 2100).all()

    good = df[~defects.any(axis=1)]
    assert len(good) == counts["good_events"] + counts["duplicates"]
    assert good.duplicated(keep="first").sum() == counts["duplicates"]


def test_chunk_size_changes_row_groups_not_rows(dirty: RawDataset, tmp_path: Path) -> None:
    small = _gen(tmp_path, events=20_000, seed=7, malformed_fraction=0.02, duplicate_fraction=0.03, chunk_size=3_000)
    assert pq.read_table(small.interactions).equals(pq.read_table(dirty.interactions))
    meta = pq.ParquetFile(small.interactions / "part-00000.parquet").metadata
    total = _manifest(small)["counts"]["total_rows"]
    assert meta.num_row_groups == -(-total // 3_000)
    assert max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) == 3_000
    assert pq.ParquetFile(dirty.interactions / "part-00000.parquet").metadata.num_row_groups == 1


def test_user_topic_histograms_identify_the_latent_group(clean: RawDataset) -> None:
    df = _events(clean)
    truth_items = pq.read_table(clean.ground_truth / "items.parquet").to_pandas()
    truth_users = pq.read_table(clean.ground_truth / "users.parquet").to_pandas().set_index("user_id")
    df = df.merge(truth_items[["item_id", "topic"]], on="item_id")
    hist = pd.crosstab(df.user_id, df.topic)
    hist = hist[hist.sum(axis=1) >= 10]
    share = hist.div(hist.sum(axis=1), axis=0).to_numpy()
    group = truth_users.loc[hist.index, "group"].to_numpy()
    assert len(hist) > 100
    centroids = np.vstack([share[group == g].mean(axis=0) for g in range(4)])
    predicted = np.argmin(((share[:, None, :] - centroids[None]) ** 2).sum(axis=2), axis=1)
    assert (predicted == group).mean() > 0.9
    # The ground-truth preference vectors agree with the observed behaviour.
    prefs = truth_users.loc[hist.index, [f"pref_{t}" for t in hist.columns]].to_numpy()
    assert (prefs.argmax(axis=1) == share.argmax(axis=1)).mean() > 0.7


def test_demographics_carry_group_signal(clean: RawDataset) -> None:
    users = pq.read_table(clean.users).to_pandas()
    users["group"] = pq.read_table(clean.ground_truth / "users.parquet").column("group").to_numpy()
    age = users.groupby("group").age.mean()
    assert age.max() - age.min() > 20
    occupation = pd.crosstab(users.group, users.occupation, normalize="index")
    assert (occupation.max(axis=0) - occupation.min(axis=0)).max() > 0.3


def _hours(df: pd.DataFrame) -> np.ndarray:
    return df.timestamp.dt.hour.to_numpy()


def _mean_true_pref(ds: RawDataset) -> float:
    """Mean ground-truth preference of each event's user for the event's item topic."""
    df = _events(ds)
    topic = pq.read_table(ds.ground_truth / "items.parquet").to_pandas().set_index("item_id").topic
    prefs = pq.read_table(ds.ground_truth / "users.parquet").to_pandas().set_index("user_id")
    cols = prefs.columns.get_indexer([f"pref_{t}" for t in topic.loc[df.item_id]])
    return float(prefs.to_numpy()[prefs.index.get_indexer(df.user_id), cols].mean())


def test_drift_zero_matches_across_seeds_and_drift_half_shifts(clean: RawDataset, tmp_path: Path) -> None:
    base = _events(clean)
    same = _events(_gen(tmp_path / "seed2", seed=2))
    drifted_ds = _gen(tmp_path / "drift", seed=2, drift=0.5)
    drifted = _events(drifted_ds)
    assert _manifest(drifted_ds)["parameters"]["drift"] == 0.5
    for column in ("dwell_time_s", "scroll_depth"):
        assert ks_2samp(base[column], same[column]).pvalue > 0.01, column
        assert ks_2samp(base[column], drifted[column]).pvalue < 1e-6, column
    assert ks_2samp(_hours(base), _hours(same)).pvalue > 0.01
    assert ks_2samp(_hours(base), _hours(drifted)).pvalue < 1e-6

    assert drifted.dwell_time_s.mean() > 1.2 * base.dwell_time_s.mean()
    assert drifted.scroll_depth.mean() < 0.85 * base.scroll_depth.mean()
    big_screens = lambda df: df.device.isin(["tablet", "tv"]).mean()  # noqa: E731
    assert big_screens(drifted) > big_screens(base) + 0.1
    assert abs(big_screens(same) - big_screens(base)) < 0.03
    # Preferences rotate away from the users' original tastes.
    assert _mean_true_pref(drifted_ds) < 0.7 * _mean_true_pref(clean)
    assert abs(_mean_true_pref(clean) - _mean_true_pref(RawDataset(tmp_path / "seed2"))) < 0.02


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"events": 0}, "events"),
        ({"drift": 1.5}, "drift"),
        ({"malformed_fraction": -0.1}, "malformed_fraction"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_name_the_parameter(tmp_path: Path, kwargs: dict, name: str) -> None:
    args = {"events": 100, **kwargs}
    with pytest.raises(ValueError, match=name):
        generate(tmp_path, progress=False, **args)
