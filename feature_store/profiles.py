"""User profiles built by interpreting :data:`feature_store.definitions.USER_FEATURES`.

Their offline Parquet snapshots are read and written by :mod:`feature_store.offline`;
:func:`build_snapshots` builds and writes one per ``as_of``.

All aggregations are vectorized: events are mapped to integer user codes and
every feature is one ``numpy.bincount`` over them, so 100k events take well
under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from feature_store.definitions import (
    CONFIDENCE_COLUMN,
    TIME_OF_DAY,
    USER_FEATURES,
    FeatureDef,
    feature_columns,
)
from feature_store.offline import partition_date, to_utc, write_offline_snapshot

_DAY = pd.Timedelta(days=1)


def decay_weights(age_days: np.ndarray, half_life_days: float) -> np.ndarray:
    """Exponential decay ``0.5 ** (age_days / half_life_days)``: 1 at age 0, 0.5 at the half-life."""
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be > 0, got {half_life_days}")
    return np.power(0.5, np.asarray(age_days, dtype=float) / half_life_days)


def time_of_day(timestamps: pd.Series) -> pd.Series:
    """The :data:`TIME_OF_DAY` bucket of each timestamp's UTC hour."""
    hours = pd.to_datetime(timestamps, utc=True).dt.hour.to_numpy()
    conditions = [(hours >= start) & (hours < end) for _, start, end in TIME_OF_DAY]
    labels = np.select(conditions, [name for name, _, _ in TIME_OF_DAY], default="")
    return pd.Series(labels, index=timestamps.index, dtype=object)


def day_type(timestamps: pd.Series) -> pd.Series:
    """``'weekend'`` for events on a UTC Saturday or Sunday, ``'weekday'`` otherwise."""
    weekend = pd.to_datetime(timestamps, utc=True).dt.dayofweek.to_numpy() >= 5
    return pd.Series(np.where(weekend, "weekend", "weekday"), index=timestamps.index, dtype=object)


def _event_type(events: pd.DataFrame) -> pd.Series:
    if "event_type" not in events.columns:
        raise ValueError("interactions: missing column 'event_type' (needed by derived columns)")
    return events["event_type"]


# How each derived column of :data:`feature_store.definitions.DERIVED_COLUMNS` (but the
# item join) is computed from the event frame.
_DERIVERS: dict[str, Callable[[pd.DataFrame], pd.Series]] = {
    "time_of_day": lambda e: time_of_day(e["timestamp"]),
    "day_type": lambda e: day_type(e["timestamp"]),
    "signal": lambda e: pd.Series(
        np.where(_event_type(e).eq("rate").to_numpy(), "explicit", "implicit"), index=e.index, dtype=object
    ),
    "is_click": lambda e: _event_type(e).eq("click").astype(float),
}


def _needed_columns(defs: tuple[FeatureDef, ...]) -> set[str]:
    cols = {d.column for d in defs if d.source == "interactions" and d.column}
    cols |= {d.where[0] for d in defs if d.where}
    return cols


def _event_frame(
    interactions: pd.DataFrame, items: pd.DataFrame, defs: tuple[FeatureDef, ...], as_of: pd.Timestamp
) -> pd.DataFrame:
    """Events with ``timestamp <= as_of``, ``age_days``, ``confidence`` and every column ``defs`` read."""
    missing = [c for c in ("user_id", "timestamp") if c not in interactions.columns]
    if missing:
        raise ValueError(f"interactions: missing columns {missing}")
    ts = pd.to_datetime(interactions["timestamp"], utc=True)
    keep = (ts <= as_of).to_numpy()
    events = interactions.loc[keep].copy()
    events["user_id"] = events["user_id"].astype(str)
    events["age_days"] = ((as_of - ts[keep]) / _DAY).to_numpy(dtype=float)
    if CONFIDENCE_COLUMN in events.columns:
        conf = events[CONFIDENCE_COLUMN].astype(float).fillna(1.0)
        bad = conf[(conf <= 0) | (conf > 1)]
        if len(bad):
            raise ValueError(f"interactions row {bad.index[0]!r}: confidence {bad.iloc[0]} is outside (0, 1]")
        events[CONFIDENCE_COLUMN] = conf
    else:
        events[CONFIDENCE_COLUMN] = 1.0

    needed = _needed_columns(defs) - set(events.columns)
    for column in sorted(needed & set(_DERIVERS)):
        events[column] = _DERIVERS[column](events)
        needed.discard(column)
    item_cols = sorted(needed & (set(items.columns) - {"item_id"}))
    if item_cols:
        if items["item_id"].duplicated().any():
            dup = items.loc[items["item_id"].duplicated(), "item_id"].iloc[0]
            raise ValueError(f"items: item_id {dup!r} is not unique")
        lookup = items.set_index(items["item_id"].astype(str))[item_cols]
        joined = lookup.reindex(events["item_id"].astype(str))
        for col in item_cols:
            events[col] = joined[col].to_numpy()
    unknown = sorted(needed - set(item_cols))
    if unknown:
        users_of = {c: [d.name for d in defs if d.column == c or (d.where and d.where[0] == c)] for c in unknown}
        raise ValueError(f"columns not found in interactions, items or derived columns: {users_of}")
    return events.reset_index(drop=True)


