"""Spark preprocessing: parse and normalize, quarantine malformed rows, hash-dedup, impute,
sessionize, confidence and time-decay weights, temporal split (docs/models.md, "Inputs").

Row accounting for interactions always satisfies ``in = clean + quarantined + duplicates``;
users and items keep their own ``in = clean + quarantined``. Every quarantined row keeps
its raw record and the reason it was set aside.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pyspark.ml.feature import Imputer
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from core.files import write_json_atomic
from core.schemas import DEVICES, EVENT_TYPES, INTERACTIONS, ITEMS, RATING_MAX, RATING_MIN, USERS
from core.settings import PreprocessSettings
from pipelines.read import check_input, read_raw_table
from pipelines.split import temporal_split

SESSION_GAP_S = 30 * 60
MAX_ID_LENGTH = 128
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
# Implicit signal strength per event type; explicit ratings use rating / RATING_MAX instead.
EVENT_CONFIDENCE = {"view": 0.2, "click": 0.35, "like": 0.7, "share": 0.8, "complete": 0.85}
DEVICE_ALIASES = {
    "mobile": ("mobile", "phone", "smartphone", "iphone", "android", "ios", "cell", "mobile phone"),
    "desktop": ("desktop", "pc", "web", "laptop", "mac", "windows", "linux", "computer"),
    "tablet": ("tablet", "ipad", "android tablet"),
    "tv": ("tv", "smart tv", "smarttv", "ctv", "roku", "firetv", "fire tv", "apple tv", "television"),
}

# Free-text fields limited to preprocess.max_field_length characters (ids: MAX_ID_LENGTH).
LENGTH_LIMITED = ("session_id", "event_id", "event_type", "device")
# Interaction quarantine reasons, in the order they are checked (a row gets the first).
# `too_long` is recorded as `too_long:<field>`, naming the first field over the limit.
QUARANTINE_REASONS: dict[str, str] = {
    "undecodable": "the record holds bytes that are not valid in preprocess.input_encoding",
    "unparseable_record": "the line is not valid CSV/JSON for the table",
    "missing_user_id": "user_id is null or blank",
    "missing_item_id": "item_id is null or blank",
    "invalid_id": f"an id is longer than {MAX_ID_LENGTH} characters or holds control characters",
    "too_long": f"one of {', '.join(LENGTH_LIMITED)} is longer than preprocess.max_field_length",
    "missing_event_type": "event_type is null or blank",
    "unknown_event_type": f"event_type is not one of {', '.join(EVENT_TYPES)}",
    "missing_timestamp": "timestamp is null or blank",
    "unparseable_timestamp": "timestamp is neither ISO-8601, a common date-time format, nor epoch seconds/milliseconds",
    "timestamp_out_of_range": "timestamp is before 1970-01-01",
    "future_timestamp": "timestamp is later than now plus the configured tolerance",
    "unparseable_rating": "rating is not a number",
    "unparseable_dwell_time": "dwell_time_s is not a number",
    "unparseable_scroll_depth": "scroll_depth is not a number",
    "non_finite_value": "a numeric field is NaN or infinite",
    "rating_out_of_range": f"rating is outside {RATING_MIN:g}-{RATING_MAX:g}",
    "rate_without_rating": "a rate event carries no rating",
    "rating_on_non_rate_event": "a rating on an event that is not a rate event",
    "scroll_depth_out_of_range": "scroll_depth is outside 0-1",
    "negative_dwell_time": "dwell_time_s is negative",
    "dwell_time_too_long": "dwell_time_s exceeds preprocess.max_dwell_time_s",
    "unknown_device": f"device is not a known name or alias of {', '.join(DEVICES)}",
    "unknown_user": "user_id is not in the users table",
    "unknown_item": "item_id is not in the items table",
}


@dataclass
class TableCounts:
    """Accounting of a dimension table: ``in_ = clean + sum(quarantined)``."""

    in_: int = 0
    clean: int = 0
    quarantined: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"in": self.in_, "clean": self.clean, "quarantined": self.quarantined}


@dataclass
class PreprocessReport:
    """Counts of one preprocessing run. ``in_ = clean + sum(quarantined) + duplicates``."""

    in_: int
    clean: int
    duplicates: int
    quarantined: dict[str, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)
    users: TableCounts = field(default_factory=TableCounts)
    items: TableCounts = field(default_factory=TableCounts)
    train: int = 0
    test: int = 0
    hash_algorithm: str = "md5"

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["in"] = payload.pop("in_")
        payload["quarantined_total"] = self.quarantined_total
        payload["users"], payload["items"] = self.users.to_json(), self.items.to_json()
        return payload

    def check(self) -> None:
        if self.in_ != self.clean + self.quarantined_total + self.duplicates:
            raise AssertionError(
                f"row accounting broken: in={self.in_} != clean={self.clean} + "
                f"quarantined={self.quarantined_total} + duplicates={self.duplicates}"
            )
        for name, table in (("users", self.users), ("items", self.items)):
            if table.in_ != table.clean + sum(table.quarantined.values()):
                raise AssertionError(f"{name} accounting broken: {table.to_json()}")


# --------------------------------------------------------------------------- parsing


def _blank_to_null(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed == "", None).otherwise(trimmed)


def _lower(name: str) -> Column:
    """Trim, collapse inner whitespace and lower-case; blank becomes null."""
    return F.lower(F.regexp_replace(_blank_to_null(F.col(name)), r"\s+", " "))


def parse_number(name: str) -> Column:
    """The trimmed string as a double, or null when blank or not a number."""
    return F.expr(f"try_cast(trim(`{name}`) as double)")


def parse_timestamp(name: str) -> Column:
    """A UTC timestamp from ISO-8601 (with or without offset), ``yyyy-MM-dd HH:mm:ss[XXX]``,
    ``yyyy/MM/dd HH:mm:ss``, ``dd/MM/yyyy HH:mm:ss`` (no offset means UTC), or an epoch
    number whose magnitude gives its unit: seconds (< 1e11), milliseconds (< 1e14),
    microseconds (< 1e17) or nanoseconds. Null when none applies."""
    s = _blank_to_null(F.col(name))
    epoch = F.expr(f"try_cast(trim(`{name}`) as double)")
    magnitude = F.abs(epoch)
    from_epoch = (
        F.when(magnitude >= 1e20, None)
        .when(magnitude >= 1e17, F.timestamp_micros((epoch / 1000).cast("long")))
        .when(magnitude >= 1e14, F.timestamp_micros(epoch.cast("long")))
        .when(magnitude >= 1e11, F.timestamp_millis(epoch.cast("long")))
        .otherwise(F.timestamp_seconds(epoch.cast("long")))
    )
    formats = ["yyyy-MM-dd HH:mm:ssXXX", "yyyy-MM-dd HH:mm:ss", "yyyy/MM/dd HH:mm:ss", "dd/MM/yyyy HH:mm:ss"]
    from_text = F.coalesce(F.try_to_timestamp(s), *[F.try_to_timestamp(s, F.lit(f)) for f in formats])
    return F.when(s.rlike(r"^-?\d+(\.\d+)?$"), from_epoch).otherwise(from_text)


def normalize_device(name: str = "device") -> Column:
    """Canonical device name for known aliases; the lower-cased input otherwise."""
    raw = _lower(name)
    result = raw
    for canonical, aliases in DEVICE_ALIASES.items():
        result = F.when(raw.isin(*aliases), F.lit(canonical)).otherwise(result)
    return result


def _valid_id(col: Column) -> Column:
    return (F.length(col) <= MAX_ID_LENGTH) & ~col.rlike(r"[\x00-\x1f\x7f]")


def parse_interactions(raw: DataFrame) -> DataFrame:
    """String columns from :func:`read_raw_table` → typed, normalized columns, plus
    ``_unparseable`` naming the first field that was present but could not be parsed."""
    present = {c: _blank_to_null(F.col(c)).isNotNull() for c in ("timestamp", "rating", "dwell_time_s", "scroll_depth")}
    parsed = {
        "timestamp": parse_timestamp("timestamp"),
        "rating": parse_number("rating"),
        "dwell_time_s": parse_number("dwell_time_s"),
        "scroll_depth": parse_number("scroll_depth"),
    }
    unparseable = F.lit(None).cast("string")
    for column, reason in reversed(
        [
            ("timestamp", "unparseable_timestamp"),
            ("rating", "unparseable_rating"),
            ("dwell_time_s", "unparseable_dwell_time"),
            ("scroll_depth", "unparseable_scroll_depth"),
        ]
    ):
        unparseable = F.when(present[column] & parsed[column].isNull(), F.lit(reason)).otherwise(unparseable)
    return raw.select(
        _blank_to_null(F.col("user_id")).alias("user_id"),
        _blank_to_null(F.col("item_id")).alias("item_id"),
        _lower("event_type").alias("event_type"),
        parsed["rating"].alias("rating"),
        parsed["dwell_time_s"].alias("dwell_time_s"),
        parsed["scroll_depth"].alias("scroll_depth"),
        normalize_device().alias("device"),
        _blank_to_null(F.col("session_id")).alias("session_id"),
        parsed["timestamp"].alias("timestamp"),
        _blank_to_null(F.col("event_id")).alias("event_id"),
        unparseable.alias("_unparseable"),
        F.col("_raw"),
        F.col("_corrupt"),
        F.col("_undecodable"),
    )


def quarantine_reason(now: datetime, settings: PreprocessSettings) -> Column:
    """The first :data:`QUARANTINE_REASONS` entry a parsed interaction row meets, or null.

    Expects ``_unparseable``/``_corrupt``/``_undecodable`` from parsing and
    ``_user_known``/``_item_known`` from the referential join.
    """
    horizon = F.lit(now + timedelta(seconds=settings.future_tolerance_s)).cast("timestamp")
    rating, dwell, scroll = F.col("rating"), F.col("dwell_time_s"), F.col("scroll_depth")
    non_finite = F.lit(False)
    for c in (rating, dwell, scroll):
        non_finite = non_finite | (c.isNotNull() & (F.isnan(c) | (F.abs(c) == float("inf"))))
    too_long = F.lit(None).cast("string")
    for name in reversed(LENGTH_LIMITED):
        too_long = F.when(F.length(name) > settings.max_field_length, F.lit(f"too_long:{name}")).otherwise(too_long)
    checks = {
        "undecodable": F.col("_undecodable"),
        "unparseable_record": F.col("_corrupt"),
        "missing_user_id": F.col("user_id").isNull(),
        "missing_item_id": F.col("item_id").isNull(),
        "invalid_id": ~(_valid_id(F.col("user_id")) & _valid_id(F.col("item_id"))),
        "too_long": too_long.isNotNull(),
        "missing_event_type": F.col("event_type").isNull(),
        "unknown_event_type": ~F.col("event_type").isin(*EVENT_TYPES),
        "missing_timestamp": F.col("timestamp").isNull() & F.col("_unparseable").isNull(),
        "unparseable_timestamp": F.col("_unparseable") == "unparseable_timestamp",
        "timestamp_out_of_range": F.col("timestamp") < F.lit(EARLIEST).cast("timestamp"),
        "future_timestamp": F.col("timestamp") > horizon,
        "unparseable_rating": F.col("_unparseable") == "unparseable_rating",
        "unparseable_dwell_time": F.col("_unparseable") == "unparseable_dwell_time",
        "unparseable_scroll_depth": F.col("_unparseable") == "unparseable_scroll_depth",
        "non_finite_value": non_finite,
        "rating_out_of_range": rating.isNotNull() & ~rating.between(RATING_MIN, RATING_MAX),
        "rate_without_rating": (F.col("event_type") == "rate") & rating.isNull(),
        "rating_on_non_rate_event": (F.col("event_type") != "rate") & rating.isNotNull(),
        "scroll_depth_out_of_range": scroll.isNotNull() & ~scroll.between(0.0, 1.0),
        "negative_dwell_time": dwell.isNotNull() & (dwell < 0),
        "dwell_time_too_long": dwell.isNotNull() & (dwell > settings.max_dwell_time_s),
        "unknown_device": F.col("device").isNotNull() & ~F.col("device").isin(*DEVICES),
        "unknown_user": ~F.col("_user_known"),
        "unknown_item": ~F.col("_item_known"),
    }
    assert list(checks) == list(QUARANTINE_REASONS)
    reason = F.lit(None).cast("string")
    for name, condition in reversed(list(checks.items())):
        label = too_long if name == "too_long" else F.lit(name)
        reason = F.when(F.coalesce(condition, F.lit(False)), label).otherwise(reason)
    return reason


def content_hash(algorithm: str) -> Column:
    """md5 or sha256 hex of the event's ``event_id`` when it has one (a client's retry is
    the same event), else of (user, item, event_type, timestamp, session)."""
    content = F.concat_ws(
        "\u001f",
        "user_id",
        "item_id",
        "event_type",
        F.date_format("timestamp", "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"),
        F.coalesce("session_id", F.lit("")),
    )
    key = F.when(F.col("event_id").isNotNull(), F.concat(F.lit("event_id\u001f"), F.col("event_id"))).otherwise(content)
    return F.md5(key) if algorithm == "md5" else F.sha2(key, 256)


# --------------------------------------------------------------------------- dimension tables


def _split_dimension(
    df: DataFrame, key: str, extra: tuple[tuple[Column, str], ...] = ()
) -> tuple[DataFrame, DataFrame]:
    """Split a dimension table into (clean, quarantined). Quarantined: unparseable lines,
    missing or invalid ``key`` values, rows meeting an ``extra`` (condition, reason), and
    every repeat of a key after its first occurrence in the input."""
    reasons = (
        F.when(F.col("_undecodable"), "undecodable")
        .when(F.col("_corrupt"), "unparseable_record")
        .when(F.col(key).isNull(), f"missing_{key}")
        .when(~_valid_id(F.col(key)), "invalid_id")
    )
    for condition, reason in extra:
        reasons = reasons.when(condition, reason)
    flagged = df.withColumn("reason", reasons)
    first = Window.partitionBy(key).orderBy("_row")
    ranked = flagged.withColumn("_rank", F.when(F.col("reason").isNull(), F.row_number().over(first)))
    ranked = ranked.withColumn(
        "reason", F.when(F.col("_rank") > 1, F.lit(f"duplicate_{key}")).otherwise(F.col("reason"))
    ).drop("_rank")
    return ranked.where(F.col("reason").isNull()).drop("reason"), ranked.where(F.col("reason").isNotNull())


def clean_users(raw: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Users: normalized categoricals; unparseable or impossible ages become null (imputed
    later). Missing, invalid and repeated ids are quarantined."""
    age = F.expr("try_cast(trim(age) as double)")
    gender = F.upper(F.substring(_blank_to_null(F.col("gender")), 1, 1))
    df = raw.select(
        _blank_to_null(F.col("user_id")).alias("user_id"),
        F.when(age.between(0, 120), age).cast("int").alias("age"),
        F.when(gender.isin("M", "F"), gender).when(gender.isNotNull(), F.lit("O")).alias("gender"),
        _lower("occupation").alias("occupation"),
        _lower("region").alias("region"),
        "_raw",
        "_corrupt",
        "_row",
        "_undecodable",
    )
    return _split_dimension(df, "user_id")


