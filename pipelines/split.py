"""Train/test splits and their file format.

The temporal per-user split of the nightly pipeline (:func:`temporal_split`), the u75
split and split fingerprint that ``hyperrec benchmark`` (:mod:`training.benchmark`) and its
tests rely on, and the per-user k-fold that validation carves from a train split
(:func:`user_kfold`). Every stage reads the ``split/{train,test}`` Parquet files that
:mod:`pipelines.preprocess` writes through :func:`load_split` / :func:`load_split_part`.
The protocols, with u75's rounding rule and the published ml-100k fingerprint, are in
docs/models.md ("Splits").
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import DataFrame

U75_SEED = 42
U75_TRAIN_SHARE = 0.75
REQUIRED_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def u75_train_size(n: int) -> int:
    """Train ratings for a user with n ratings: round-half-to-even of 0.75 * n."""
    return round(U75_TRAIN_SHARE * n)


def _check_ratings(ratings: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in ratings.columns]
    if missing:
        raise ValueError(f"u75_split: ratings lack column(s) {missing}; need {list(REQUIRED_COLUMNS)}")
    if ratings["user_id"].isna().any():
        row = ratings.index[ratings["user_id"].isna()][0]
        raise ValueError(f"u75_split: row {row!r} has no user_id; every rating needs a user")


def _u75_draws(n: int) -> np.ndarray:
    """``np.random.seed(42); np.random.rand(n)``, leaving numpy's global RNG state as it was."""
    state = np.random.get_state()
    try:
        np.random.seed(U75_SEED)
        return np.random.rand(n)
    finally:
        np.random.set_state(state)


def u75_split(ratings: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ratings (in u.data file order) into (train, test) by protocol u75.

    Both frames keep every input column, the input's index and its row order. Ties in the
    draws (practically impossible) go to the earlier row. numpy's global RNG state is
    restored afterwards.
    """
    _check_ratings(ratings)
    draws = pd.Series(_u75_draws(len(ratings)), index=ratings.index)
    users = ratings["user_id"]
    rank = draws.groupby(users, sort=False).rank(method="first")
    sizes = users.map(users.value_counts())
    train_sizes = sizes.map(u75_train_size)
    is_train = (rank <= train_sizes).to_numpy()
    return ratings[is_train], ratings[~is_train]


def _is_integer_id(value: object) -> bool:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and value.lstrip("-").isdigit() and str(int(value)) == value


def _sort_keys(ids: Sequence[Hashable]) -> list:
    """Integer order when every id is an integer (or its canonical decimal text), else text order."""
    if all(_is_integer_id(v) for v in ids):
        return [int(v) for v in ids]
    return [str(v) for v in ids]


def split_fingerprint(test: pd.DataFrame) -> str:
    """First 16 hex chars of the sha256 of the distinct ``"{user}\\t{item}\\n"`` test lines,
    joined in (user, item) order.

    Ids compare as integers when every user id (resp. item id) is an integer or its
    canonical decimal text, so ml-100k's fingerprint is the same whether ids were read as
    ints or strings; other ids compare as text. This integer order is what yields the
    published ml-100k u75 fingerprint a29e96aa82063170 (plain text order gives
    90d1bd3f74110055).
    """
    for column in ("user_id", "item_id"):
        if column not in test.columns:
            raise ValueError(f"split_fingerprint: test split lacks column {column!r}")
    pairs = list(dict.fromkeys(zip(test["user_id"].tolist(), test["item_id"].tolist())))
    user_keys = _sort_keys([u for u, _ in pairs])
    item_keys = _sort_keys([i for _, i in pairs])
    order = sorted(range(len(pairs)), key=lambda j: (user_keys[j], item_keys[j]))
    lines = "".join(f"{pairs[j][0]}\t{pairs[j][1]}\n" for j in order)
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def temporal_split(df: DataFrame, test_fraction: float) -> DataFrame:
    """Add a ``split`` column (``train``/``test``) to a Spark frame of interactions: each
    user's latest ``round(test_fraction · n)`` distinct items are test.

    Users keep at least one training item; every test event of a user is later than
    every train event of that user (no leakage), and an item in a user's train set is
    never in their test set.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    by_user = Window.partitionBy("user_id")
    first_seen = df.groupBy("user_id", "item_id").agg(F.min("timestamp").alias("_first"))
    ranked = first_seen.withColumn(
        "_rank", F.row_number().over(by_user.orderBy(F.desc("_first"), F.desc("item_id")))
    ).withColumn("_n", F.count("*").over(by_user))
    n_test = F.least(F.round(F.col("_n") * test_fraction), F.col("_n") - 1)
    cut = ranked.where(F.col("_rank") <= n_test).groupBy("user_id").agg(F.min("_first").alias("_cutoff"))
    return (
        df.join(cut, "user_id", "left")
        .withColumn(
            "split",
            F.when(F.col("_cutoff").isNotNull() & (F.col("timestamp") >= F.col("_cutoff")), "test").otherwise("train"),
        )
        .drop("_cutoff")
    )


def user_kfold(frame: pd.DataFrame, k: int, seed: int = 0) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """Per-user stratified k-fold over ``frame``: ``[(fit, held_out), ...]``, one pair per fold.

    Each user's rows are shuffled with ``numpy.random.default_rng(seed)`` and dealt
    round-robin into k parts; fold f holds out part f. Every user with at least k rows
    appears in every fold's held-out part, so segments (sets of users) are represented in
    proportion in every fold; a user with fewer rows is held out in only some folds and
    keeps the rest for fitting. Each row is held out exactly once across the k folds.
    """
    if k < 2:
        raise ValueError(f"user_kfold: k must be at least 2, got {k}")
    if "user_id" not in frame.columns:
        raise ValueError("user_kfold: frame lacks column 'user_id'")
    draws = pd.Series(np.random.default_rng(seed).random(len(frame)), index=frame.index)
    part = (draws.groupby(frame["user_id"], sort=False).rank(method="first").to_numpy().astype(np.int64) - 1) % k
    return [(frame[part != f], frame[part == f]) for f in range(k)]


SPLIT_COLUMNS = ["user_id", "item_id", "confidence", "timestamp"]
SPLIT_PARTS = ("train", "test")


def load_split_part(split_dir: Path, part: str, columns: Sequence[str] | None = SPLIT_COLUMNS) -> pd.DataFrame:
    """One part (``train`` or ``test``) that :mod:`pipelines.preprocess` wrote under
    ``split_dir``: the ``columns`` given (default :data:`SPLIT_COLUMNS`), or every
    INTERACTIONS column plus ``confidence`` and ``decay_weight`` when ``columns`` is None."""
    if part not in SPLIT_PARTS:
        raise ValueError(f"load_split_part: unknown part {part!r}; expected one of {SPLIT_PARTS}")
    return pd.read_parquet(split_dir / part, columns=None if columns is None else list(columns))


def load_split(split_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and test parts that :mod:`pipelines.preprocess` wrote under ``split_dir``,
    with :data:`SPLIT_COLUMNS`."""
    return load_split_part(split_dir, "train"), load_split_part(split_dir, "test")
