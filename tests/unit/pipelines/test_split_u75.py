"""Protocol u75 split and the split fingerprint, on ml-100k and on small hand-made frames."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from core.datasets.movielens import read_ratings
from core.settings import load_settings
from pipelines.split import U75_SEED, split_fingerprint, u75_split, u75_train_size

ML = load_settings().data_dir / "ml-100k"
ML_100K_U75_FINGERPRINT = "a29e96aa82063170"


@pytest.fixture(scope="module")
def ml_ratings() -> pd.DataFrame:
    return read_ratings(ML)


@pytest.fixture(scope="module")
def ml_split(ml_ratings) -> tuple[pd.DataFrame, pd.DataFrame]:
    return u75_split(ml_ratings)


def _frame(users: list[int]) -> pd.DataFrame:
    n = len(users)
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": list(range(100, 100 + n)),
            "rating": [3] * n,
            "timestamp": list(range(1000, 1000 + n)),
            "source": ["hand"] * n,
        }
    )


def test_ml100k_fingerprint_is_the_published_one(ml_split):
    _, test = ml_split
    assert split_fingerprint(test) == ML_100K_U75_FINGERPRINT


def test_fingerprint_is_the_same_for_string_ids(ml_split):
    _, test = ml_split
    as_text = test.assign(user_id=test["user_id"].astype(str), item_id=test["item_id"].astype(str))
    assert split_fingerprint(as_text) == ML_100K_U75_FINGERPRINT


def test_train_size_per_user_is_round_half_even_of_three_quarters(ml_ratings, ml_split):
    train, test = ml_split
    sizes = ml_ratings.groupby("user_id").size()
    train_sizes = train.groupby("user_id").size().reindex(sizes.index, fill_value=0)
    expected = sizes.map(lambda n: round(0.75 * n))
    assert (train_sizes == expected).all()
    assert len(test) == 25008


def test_train_and_test_partition_the_ratings(ml_ratings, ml_split):
    train, test = ml_split
    assert len(train) + len(test) == len(ml_ratings)
    assert set(train.index).isdisjoint(test.index)
    assert pd.concat([train, test]).sort_index().equals(ml_ratings)
    assert train.index.is_monotonic_increasing and test.index.is_monotonic_increasing


def test_test_ratings_hold_the_highest_draws_of_each_user(ml_ratings, ml_split):
    train, test = ml_split
    np.random.seed(U75_SEED)
    draws = pd.Series(np.random.rand(len(ml_ratings)), index=ml_ratings.index)
    highest_train = draws[train.index].groupby(train["user_id"]).max()
    lowest_test = draws[test.index].groupby(test["user_id"]).min()
    users = lowest_test.index.intersection(highest_train.index)
    assert (highest_train[users] < lowest_test[users]).all()


def test_global_rng_state_is_restored():
    np.random.seed(7)
    before = np.random.get_state()
    u75_split(_frame([1, 1, 1, 2, 2]))
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    u75_split(_frame([1, 1, 1]))
    assert np.array_equal(np.random.rand(3), expected)


def test_split_is_deterministic():
    frame = _frame([1, 2, 1, 3, 2, 1, 1, 2, 3, 3, 3, 1])
    first_train, first_test = u75_split(frame)
    np.random.seed(123)
    np.random.rand(10)
    second_train, second_test = u75_split(frame)
    assert first_train.equals(second_train) and first_test.equals(second_test)


def test_small_frame_follows_the_rounding_rule():
    # n = 1, 2, 3, 4, 6: round-half-even(0.75 n) = 1, 2 (1.5 -> 2), 2 (2.25), 3, 4 (4.5 -> 4).
    users = [1] + [2] * 2 + [3] * 3 + [4] * 4 + [6] * 6
    frame = _frame(users)
    train, test = u75_split(frame)
    assert train.groupby("user_id").size().to_dict() == {1: 1, 2: 2, 3: 2, 4: 3, 6: 4}
    assert test.groupby("user_id").size().to_dict() == {3: 1, 4: 1, 6: 2}
    assert list(train.columns) == list(frame.columns) and (train["source"] == "hand").all()


def test_small_frame_draws_follow_file_order():
    # Draws for seed 42 start 0.375, 0.951, 0.732, 0.599: in one 4-rating user the row with
    # the highest draw (the second row, item 101) is the test rating.
    train, test = u75_split(_frame([9, 9, 9, 9]))
    assert test["item_id"].tolist() == [101]
    assert train["item_id"].tolist() == [100, 102, 103]


def test_train_size_rounds_half_to_even():
    assert [u75_train_size(n) for n in (1, 2, 3, 6, 10, 14)] == [1, 2, 2, 4, 8, 10]


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="timestamp"):
        u75_split(_frame([1, 2]).drop(columns="timestamp"))


def test_fingerprint_orders_integer_ids_numerically_and_dedups():
    numeric = pd.DataFrame({"user_id": [10, 2, 2], "item_id": [1, 30, 30]})
    expected = hashlib.sha256(b"2\t30\n10\t1\n").hexdigest()[:16]
    assert split_fingerprint(numeric) == expected
    text = pd.DataFrame({"user_id": ["u10", "u2"], "item_id": ["a", "b"]})
    assert split_fingerprint(text) == hashlib.sha256(b"u10\ta\nu2\tb\n").hexdigest()[:16]