def clean_items(raw: DataFrame) -> tuple[DataFrame, DataFrame]:
    """Items: category labels trimmed, lower-cased and de-duplicated; missing, invalid and
    repeated ids and missing titles are quarantined."""
    categories = F.array_distinct(
        F.filter(
            F.transform(
                F.coalesce("categories", F.array().cast("array<string>")),
                lambda c: F.lower(F.regexp_replace(F.trim(c), r"\s+", " ")),
            ),
            lambda c: c != "",
        )
    )
    df = raw.select(
        _blank_to_null(F.col("item_id")).alias("item_id"),
        _blank_to_null(F.col("title")).alias("title"),
        _blank_to_null(F.col("text")).alias("text"),
        categories.alias("categories"),
        parse_timestamp("published_at").alias("published_at"),
        "_raw",
        "_corrupt",
        "_row",
        "_undecodable",
    )
    return _split_dimension(df, "item_id", ((F.col("title").isNull(), "missing_title"),))


# --------------------------------------------------------------------------- imputation


def _mode(df: DataFrame, column: str):
    row = df.where(F.col(column).isNotNull()).groupBy(column).count().orderBy(F.desc("count"), column).first()
    return row[column] if row else None


def _impute_simple(df: DataFrame, column: str, strategy: str) -> DataFrame:
    if strategy in ("mean", "median"):
        return Imputer(strategy=strategy, inputCols=[column], outputCols=[column]).fit(df).transform(df)
    return df.fillna({column: _mode(df, column)})