def _observed_values(
    fdef: FeatureDef, events: pd.DataFrame, items: pd.DataFrame, users: pd.DataFrame
) -> tuple[str, ...]:
    """Sorted distinct values of a family's column (list cells exploded): from the users table for
    users features (none when it lacks the column), from items when it is an item column, else
    from the events."""
    column = fdef.column or ""
    if fdef.source == "users":
        if column not in users.columns:
            return ()
        source = users[column]
    else:
        source = items[column] if column in items.columns and column != "item_id" else events[column]
    values = source.explode().dropna()
    return tuple(sorted(values.astype(str).unique()))


def _event_weights(fdef: FeatureDef, events: pd.DataFrame, half_life_days: float, mask: np.ndarray) -> np.ndarray:
    """Per-event weight of ``fdef`` (see the definitions module), 0 for events outside ``mask``."""
    weights = np.where(mask, 1.0, 0.0)
    if fdef.weighted:
        weights = weights * events[CONFIDENCE_COLUMN].to_numpy(dtype=float)
    if fdef.decayed:
        weights = weights * decay_weights(events["age_days"].to_numpy(), half_life_days)
    return weights


def _event_mask(fdef: FeatureDef, events: pd.DataFrame) -> np.ndarray:
    mask = np.ones(len(events), dtype=bool)
    if fdef.window_days is not None:
        mask &= events["age_days"].to_numpy() < fdef.window_days
    if fdef.where is not None:
        column, value = fdef.where
        mask &= (events[column] == value).to_numpy()
    return mask


def _share(
    codes: np.ndarray, weights: np.ndarray, cells: pd.Series, values: tuple[str, ...], n_users: int
) -> np.ndarray:
    """(n_users, len(values)) weighted shares; a list cell splits its event's weight over its values."""
    denom = np.bincount(codes, weights=weights, minlength=n_users)
    exploded = cells.reset_index(drop=True).explode().dropna()
    rows = exploded.index.to_numpy()
    per_row = np.bincount(rows, minlength=len(cells))
    value_codes = pd.Index(values).get_indexer(exploded.astype(str))
    known = value_codes >= 0
    rows, value_codes = rows[known], value_codes[known]
    flat = codes[rows] * len(values) + value_codes
    numer = np.bincount(flat, weights=weights[rows] / per_row[rows], minlength=n_users * len(values))
    numer = numer.reshape(n_users, len(values))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom[:, None] > 0, numer / denom[:, None], 0.0)


def _aggregate(
    fdef: FeatureDef,
    events: pd.DataFrame,
    codes: np.ndarray,
    n_users: int,
    half_life_days: float,
    values: tuple[str, ...] | None,
) -> np.ndarray:
    """Values of one definition per user code: shape (n_users,) or (n_users, len(values)) for a family."""
    mask = _event_mask(fdef, events)
    weights = _event_weights(fdef, events, half_life_days, mask)
    if fdef.aggregation == "count":
        return np.bincount(codes, weights=weights, minlength=n_users)
    if fdef.aggregation == "share":
        return _share(codes[mask], weights[mask], events.loc[mask, fdef.column], values or (), n_users)
    x = pd.to_numeric(events[fdef.column], errors="raise").to_numpy(dtype=float)
    valid = mask & ~np.isnan(x)
    numer = np.bincount(codes[valid], weights=weights[valid] * x[valid], minlength=n_users)
    if fdef.aggregation == "sum":
        return numer
    denom = np.bincount(codes[valid], weights=weights[valid], minlength=n_users)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, numer / denom, 0.0)


