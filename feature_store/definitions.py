"""Declarative feature definitions, shared by the offline and online paths.

Every user feature is one :class:`FeatureDef` in :data:`USER_FEATURES`; the
profile builder (:mod:`feature_store.profiles`) interprets them for the offline
snapshot (:mod:`feature_store.offline`), and the online store is materialized
from those same profiles, so a new feature is one new line here. Each
definition states its entity, source, aggregation, window, decay and dtype
(:meth:`FeatureDef.spec`). A definition is a *family* when it has a
``template``: it expands to one column per value of ``column`` (``values``, or
every value seen in the data when ``values`` is None: item categories from the
items table, demographics from the users table), named
``template.format(value=...)``.

The event weights (confidence and half-life decay relative to ``as_of``) and the
point-in-time rule every definition follows are in docs/models.md ("User features").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

from core.schemas import DEVICES

Aggregation = Literal["count", "sum", "mean", "share", "passthrough", "onehot"]
Source = Literal["interactions", "users"]
Impute = Literal["zero", "median"]

AGGREGATIONS: dict[str, str] = {
    "count": "sum of event weights (the number of events when unweighted)",
    "sum": "sum of w * column",
    "mean": "sum(w * column) / sum(w) over events where column is not null; 0 when there are none",
    "share": "sum of w over events whose column equals the value / sum of w over all events; an event "
    "whose column holds a list splits its weight equally over the list's values; 0 without events",
    "passthrough": "the numeric column of the users table, imputed when null",
    "onehot": "1 when the users table's column equals the value, else 0 (0 for every value when null "
    "or when the user is not in the users table)",
}

FAMILY_AGGREGATIONS: frozenset[str] = frozenset({"share", "onehot"})
USER_AGGREGATIONS: frozenset[str] = frozenset({"passthrough", "onehot"})

# Time-of-day buckets on the UTC hour of an event: [start, end) hours.
TIME_OF_DAY: tuple[tuple[str, int, int], ...] = (
    ("night", 0, 6),
    ("morning", 6, 12),
    ("afternoon", 12, 18),
    ("evening", 18, 24),
)
DAY_TYPES: tuple[str, ...] = ("weekday", "weekend")
SIGNALS: tuple[str, ...] = ("explicit", "implicit")

# Columns the builder derives for every event before aggregating.
DERIVED_COLUMNS: dict[str, str] = {
    "time_of_day": "bucket of the UTC hour of timestamp, see TIME_OF_DAY",
    "day_type": "'weekend' when the UTC day of timestamp is Saturday or Sunday, else 'weekday'",
    "signal": "'explicit' for rate events (event_type == 'rate'), else 'implicit'",
    "is_click": "1.0 for click events (event_type == 'click'), else 0.0",
    "categories": "the item's categories (ITEMS.categories joined on item_id)",
}

CONFIDENCE_COLUMN = "confidence"
CLICK = ("event_type", "click")


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
        if self.aggregation != "count" and not self.column:
            raise ValueError(f"feature {self.name!r}: aggregation {self.aggregation!r} needs a column")
        if self.is_family != (self.aggregation in FAMILY_AGGREGATIONS):
            raise ValueError(
                f"feature {self.name!r}: exactly the {sorted(FAMILY_AGGREGATIONS)} features are "
                "families (need a template)"
            )
        if self.template is not None and "{value}" not in self.template:
            raise ValueError(f"feature {self.name!r}: template {self.template!r} lacks '{{value}}'")
        if (self.source == "users") != (self.aggregation in USER_AGGREGATIONS):
            raise ValueError(
                f"feature {self.name!r}: source 'users' goes with exactly the aggregations {sorted(USER_AGGREGATIONS)}"
            )
        if self.source == "users" and (self.window_days or self.decayed or self.weighted or self.where):
            raise ValueError(f"feature {self.name!r}: a users feature has no window, decay, weight or where")
        if self.window_days is not None and self.window_days <= 0:
            raise ValueError(f"feature {self.name!r}: window_days must be > 0, got {self.window_days}")
        if self.dtype == "int" and (
            self.decayed or self.weighted or self.aggregation not in ("count", "sum", "onehot")
        ):
            raise ValueError(f"feature {self.name!r}: dtype 'int' only fits unweighted count/sum and onehot")

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

    def spec(self) -> dict[str, Any]:
        """The definition as a flat record: entity, source, aggregation, column, window,
        decay (``"half_life"`` or None), weighting, filter, dtype and doc."""
        return {
            "name": self.name,
            "entity": self.entity,
            "source": self.source,
            "aggregation": self.aggregation,
            "column": self.column,
            "window_days": self.window_days,
            "decay": "half_life" if self.decayed else None,
            "weighted": CONFIDENCE_COLUMN if self.weighted else None,
            "where": f"{self.where[0]} == {self.where[1]!r}" if self.where else None,
            "columns": self.template or self.name,
            "dtype": self.dtype,
            "doc": self.doc,
        }


def _windowed(
    name: str, aggregation: Aggregation, column: str | None, days: tuple[int, ...], doc: str, **kwargs: Any
) -> tuple[FeatureDef, ...]:
    """One definition per window: ``<name>_<d>d``, documented as ``doc`` over that window."""
    return tuple(
        FeatureDef(f"{name}_{d}d", aggregation, column, window_days=d, doc=f"{doc}, {d} day(s) up to as_of", **kwargs)
        for d in days
    )


WINDOWS: tuple[int, ...] = (1, 7, 30)

USER_FEATURES: tuple[FeatureDef, ...] = (
    # Sliding windows (as_of - window, as_of].
    *_windowed("events", "count", None, WINDOWS, "events", dtype="int"),
    *_windowed("clicks", "count", None, WINDOWS, "click events", where=CLICK, dtype="int"),
    *_windowed("mean_dwell", "mean", "dwell_time_s", (7, 30), "mean dwell time (s)"),
    *_windowed("mean_scroll", "mean", "scroll_depth", (7, 30), "mean scroll depth"),
    # Exponential time decay with the configured half-life.
    FeatureDef(
        "decayed_activity", "count", decayed=True, weighted=True, doc="sum of confidence * decay weights of all events"
    ),
    FeatureDef("decayed_clicks", "count", where=CLICK, decayed=True, doc="sum of decay weights of click events"),
    # Category affinities.
    FeatureDef(
        "category_affinity",
        "share",
        "categories",
        template="cat_{value}",
        decayed=True,
        weighted=True,
        doc="category affinity: decay- and confidence-weighted share of events per item category "
        "(every category in items)",
    ),
    # Activity statistics, all time.
    FeatureDef("events_total", "count", dtype="int", doc="events, all time"),
    FeatureDef("click_rate", "mean", "is_click", doc="click frequency: share of events that are clicks, all time"),
    FeatureDef("mean_dwell", "mean", "dwell_time_s", doc="mean dwell time (s), all time"),
    FeatureDef("mean_scroll", "mean", "scroll_depth", doc="mean scroll depth, all time"),
    # Context profile, all time.
    FeatureDef(
        "device_share", "share", "device", template="share_{value}", values=DEVICES, doc="share of events per device"
    ),
    FeatureDef(
        "time_of_day_share",
        "share",
        "time_of_day",
        template="share_{value}",
        values=tuple(b[0] for b in TIME_OF_DAY),
        doc="share of events per UTC time-of-day bucket",
    ),
    FeatureDef(
        "day_type_share",
        "share",
        "day_type",
        template="share_{value}",
        values=DAY_TYPES,
        doc="share of events on UTC weekdays / weekends",
    ),
    # Explicit and implicit signals, all time.
    FeatureDef("ratings_total", "count", where=("event_type", "rate"), dtype="int", doc="explicit ratings given"),
    FeatureDef("mean_rating", "mean", "rating", doc="mean explicit rating"),
    FeatureDef(
        "mean_implicit_confidence",
        "mean",
        CONFIDENCE_COLUMN,
        where=("signal", "implicit"),
        doc="mean confidence of implicit (non-rate) events",
    ),
    FeatureDef(
        "decayed_implicit_strength",
        "count",
        where=("signal", "implicit"),
        decayed=True,
        weighted=True,
        doc="sum of confidence * decay weights of implicit events",
    ),
    # Demographics, passed through from the users table (preprocessing imputes them; the
    # median fills users absent from the users table).
    FeatureDef("age", "passthrough", "age", source="users", impute="median", doc="age, null imputed with the median"),
    FeatureDef(
        "gender",
        "onehot",
        "gender",
        source="users",
        template="gender_{value}",
        dtype="int",
        doc="gender indicator per value in users",
    ),
    FeatureDef(
        "region",
        "onehot",
        "region",
        source="users",
        template="region_{value}",
        dtype="int",
        doc="region indicator per value in users",
    ),
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
