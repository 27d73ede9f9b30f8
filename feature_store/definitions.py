"""Declarative feature definitions, shared by the offline and online paths.

Every user feature is one :class:`FeatureDef` in :data:`USER_FEATURES`; the
profile builder (:mod:`feature_store.profiles`) interprets them, so a new
feature is one new line here. A definition is a
*family* when it has a ``template``: it expands to one column per value of
``column`` (``values``, or every value seen in the data when ``values`` is None),
named ``template.format(value=...)``.

Event weights. Every event used by a definition has weight

    w = c^[weighted] * 0.5 ** (age_days / half_life_days)^[decayed]

where ``c`` is the event's ``confidence`` (1.0 when the column is absent),
``age_days = (as_of - timestamp) / 1 day`` and the half-life is
``settings.features.half_life_days`` passed to the builder. Without either flag
``w = 1``. Only events with ``timestamp <= as_of`` and, for windowed features,
``timestamp > as_of - window_days`` are used (point-in-time correctness).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal

from hyperrec.schemas import DEVICES

Aggregation = Literal["count", "sum", "mean", "share", "passthrough"]
Source = Literal["interactions", "users"]
Impute = Literal["zero", "median"]

AGGREGATIONS: dict[str, str] = {
    "count": "sum of event weights (the number of events when unweighted)",
    "sum": "sum of w * column",
    "mean": "sum(w * column) / sum(w) over events where column is not null; 0 when there are none",
    "share": "sum of w over events whose column equals the value / sum of w over all events; an event "
    "whose column holds a list splits its weight equally over the list's values; 0 without events",
    "passthrough": "the column of the users table, imputed when null",
}

# Time-of-day buckets on the UTC hour of an event: [start, end) hours.
TIME_OF_DAY: tuple[tuple[str, int, int], ...] = (
    ("night", 0, 6),
    ("morning", 6, 12),
    ("afternoon", 12, 18),
    ("evening", 18, 24),
)

# Columns the builder derives for every event before aggregating.
DERIVED_COLUMNS: dict[str, str] = {
    "time_of_day": "bucket of the UTC hour of timestamp, see TIME_OF_DAY",
    "categories": "the item's categories (ITEMS.categories joined on item_id)",
}

CONFIDENCE_COLUMN = "confidence"


@dataclass(frozen=True)
class FeatureDef:
    """One feature (or a family of features) of an entity.

    ``where`` keeps only events whose column equals a value, e.g.
    ``("event_type", "click")``. ``impute`` fills users without a value.
    """

    name: str
    aggregation: Aggregation
    column: str | None = None
    entity: str = "user"
    source: Source = "interactions"
    window_days: int | None = None
    decayed: bool = False
    weighted: bool = False
    where: tuple[str, str] | None = None
    values: tuple[str, ...] | None = None
    template: str | None = None
    impute: Impute = "zero"
    dtype: Literal["float", "int"] = "float"
    doc: str = ""

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"feature {self.name!r}: unknown aggregation {self.aggregation!r}")
        if self.aggregation in ("sum", "mean", "share", "passthrough") and not self.column:
            raise ValueError(f"feature {self.name!r}: aggregation {self.aggregation!r} needs a column")
        if self.is_family != (self.aggregation == "share"):
            raise ValueError(f"feature {self.name!r}: exactly the 'share' features are families (need a template)")
        if self.template is not None and "{value}" not in self.template:
            raise ValueError(f"feature {self.name!r}: template {self.template!r} lacks '{{value}}'")
        if self.source == "users" and self.aggregation != "passthrough":
            raise ValueError(f"feature {self.name!r}: source 'users' only supports 'passthrough'")
        if self.window_days is not None and self.window_days <= 0:
            raise ValueError(f"feature {self.name!r}: window_days must be > 0, got {self.window_days}")
        if self.dtype == "int" and (self.decayed or self.weighted or self.aggregation not in ("count", "sum")):
            raise ValueError(f"feature {self.name!r}: dtype 'int' only fits unweighted count/sum")

    @property
    def is_family(self) -> bool:
        return self.template is not None

    def column_name(self, value: str | None = None) -> str:
        """The profile column of this feature (of ``value`` for a family)."""
        if self.is_family:
            if value is None:
                raise ValueError(f"feature family {self.name!r} needs a value")
            return self.template.format(value=value)
        return self.name


USER_FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("events_7d", "count", window_days=7, dtype="int", doc="events in the 7 days up to as_of"),
    FeatureDef("events_30d", "count", window_days=30, dtype="int", doc="events in the 30 days up to as_of"),
    FeatureDef("clicks_30d", "count", window_days=30, where=("event_type", "click"), dtype="int",
               doc="click events in the 30 days up to as_of"),
    FeatureDef("mean_dwell_30d", "mean", "dwell_time_s", window_days=30, doc="mean dwell time (s), 30 days"),
    FeatureDef("mean_scroll_30d", "mean", "scroll_depth", window_days=30, doc="mean scroll depth, 30 days"),
    FeatureDef("mean_rating", "mean", "rating", doc="mean explicit rating, all time"),
    FeatureDef("decayed_activity", "count", decayed=True, weighted=True,
               doc="sum of confidence * decay weights of all events"),
    FeatureDef("category_affinity", "share", "categories", template="cat_{value}", decayed=True, weighted=True,
               doc="category affinity: decay-weighted share of events per item category (every category in items)"),
    FeatureDef("device_share", "share", "device", template="share_{value}", values=DEVICES,
               doc="share of events per device, all time"),
    FeatureDef("time_of_day_share", "share", "time_of_day", template="share_{value}",
               values=tuple(b[0] for b in TIME_OF_DAY),
               doc="share of events per UTC time-of-day bucket, all time"),
    FeatureDef("age", "passthrough", "age", source="users", impute="median", doc="age, null imputed with the median"),
)


FeatureColumn = tuple[str, FeatureDef, str | None]


def feature_columns(defs: tuple[FeatureDef, ...], family_values: dict[str, tuple[str, ...]]) -> list[FeatureColumn]:
    """Expand ``defs`` to ``(column name, definition, value)`` in definition order.

    A family takes its values from ``values`` or else from ``family_values[column]``.
    Raises when two columns end up with the same name.
    """
    out: list[FeatureColumn] = []
    for fdef in defs:
        if fdef.is_family:
            values = fdef.values if fdef.values is not None else family_values.get(fdef.column or "")
            if values is None:
                raise ValueError(f"feature family {fdef.name!r}: no values for column {fdef.column!r}")
            out.extend((fdef.column_name(v), fdef, v) for v in values)
        else:
            out.append((fdef.name, fdef, None))
    counts = Counter(name for name, _, _ in out)
    dupes = sorted(n for n, c in counts.items() if c > 1)
    if dupes:
        raise ValueError(f"duplicate feature columns: {dupes}")
    return out