def impute_interactions(df: DataFrame, strategies: dict[str, str]) -> tuple[DataFrame, dict[str, int]]:
    """Fill implicit-signal columns of implicit events (every type but ``rate``) per
    ``strategies``. Explicit ratings carry no dwell, scroll or device by nature and are
    left as they are, as is a column with no observed value to learn from. Returns the
    frame and the number of imputed values per column."""
    columns = [c for c in ("dwell_time_s", "scroll_depth", "device") if strategies.get(c, "none") != "none"]
    implicit = F.col("event_type") != "rate"
    if not columns:
        return df, {}
    counts = (
        df.where(implicit)
        .agg(
            *[F.sum(F.col(c).isNull().cast("int")).alias(f"{c}_null") for c in columns],
            *[F.count(c).alias(f"{c}_present") for c in columns],
        )
        .first()
    )
    todo = [c for c in columns if (counts[f"{c}_present"] or 0) > 0 and (counts[f"{c}_null"] or 0) > 0]
    if not todo:
        return df, {}
    events, explicit = df.where(implicit), df.where(~implicit)
    for column in todo:
        events = _impute_simple(events, column, strategies[column])
    return events.unionByName(explicit), {c: int(counts[f"{c}_null"]) for c in todo}


def knn_impute_age(users: DataFrame, neighbours: int) -> DataFrame:
    """Impute missing ages with scikit-learn's KNNImputer on one-hot demographics
    (gender, occupation, region): each missing age is the mean age of the ``neighbours``
    most similar users with a known age."""
    from sklearn.impute import KNNImputer

    spark = users.sparkSession
    frame = users.toPandas()
    import pandas as pd

    features = pd.get_dummies(frame[["gender", "occupation", "region"]].fillna("?"), dtype=float)
    matrix = np.column_stack([frame["age"].astype(float).to_numpy(), features.to_numpy()])
    filled = KNNImputer(n_neighbors=neighbours).fit_transform(matrix)[:, 0]
    frame["age"] = np.rint(filled).astype("int32")
    return spark.createDataFrame(frame, schema=users.schema)


