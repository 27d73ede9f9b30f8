"""The offline feature store: dated Parquet snapshots of user profiles (this module is the
one writer and reader of their files) and point-in-time joins of training labels against them.

Layout: ``<root>/date=YYYY-MM-DD/profiles.parquet``, one partition per UTC date; every row
carries ``as_of``, and its features come only from events with ``timestamp <= as_of``. A
re-run of the same date replaces its file atomically. :func:`point_in_time_join` gives a
label at time ``t`` the latest snapshot with ``as_of < t`` (docs/models.md, "User features").
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

SNAPSHOT_FILE = "profiles.parquet"
AS_OF = "as_of"
_PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_TS = "datetime64[ns, UTC]"


def to_utc(ts: pd.Timestamp | str) -> pd.Timestamp:
    """``ts`` as a UTC timestamp; a naive one is taken to be UTC already."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def partition_date(as_of: pd.Timestamp) -> str:
    """``YYYY-MM-DD``: the UTC date of ``as_of``, naming its partition."""
    return to_utc(as_of).strftime("%Y-%m-%d")


def write_offline_snapshot(profiles: pd.DataFrame, root: Path, as_of: pd.Timestamp) -> Path:
    """Write ``profiles`` with an ``as_of`` column (after ``user_id``) to
    ``root/date=YYYY-MM-DD/profiles.parquet`` (UTC date of ``as_of``), replacing any earlier
    file of that date atomically. Returns the file path."""
    if "user_id" not in profiles.columns:
        raise ValueError("profiles: missing column 'user_id'")
    if AS_OF in profiles.columns:
        raise ValueError(f"profiles: column {AS_OF!r} is reserved (the writer sets it)")
    if profiles["user_id"].duplicated().any():
        dup = profiles.loc[profiles["user_id"].duplicated(), "user_id"].iloc[0]
        raise ValueError(f"profiles: user_id {dup!r} appears more than once")
    table = profiles.copy()
    table.insert(
        int(profiles.columns.get_loc("user_id")) + 1, AS_OF, pd.Series(to_utc(as_of), index=table.index, dtype=_TS)
    )
    target = Path(root) / f"date={partition_date(as_of)}" / SNAPSHOT_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{SNAPSHOT_FILE}.{os.getpid()}.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, target)
    return target


def list_snapshots(root: Path) -> list[tuple[str, Path]]:
    """``(date, file)`` of every snapshot under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for part in root.iterdir():
        match = _PARTITION.match(part.name)
        if match and (part / SNAPSHOT_FILE).is_file():
            found.append((match.group(1), part / SNAPSHOT_FILE))
    return sorted(found)


def _read(path: Path, with_as_of: bool) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    if AS_OF in frame.columns:
        if not with_as_of:
            return frame.drop(columns=AS_OF)
        return frame.astype({AS_OF: _TS})
    if with_as_of:
        raise ValueError(f"snapshot {path} has no {AS_OF!r} column (written before as_of was recorded)")
    return frame


def read_offline_snapshot(root: Path, as_of: pd.Timestamp | None = None, *, with_as_of: bool = False) -> pd.DataFrame:
    """The latest snapshot whose date is <= the UTC date of ``as_of`` (the latest of all when None),
    without its ``as_of`` column unless ``with_as_of``."""
    snapshots = list_snapshots(root)
    if as_of is not None:
        cutoff = partition_date(as_of)
        snapshots = [(d, p) for d, p in snapshots if d <= cutoff]
    if not snapshots:
        when = f" on or before {partition_date(as_of)}" if as_of is not None else ""
        raise FileNotFoundError(f"no profile snapshot under {root}{when}")
    return _read(snapshots[-1][1], with_as_of)


def read_all_snapshots(root: Path) -> pd.DataFrame:
    """Every snapshot under ``root`` stacked, with ``as_of``, sorted by ``(as_of, user_id)``."""
    snapshots = list_snapshots(root)
    if not snapshots:
        raise FileNotFoundError(f"no profile snapshot under {root}")
    frames = [_read(path, with_as_of=True) for _, path in snapshots]
    columns = list(frames[-1].columns)
    for (date, _), frame in zip(snapshots, frames):
        if set(frame.columns) != set(columns):
            diff = sorted(set(frame.columns) ^ set(columns))
            raise ValueError(f"snapshot date={date} has different columns from the latest: {diff}")
    stacked = pd.concat([f[columns] for f in frames], ignore_index=True)
    stacked["user_id"] = stacked["user_id"].astype(str)
    return stacked.sort_values([AS_OF, "user_id"], kind="stable").reset_index(drop=True)


def point_in_time_join(labels: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``labels`` (``user_id``, ``timestamp`` = the label's time, any other columns) with the
    ``as_of`` and features of the latest snapshot under ``root`` that holds the user and whose
    ``as_of`` is strictly earlier than the label's timestamp (``merge_asof`` by user,
    backward, ``allow_exact_matches=False``). Labels without such a snapshot get null features
    and ``as_of`` NaT. Rows keep the order and index of ``labels``; naive timestamps are UTC.
    Integer features come back as nullable ``Int64`` so they stay exact next to nulls."""
    missing = [c for c in ("user_id", "timestamp") if c not in labels.columns]
    if missing:
        raise ValueError(f"labels: missing columns {missing}")
    snapshots = read_all_snapshots(root)
    clash = sorted((set(snapshots.columns) - {"user_id"}) & set(labels.columns))
    if clash:
        raise ValueError(f"labels: columns {clash} clash with snapshot columns")
    ts = pd.to_datetime(labels["timestamp"], utc=True).astype(_TS)
    if ts.isna().any():
        raise ValueError(f"labels: row {ts.index[ts.isna()][0]!r} has a null timestamp")
    ints = [c for c in snapshots.columns if pd.api.types.is_integer_dtype(snapshots[c])]
    snapshots = snapshots.astype({c: "Int64" for c in ints})

    left = labels.assign(user_id=labels["user_id"].astype(str), _ts=ts.array, _row=range(len(labels)))
    joined = pd.merge_asof(
        left.sort_values("_ts", kind="stable"),
        snapshots.sort_values(AS_OF, kind="stable"),
        left_on="_ts",
        right_on=AS_OF,
        by="user_id",
        direction="backward",
        allow_exact_matches=False,
    )
    joined = joined.sort_values("_row").drop(columns=["_ts", "_row"])
    joined.index = labels.index
    joined["user_id"] = labels["user_id"]
    return joined
