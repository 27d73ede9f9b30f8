"""Segment popularity for cold-start users, and the nearest segment of a new user (the
naive-Bayes MAP segment of the request's attributes, :meth:`SegmentProfiles.nearest`).
:func:`write_segment_profiles` writes ``segment_popularity.npy`` and ``segments.json`` into a
bundle's ``serving/`` folder. See docs/models.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsFloat, cast

import numpy as np
import pandas as pd

from training.models import InteractionMatrix, fit_segment_popularity, popularity

SERVING_DIR = "serving"
POPULARITY_FILE = "segment_popularity.npy"
PROFILE_FILE = "segments.json"
NUMERIC = ("age",)
CATEGORICAL = ("gender", "occupation", "region", "device")
ATTRIBUTES = NUMERIC + CATEGORICAL


def write_segment_profiles(
    bundle_dir: Path,
    item_ids: np.ndarray,
    train: pd.DataFrame,
    segments: Mapping[str, str],
    users: pd.DataFrame | None = None,
    events: pd.DataFrame | None = None,
) -> Path:
    """Write ``serving/segment_popularity.npy`` and ``serving/segments.json`` into ``bundle_dir``.

    ``train``: ``user_id``, ``item_id`` interactions; ``segments``: user id → segment label;
    ``users``: ``user_id`` plus any of ``age``, ``gender``, ``occupation``, ``region``;
    ``events``: ``user_id``, ``device`` (the device shares). Users without a segment are left out.
    """
    seg = {str(u): str(s) for u, s in segments.items()}
    labels = sorted(set(seg.values()), key=lambda s: (len(s), s))
    if not labels:
        raise ValueError("write_segment_profiles: no user has a segment")
    frame = train.assign(user_id=train["user_id"].astype(str))
    frame = frame[frame["user_id"].isin(seg)]
    if frame.empty:
        raise ValueError("write_segment_profiles: no training interaction belongs to a segmented user")
    matrix = InteractionMatrix.from_frame(frame[["user_id", "item_id"]], item_ids=np.asarray(item_ids, dtype=object))
    code = {label: i for i, label in enumerate(labels)}
    rows = np.array([code[seg[str(u)]] for u in matrix.user_ids])
    per = fit_segment_popularity(matrix.matrix, rows)
    global_pop = popularity(matrix.matrix)
    popularity_rows = np.stack([per.get(i, global_pop) for i in range(len(labels))]).astype(np.float32)
    sizes = [int(n) for n in np.bincount(rows, minlength=len(labels))]
    profile: dict = {"labels": labels, "sizes": sizes, "numeric": {}, "categorical": {}}
    if users is not None:
        people = users.assign(user_id=users["user_id"].astype(str))
        people = people[people["user_id"].isin(seg)].assign(segment=lambda d: d["user_id"].map(seg))
        for column in NUMERIC:
            if column in people.columns and people[column].notna().any():
                profile["numeric"][column] = _numeric_profile(people, column, labels)
        for column in CATEGORICAL:
            if column in people.columns and people[column].notna().any():
                profile["categorical"][column] = _share_profile(people, column, labels)
    if events is not None and "device" in events.columns and events["device"].notna().any():
        acts = events[["user_id", "device"]].assign(user_id=events["user_id"].astype(str))
        acts = acts[acts["user_id"].isin(seg)].assign(segment=lambda d: d["user_id"].map(seg))
        profile["categorical"]["device"] = _share_profile(acts, "device", labels)
    out = Path(bundle_dir) / SERVING_DIR
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / POPULARITY_FILE, popularity_rows)
    (out / PROFILE_FILE).write_text(json.dumps(profile, indent=1, sort_keys=True))
    return out


def _numeric_profile(frame: pd.DataFrame, column: str, labels: list[str]) -> dict:
    values = pd.to_numeric(frame[column], errors="coerce")
    overall = float(values.std()) if values.notna().sum() > 1 else 1.0
    grouped = values.groupby(frame["segment"])
    mean, std = grouped.mean(), grouped.std()
    default_mean = float(values.mean())
    return {
        "mean": [float(mean.get(s, default_mean)) if pd.notna(mean.get(s, np.nan)) else default_mean for s in labels],
        "std": [float(std.get(s)) if pd.notna(std.get(s, np.nan)) else overall for s in labels],
        "overall_std": overall if overall > 0 else 1.0,
    }


def _share_profile(frame: pd.DataFrame, column: str, labels: list[str]) -> dict:
    known = frame[frame[column].notna()]
    values = sorted(known[column].astype(str).unique())
    counts = pd.crosstab(known["segment"], known[column].astype(str)).reindex(
        index=labels, columns=values, fill_value=0
    )
    shares = (counts.to_numpy(dtype=np.float64) + 1.0) / (counts.sum(axis=1).to_numpy()[:, None] + len(values))
    return {"values": values, "shares": shares.tolist()}


@dataclass
class SegmentProfiles:
    """A bundle's segment popularity and profiles (:func:`write_segment_profiles`)."""

    labels: list[str]
    sizes: np.ndarray
    popularity: np.ndarray
    numeric: dict
    categorical: dict

    @classmethod
    def load(cls, bundle_dir: Path, n_items: int) -> SegmentProfiles | None:
        """The profiles in ``bundle_dir/serving``, or None when the bundle has none."""
        folder = Path(bundle_dir) / SERVING_DIR
        if not (folder / PROFILE_FILE).is_file() or not (folder / POPULARITY_FILE).is_file():
            return None
        spec = json.loads((folder / PROFILE_FILE).read_text())
        popularity = np.load(folder / POPULARITY_FILE, allow_pickle=False).astype(np.float32)
        if popularity.shape != (len(spec["labels"]), n_items):
            raise ValueError(
                f"{folder / POPULARITY_FILE}: shape {popularity.shape}, expected "
                f"({len(spec['labels'])}, {n_items}) segments × items"
            )
        return cls(
            list(spec["labels"]),
            np.asarray(spec["sizes"], dtype=np.float64),
            popularity,
            spec.get("numeric", {}),
            spec.get("categorical", {}),
        )

    @property
    def attributes(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def nearest(self, attributes: Mapping[str, object]) -> tuple[int, list[str]] | None:
        """Index of the MAP segment for ``attributes`` and the attributes that counted; None
        when none of the given attributes carries evidence."""
        logp = np.log(np.maximum(self.sizes, 1.0))
        used: list[str] = []
        for name, value in attributes.items():
            if value is None:
                continue
            if name in self.numeric:
                spec = self.numeric[name]
                mean, std = np.asarray(spec["mean"]), np.asarray(spec["std"])
                std = np.maximum(std, 0.1 * float(spec["overall_std"]))
                logp = logp - 0.5 * ((float(cast(SupportsFloat, value)) - mean) / std) ** 2 - np.log(std)
                used.append(name)
            elif name in self.categorical:
                spec = self.categorical[name]
                if str(value) not in spec["values"]:
                    continue
                j = spec["values"].index(str(value))
                logp = logp + np.log(np.asarray(spec["shares"])[:, j])
                used.append(name)
        if not used:
            return None
        return int(np.argmax(logp)), used