def impute_users(users: DataFrame, strategies: dict[str, str], neighbours: int) -> tuple[DataFrame, dict[str, int]]:
    """Fill demographics per ``strategies`` (``knn`` for age; mean/median/mode otherwise)."""
    columns = [c for c in ("age", "gender", "occupation", "region") if strategies.get(c, "none") != "none"]
    if not columns:
        return users, {}
    counts = users.agg(
        *[F.sum(F.col(c).isNull().cast("int")).alias(f"{c}_null") for c in columns],
        *[F.count(c).alias(f"{c}_present") for c in columns],
    ).first()
    todo = [c for c in columns if (counts[f"{c}_present"] or 0) > 0 and (counts[f"{c}_null"] or 0) > 0]
    for column in todo:
        if strategies[column] == "knn":
            users = knn_impute_age(users, neighbours)
        else:
            users = _impute_simple(users, column, strategies[column])
            if column == "age":
                users = users.withColumn("age", F.round("age").cast("int"))
    return users, {c: int(counts[f"{c}_null"]) for c in todo}


# --------------------------------------------------------------------------- weights


def sessionize(df: DataFrame, gap_s: int = SESSION_GAP_S) -> DataFrame:
    """Fill missing session ids: a new session starts after ``gap_s`` seconds of inactivity."""
    by_user = Window.partitionBy("user_id").orderBy("timestamp")
    gap = F.col("timestamp").cast("long") - F.lag(F.col("timestamp").cast("long")).over(by_user)
    new_session = F.when(gap.isNull() | (gap > gap_s), 1).otherwise(0)
    return (
        df.withColumn("_new_session", new_session)
        .withColumn("_session_no", F.sum("_new_session").over(by_user.rowsBetween(Window.unboundedPreceding, 0)))
        .withColumn(
            "session_id", F.coalesce("session_id", F.concat_ws("-s", "user_id", F.col("_session_no").cast("string")))
        )
        .drop("_new_session", "_session_no")
    )


