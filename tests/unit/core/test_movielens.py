import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.datasets.movielens import GENRES, ChecksumError, to_raw_dataset, verify
from core.schemas import INTERACTIONS, ITEMS, USERS
from core.settings import load_settings

ML = load_settings().data_dir / "ml-100k"


def test_bundled_copy_has_readme_and_published_md5():
    assert (ML / "README").exists()
    verify(ML)  # raises on mismatch


def test_corrupted_copy_is_refused(tmp_path):
    copy = tmp_path / "ml-100k"
    shutil.copytree(ML, copy)
    (copy / "u.data").chmod(0o644)
    with open(copy / "u.data", "a") as fh:
        fh.write("1\t1\t5\t0\n")
    with pytest.raises(ChecksumError, match="md5"):
        verify(copy)


def test_conversion_to_the_data_contract(tmp_path):
    ds = to_raw_dataset(ML, tmp_path / "raw")
    events = pq.read_table(ds.interactions)
    users, items = pq.read_table(ds.users), pq.read_table(ds.items)
    assert events.schema.equals(INTERACTIONS.arrow(), check_metadata=False)
    assert users.schema.equals(USERS.arrow(), check_metadata=False)
    assert items.schema.equals(ITEMS.arrow(), check_metadata=False)
    assert (events.num_rows, users.num_rows, items.num_rows) == (100_000, 943, 1682)
    frame = events.to_pandas()
    assert set(frame["event_type"]) == {"rate"}
    assert frame["rating"].between(1, 5).all()
    assert frame["timestamp"].min() == pd.Timestamp("1997-09-20 03:05:10", tz="UTC")
    toy_story = items.to_pandas().set_index("item_id").loc["1"]
    assert toy_story["title"] == "Toy Story (1995)"
    assert list(toy_story["categories"]) == ["Animation", "Children's", "Comedy"]
    assert set(c for cats in items.column("categories").to_pylist() for c in cats) <= set(GENRES)
    first = users.to_pandas().set_index("user_id").loc["1"]
    assert (first["age"], first["gender"], first["occupation"], first["region"]) == (24, "M", "technician", "zip8")
