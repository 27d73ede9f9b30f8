"""Online/offline parity: the online store serves exactly the offline snapshot's values."""

import numpy as np
import pandas as pd
import pytest

from core.datasets.synthetic import generate
from feature_store.definitions import USER_FEATURES
from feature_store.offline import read_offline_snapshot, write_offline_snapshot
from feature_store.online import OnlineStore
from feature_store.profiles import build_user_profiles

VERSION = "parity-run"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    raw = generate(root, events=3000, seed=3, progress=False)
    interactions = pd.read_parquet(raw.interactions)
    if "confidence" not in interactions.columns:
        # A non-trivial confidence in (0, 1] so the weighted features are exercised.
        interactions["confidence"] = np.where(
            interactions["event_type"] == "rate", interactions["rating"].fillna(5.0) / 5.0, 0.5
        )
    return interactions, pd.read_parquet(raw.items), pd.read_parquet(raw.users)


def test_online_values_equal_the_offline_snapshot(tmp_path, dataset):
    interactions, items, users = dataset
    as_of = pd.Timestamp(interactions["timestamp"].max())
    profiles = build_user_profiles(interactions, items, users, as_of=as_of, half_life_days=14.0)
    write_offline_snapshot(profiles, tmp_path / "offline", as_of)
    offline = read_offline_snapshot(tmp_path / "offline").set_index("user_id")
    assert len(offline) >= 50 and offline.shape[1] > 30

    with OnlineStore(None, data_dir=tmp_path / "online") as store:
        assert store.materialize(profiles, version=VERSION) == len(profiles)
        sample = np.random.default_rng(7).choice(offline.index.to_numpy(), size=50, replace=False)
        online = {user: store.get_user(str(user)) for user in sample}

    int_columns = {c for c in offline.columns if offline[c].dtype == np.int64}
    assert {"events_1d", "events_7d", "events_30d", "clicks_30d", "events_total"} <= int_columns
    assert any(c.startswith("cat_") for c in offline.columns) and any(c.startswith("gender_") for c in offline.columns)
    mismatches = []
    for user in sample:
        got, want = online[user], offline.loc[user]
        assert got is not None, user
        assert got.pop("_version") == VERSION
        assert set(got) == set(offline.columns), user
        for column, value in want.items():
            if column in int_columns:
                ok = float(got[column]).is_integer() and int(got[column]) == int(value)
            else:
                ok = abs(got[column] - float(value)) <= 1e-9
            if not ok:
                mismatches.append((user, column, got[column], value))
    assert not mismatches, mismatches[:5]
    # The sample is not trivially all zeros: parity is checked on real values.
    assert offline.loc[sample, "decayed_activity"].gt(0).sum() > 25


def test_definitions_cover_every_offline_column(dataset):
    interactions, items, users = dataset
    profiles = build_user_profiles(
        interactions, items, users, as_of=interactions["timestamp"].max(), half_life_days=14.0
    )
    plain = {d.name for d in USER_FEATURES if not d.is_family}
    prefixes = tuple(d.template.split("{")[0] for d in USER_FEATURES if d.is_family)
    for column in profiles.columns.drop("user_id"):
        assert column in plain or column.startswith(prefixes), column