def confidence() -> Column:
    """Confidence in (0, 1] that an interaction expresses a preference.

    Explicit ratings dominate: ``rating / 5``. Implicit events start from their event
    type's base weight plus up to 0.1 for scroll depth and 0.1 for dwell (saturating at
    2 minutes), capped at 0.95 so that no implicit signal outranks a 5-star rating.
    """
    base = F.lit(None).cast("double")
    for event, weight in EVENT_CONFIDENCE.items():
        base = F.when(F.col("event_type") == event, F.lit(weight)).otherwise(base)
    implicit = (
        base
        + 0.1 * F.coalesce("scroll_depth", F.lit(0.0))
        + 0.1 * F.least(F.coalesce("dwell_time_s", F.lit(0.0)) / 120.0, F.lit(1.0))
    )
    return F.when(F.col("event_type") == "rate", F.col("rating") / RATING_MAX).otherwise(F.least(implicit, F.lit(0.95)))


def decay_weight(as_of: datetime, half_life_days: float) -> Column:
    """Time-decay weight ``0.5 ** (age_days / half_life_days)`` relative to ``as_of``
    (the newest clean event): 1 for the newest event, 0.5 one half-life earlier."""
    age_days = (F.lit(as_of).cast("timestamp").cast("double") - F.col("timestamp").cast("double")) / 86400.0
    return F.pow(F.lit(0.5), F.greatest(age_days, F.lit(0.0)) / half_life_days)


