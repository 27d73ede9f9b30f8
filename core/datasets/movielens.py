"""MovieLens-100k loader: ratings become ``rate`` events, genres become categories,
demographics become users. The bundled copy is md5-checked before use."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.datasets import RawDataset
from core.schemas import INTERACTIONS, ITEMS, USERS

ML100K_NAME = "ml-100k"  # the bundled copy: <data_dir>/ml-100k
U_DATA_MD5 = "6e47046882bad158b0efbb84cd5cb987"
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)


class ChecksumError(RuntimeError):
    pass


def md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(source: Path) -> None:
    """Raise :class:`ChecksumError` unless ``source/u.data`` has the published md5."""
    u_data = source / "u.data"
    if not u_data.exists():
        raise FileNotFoundError(f"MovieLens-100k not found: {u_data}")
    actual = md5_of(u_data)
    if actual != U_DATA_MD5:
        raise ChecksumError(f"{u_data}: md5 {actual} != expected {U_DATA_MD5}")


def read_ratings(source: Path) -> pd.DataFrame:
    """u.data in file order: user_id, item_id, rating, timestamp (ints)."""
    return pd.read_csv(source / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])


def read_items(source: Path) -> pd.DataFrame:
    cols = ["item_id", "title", "release_date", "video_release_date", "url", *GENRES]
    raw = pd.read_csv(source / "u.item", sep="|", names=cols, encoding="latin-1")
    flags = raw[list(GENRES)].to_numpy()
    categories = [[g for g, on in zip(GENRES, row) if on] for row in flags]
    published = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce", utc=True)
    return pd.DataFrame(
        {
            "item_id": raw["item_id"].astype(str),
            "title": raw["title"].fillna("").astype(str),
            "text": [f"{t}. Genres: {', '.join(c)}" for t, c in zip(raw["title"].fillna(""), categories)],
            "categories": categories,
            "published_at": published,
        }
    )


def read_users(source: Path) -> pd.DataFrame:
    raw = pd.read_csv(source / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip"])
    return pd.DataFrame(
        {
            "user_id": raw["user_id"].astype(str),
            "age": raw["age"].astype("int32"),
            "gender": raw["gender"].str.upper(),
            "occupation": raw["occupation"].str.lower(),
            # US zip codes: the first digit is the postal region (0 = north-east ... 9 = west coast).
            "region": "zip" + raw["zip"].astype(str).str[0],
        }
    )


def to_raw_dataset(source: Path, out: Path) -> RawDataset:
    """Convert the ml-100k files in ``source`` to the raw dataset layout under ``out``."""
    verify(source)
    dataset = RawDataset(out)
    dataset.interactions.mkdir(parents=True, exist_ok=True)
    ratings = read_ratings(source)
    interactions = pd.DataFrame(
        {
            "user_id": ratings["user_id"].astype(str),
            "item_id": ratings["item_id"].astype(str),
            "event_type": "rate",
            "rating": ratings["rating"].astype(float),
            "dwell_time_s": None,
            "scroll_depth": None,
            "device": None,
            "session_id": None,
            "timestamp": pd.to_datetime(ratings["timestamp"], unit="s", utc=True),
        }
    )
    for schema, frame, target in (
        (INTERACTIONS, interactions, dataset.interactions / "part-00000.parquet"),
        (USERS, read_users(source), dataset.users),
        (ITEMS, read_items(source), dataset.items),
    ):
        table = schema.conform(pa.Table.from_pandas(frame, preserve_index=False))
        pq.write_table(table, target)
    return dataset