def _users_column(fdef: FeatureDef, users: pd.DataFrame, user_index: pd.Index) -> pd.Series:
    """The users table's column of ``fdef`` aligned to ``user_index`` (null for unknown users)."""
    if fdef.column not in users.columns:
        raise ValueError(f"feature {fdef.name!r}: users table lacks column {fdef.column!r}")
    ids = users["user_id"].astype(str)
    if ids.duplicated().any():
        raise ValueError(f"users: user_id {ids[ids.duplicated()].iloc[0]!r} is not unique")
    return users.set_index(ids)[fdef.column].reindex(user_index)


def _onehot(fdef: FeatureDef, users: pd.DataFrame, user_index: pd.Index, values: tuple[str, ...]) -> np.ndarray:
    """(n_users, len(values)) indicators of the users column; all zeros when null or unknown."""
    if not values:
        return np.zeros((len(user_index), 0))
    cells = _users_column(fdef, users, user_index)
    codes = pd.Index(values).get_indexer(cells.astype(str).where(cells.notna(), None))
    out = np.zeros((len(user_index), len(values)))
    known = codes >= 0
    out[np.flatnonzero(known), codes[known]] = 1.0
    return out


def _passthrough(fdef: FeatureDef, users: pd.DataFrame, user_index: pd.Index) -> np.ndarray:
    x = pd.to_numeric(_users_column(fdef, users, user_index), errors="raise").to_numpy(dtype=float)
    fill = 0.0
    if fdef.impute == "median" and not np.isnan(x).all():
        fill = float(np.nanmedian(x))
    return np.where(np.isnan(x), fill, x)


def build_user_profiles(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    *,
    as_of: pd.Timestamp,
    half_life_days: float,
    defs: tuple[FeatureDef, ...] = USER_FEATURES,
) -> pd.DataFrame:
    """One row per user (column ``user_id``, sorted) with every column of ``defs`` as of ``as_of``.

    Users are those of ``users`` plus any with an event at or before ``as_of``. Only
    events with ``timestamp <= as_of`` count. Users without events get 0 for counts,
    sums, shares and means. Category families span every category seen in ``items``;
    demographic one-hot families every value seen in ``users`` (no columns when ``users``
    lacks the column). Integer features are ``int64``, the rest ``float64``.
    """
    as_of = to_utc(as_of)
    events = _event_frame(interactions, items, defs, as_of)
    user_index = pd.Index(sorted(set(users["user_id"].astype(str)) | set(events["user_id"])), name="user_id")
    codes = user_index.get_indexer(events["user_id"])
    n_users = len(user_index)

    family_values = {
        d.column: _observed_values(d, events, items, users)
        for d in defs
        if d.is_family and d.values is None and d.column
    }
    columns = feature_columns(defs, family_values)
    out: dict[str, np.ndarray] = {"user_id": user_index.to_numpy()}
    for fdef in defs:
        values = tuple(v for _, d, v in columns if d is fdef) if fdef.is_family else None
        if fdef.aggregation == "onehot":
            result = _onehot(fdef, users, user_index, values or ())
        elif fdef.aggregation == "passthrough":
            result = _passthrough(fdef, users, user_index)
        else:
            result = _aggregate(fdef, events, codes, n_users, half_life_days, values)
        if fdef.is_family:
            for j, value in enumerate(values or ()):
                out[fdef.column_name(value)] = _typed(fdef, result[:, j])
        else:
            out[fdef.name] = _typed(fdef, result)
    return pd.DataFrame(out)


def _typed(fdef: FeatureDef, x: np.ndarray) -> np.ndarray:
    return np.rint(x).astype(np.int64) if fdef.dtype == "int" else x.astype(float)


def build_snapshots(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame,
    *,
    as_of_dates: Sequence[pd.Timestamp],
    half_life_days: float,
    root: Path,
) -> list[Path]:
    """One snapshot per ``as_of`` in ``as_of_dates``, each built only from events with
    ``timestamp <= as_of``; returns the files in the order given. Two as_of on the same UTC
    date would share a partition, so that is an error."""
    stamps = [to_utc(t) for t in as_of_dates]
    dates = [partition_date(t) for t in stamps]
    dupes = sorted({d for d in dates if dates.count(d) > 1})
    if dupes:
        raise ValueError(f"as_of_dates: more than one as_of on {dupes} (one snapshot per UTC date)")
    paths = []
    for as_of in stamps:
        profiles = build_user_profiles(interactions, items, users, as_of=as_of, half_life_days=half_life_days)
        paths.append(write_offline_snapshot(profiles, root, as_of))
    return paths