# --------------------------------------------------------------------------- the stage


def _write(df: DataFrame, path: Path) -> None:
    df.write.mode("overwrite").parquet(str(path))


def _reason_counts(df: DataFrame) -> dict[str, int]:
    return {r["reason"]: int(r["count"]) for r in df.groupBy("reason").count().collect()}


def check_inputs(
    settings: PreprocessSettings,
    interactions: str | Path,
    *,
    users: str | Path | None = None,
    items: str | Path | None = None,
) -> None:
    """Check every input table before Spark starts (:func:`pipelines.read.check_input`);
    raise :class:`core.errors.InputFileError` with one line naming the first bad one."""
    for path, schema in ((interactions, INTERACTIONS), (users, USERS), (items, ITEMS)):
        if path is not None:
            check_input(path, schema, settings.input_encoding)


def preprocess(
    spark: SparkSession,
    interactions: str | Path,
    out_dir: Path,
    settings: PreprocessSettings,
    *,
    users: str | Path | None = None,
    items: str | Path | None = None,
    half_life_days: float = 14.0,
    now: datetime | None = None,
    s3_endpoint_url: str | None = None,
) -> PreprocessReport:
    """Run the whole preprocessing stage into ``out_dir``.

    Inputs are CSV, JSON lines or Parquet files or directories, local or ``s3://``,
    checked first (:func:`check_inputs`: an unusable input raises
    :class:`core.errors.InputFileError` naming it); CSV and JSON lines are decoded from
    ``settings.input_encoding`` record by record.
    Without ``users``/``items`` there is no referential check on that side. Writes
    ``clean/{interactions,users,items}``, ``quarantine/{interactions,users,items}``
    (``reason`` + ``raw_record``), ``split/{train,test}`` and ``report.json``.
    """
    now = now or datetime.now(UTC)
    check_inputs(settings, interactions, users=users, items=items)
    staging = out_dir / "staging"
    read = lambda path, schema: read_raw_table(  # noqa: E731
        spark, path, schema, staging, s3_endpoint_url, encoding=settings.input_encoding
    )
    user_table, item_table = TableCounts(), TableCounts()

    if users is not None:
        raw_users = read(users, USERS).cache()
        users_clean, users_bad = clean_users(raw_users)
        users_clean, users_imputed = impute_users(
            users_clean.drop("_raw", "_corrupt", "_row", "_undecodable").cache(),
            settings.impute,
            settings.knn_neighbours,
        )
        users_clean = users_clean.cache()
        _write(
            users_bad.select(*USERS.names, "reason", F.col("_raw").alias("raw_record")),
            out_dir / "quarantine" / "users",
        )
        user_table = TableCounts(raw_users.count(), users_clean.count(), _reason_counts(users_bad))
    if items is not None:
        raw_items = read(items, ITEMS).cache()
        items_clean, items_bad = clean_items(raw_items)
        items_clean = items_clean.drop("_raw", "_corrupt", "_row", "_undecodable").cache()
        _write(
            items_bad.select(*ITEMS.names, "reason", F.col("_raw").alias("raw_record")),
            out_dir / "quarantine" / "items",
        )
        item_table = TableCounts(raw_items.count(), items_clean.count(), _reason_counts(items_bad))

    df = parse_interactions(read(interactions, INTERACTIONS))
    for key, flag, known in (
        ("user_id", "_user_known", users_clean if users is not None else None),
        ("item_id", "_item_known", items_clean if items is not None else None),
    ):
        if known is None:  # no table given: nothing to check against
            df = df.withColumn(flag, F.lit(True))
        else:
            df = df.join(F.broadcast(known.select(key, F.lit(True).alias(flag))), key, "left")
    df = df.fillna({"_user_known": False, "_item_known": False}).withColumn("reason", quarantine_reason(now, settings))
    # Only quarantined rows need their raw record: write them straight from the source,
    # then keep a narrow frame (no raw JSON) in memory for the rest of the stage.
    bad = df.where(F.col("reason").isNotNull()).select(*INTERACTIONS.names, "reason", F.col("_raw").alias("raw_record"))
    _write(bad, out_dir / "quarantine" / "interactions")
    quarantined = _reason_counts(spark.read.parquet(str(out_dir / "quarantine" / "interactions")))
    df = df.select(*INTERACTIONS.names, "reason").cache()
    n_in = df.count()

    good = df.where(F.col("reason").isNull()).select(*INTERACTIONS.names)
    n_good = good.count()
    deduped = (
        good.withColumn("_hash", content_hash(settings.hash_algorithm)).dropDuplicates(["_hash"]).drop("_hash").cache()
    )
    deduped.count()
    df.unpersist()
    as_of = deduped.agg(F.max("timestamp")).first()[0] or now
    imputed_frame, imputed = impute_interactions(deduped, settings.impute)
    clean = (
        sessionize(imputed_frame)
        .withColumn("confidence", confidence())
        .withColumn("decay_weight", decay_weight(as_of, half_life_days))
    )
    split = temporal_split(clean, settings.test_fraction).cache()
    n_clean = split.count()
    deduped.unpersist()

    _write(split.drop("split"), out_dir / "clean" / "interactions")
    for part in ("train", "test"):
        _write(split.where(F.col("split") == part).drop("split"), out_dir / "split" / part)
    split_counts = {r["split"]: int(r["count"]) for r in split.groupBy("split").count().collect()}
    if users is not None:
        _write(users_clean, out_dir / "clean" / "users")
        imputed.update(users_imputed)
    if items is not None:
        _write(items_clean, out_dir / "clean" / "items")

    report = PreprocessReport(
        in_=n_in,
        clean=n_clean,
        duplicates=n_good - n_clean,
        quarantined=quarantined,
        imputed=imputed,
        users=user_table,
        items=item_table,
        train=split_counts.get("train", 0),
        test=split_counts.get("test", 0),
        hash_algorithm=settings.hash_algorithm,
    )
    report.check()
    write_json_atomic(out_dir / "report.json", report.to_json())
    spark.catalog.clearCache()
    return report
