"""Data contracts: the typed schemas of interactions, users and items.

Each schema is declared once as a list of :class:`Column` and rendered to Arrow
(Parquet files) or Spark (``StructType``) on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql.types import StructType

EVENT_TYPES: tuple[str, ...] = ("view", "click", "like", "share", "complete", "rate")
RATING_MIN, RATING_MAX = 1.0, 5.0
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet", "tv")
EARLIEST_EVENT_TIME = datetime(1995, 1, 1, tzinfo=UTC)
"""No event is older (MovieLens' first ratings are from 1995); the latest allowed is now plus
``preprocess.future_tolerance_s``. ``POST /v1/events`` rejects timestamps outside."""


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # one of: string, float, int, timestamp, string_list
    nullable: bool = True
    doc: str = ""


_ARROW = {
    "string": pa.string(),
    "float": pa.float64(),
    "int": pa.int32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "string_list": pa.list_(pa.string()),
}


@dataclass(frozen=True)
class TableSchema:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if not c.nullable]

    def arrow(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, _ARROW[c.dtype], nullable=c.nullable) for c in self.columns])

    def spark(self) -> StructType:
        from pyspark.sql import types as T

        spark_types = {
            "string": T.StringType(),
            "float": T.DoubleType(),
            "int": T.IntegerType(),
            "timestamp": T.TimestampType(),
            "string_list": T.ArrayType(T.StringType()),
        }
        return T.StructType([T.StructField(c.name, spark_types[c.dtype], c.nullable) for c in self.columns])

    def conform(self, table: pa.Table) -> pa.Table:
        """Select and cast ``table`` to this schema: a missing nullable column becomes all
        null; a missing required column raises, naming it."""
        missing = [n for n in self.required if n not in table.column_names]
        if missing:
            raise ValueError(f"{self.name}: missing columns {missing}")
        schema = self.arrow()
        for name in self.names:
            if name not in table.column_names:
                table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
        return table.select(self.names).cast(schema)


INTERACTIONS = TableSchema(
    name="interactions",
    columns=(
        Column("user_id", "string", False, "user identifier"),
        Column("item_id", "string", False, "item identifier"),
        Column("event_type", "string", False, f"one of {', '.join(EVENT_TYPES)}"),
        Column("rating", "float", True, "explicit rating 1-5, null unless event_type == 'rate'"),
        Column("dwell_time_s", "float", True, "seconds spent on the item, >= 0"),
        Column("scroll_depth", "float", True, "share of the item scrolled, 0-1"),
        Column("device", "string", True, f"one of {', '.join(DEVICES)}"),
        Column("session_id", "string", True, "client session"),
        Column("timestamp", "timestamp", False, "event time, UTC"),
        Column("event_id", "string", True, "idempotency key of an event sent to the serving tier"),
    ),
    key=("user_id", "item_id", "event_type", "timestamp", "session_id"),
)

USERS = TableSchema(
    name="users",
    columns=(
        Column("user_id", "string", False),
        Column("age", "int", True),
        Column("gender", "string", True),
        Column("occupation", "string", True),
        Column("region", "string", True),
    ),
    key=("user_id",),
)

ITEMS = TableSchema(
    name="items",
    columns=(
        Column("item_id", "string", False),
        Column("title", "string", False),
        Column("text", "string", True),
        Column("categories", "string_list", True),
        Column("published_at", "timestamp", True),
    ),
    key=("item_id",),
)

TABLES = {s.name: s for s in (INTERACTIONS, USERS, ITEMS)}
