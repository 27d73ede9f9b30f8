"""Spark preprocessing: cast, quarantine malformed rows, hash-dedup, impute,
sessionize, confidence weights, and the temporal per-user split.

Row accounting always satisfies ``in = clean + quarantined + duplicates``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pyspark.ml.feature import Imputer
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from hyperrec.datasets import RawDataset
from hyperrec.schemas import DEVICES, EVENT_TYPES, INTERACTIONS, ITEMS, RATING_MAX, RATING_MIN, USERS
from hyperrec.settings import PreprocessSettings

SESSION_GAP_S = 30 * 60
# Implicit signal strength per event type; explicit ratings use rating / RATING_MAX instead.
EVENT_CONFIDENCE = {"view": 0.2, "click": 0.35, "like": 0.7, "share": 0.8, "complete": 0.85}


@dataclass
class PreprocessReport:
    """Counts of one preprocessing run. ``in_ = clean + sum(quarantined) + duplicates``."""

    in_: int
    clean: int
    duplicates: int
    quarantined: dict[str, int] = field(default_factory=dict)
    imputed: dict[str, int] = field(default_factory=dict)
    users: int = 0
    items: int = 0
    train: int = 0
    test: int = 0

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["in"] = payload.pop("in_")
        payload["quarantined_total"] = self.quarantined_total
        return payload

    def check(self) -> None:
        if self.in_ != self.clean + self.quarantined_total + self.duplicates:
            raise AssertionError(
                f"row accounting broken: in={self.in_} != clean={self.clean} + "
                f"quarantined={self.quarantined_total} + duplicates={self.duplicates}"
            )


def _norm(col: str) -> Column:
    """Trim and lower-case a string column; empty strings become null."""
    trimmed = F.lower(F.trim(F.col(col)))
    return F.when(trimmed == "", None).otherwise(trimmed)


def read_raw(spark: SparkSession, raw: RawDataset) -> tuple[DataFrame, DataFrame, DataFrame]:
    raw.check()
    return (
        spark.read.parquet(str(raw.interactions)),
        spark.read.parquet(str(raw.users)),
        spark.read.parquet(str(raw.items)),
    )


def clean_users(users: DataFrame) -> DataFrame:
    """Trim ids, normalize categoricals, null out impossible ages, keep one row per user."""
    return (
        users.withColumn("user_id", F.trim("user_id"))
        .where(F.col("user_id").isNotNull() & (F.col("user_id") != ""))
        .withColumn("gender", F.upper(F.trim("gender")))
        .withColumn("occupation", _norm("occupation"))
        .withColumn("region", _norm("region"))
        .withColumn("age", F.when(F.col("age").between(0, 120), F.col("age")).cast("int"))
        .dropDuplicates(["user_id"])
        .select(*USERS.names)
    )


def clean_items(items: DataFrame) -> DataFrame:
    """Trim ids, normalize category labels, keep one row per item."""
    return (
        items.withColumn("item_id", F.trim("item_id"))
        .where(F.col("item_id").isNotNull() & (F.col("item_id") != ""))
        .withColumn("categories", F.transform(F.coalesce("categories", F.array().cast("array<string>")), lambda c: F.trim(c)))
        .dropDuplicates(["item_id"])
        .select(*ITEMS.names)
    )


def quarantine_reason(now: datetime, tolerance_s: int) -> Column:
    """The first reason a normalized interaction row is malformed, or null when it is good.

    Expects the columns ``_user_known`` / ``_item_known`` from the referential join.
    """
    horizon = F.lit(now + timedelta(seconds=tolerance_s)).cast("timestamp")
    checks = [
        (F.col("user_id").isNull(), "missing_user_id"),
        (F.col("item_id").isNull(), "missing_item_id"),
        (F.col("timestamp").isNull(), "missing_timestamp"),
        (F.col("event_type").isNull() | ~F.col("event_type").isin(*EVENT_TYPES), "unknown_event_type"),
        (F.col("rating").isNotNull() & ~F.col("rating").between(RATING_MIN, RATING_MAX), "rating_out_of_range"),
        ((F.col("event_type") == "rate") & F.col("rating").isNull(), "rate_without_rating"),
        (F.col("scroll_depth").isNotNull() & ~F.col("scroll_depth").between(0.0, 1.0), "scroll_depth_out_of_range"),
        (F.col("dwell_time_s").isNotNull() & (F.col("dwell_time_s") < 0), "negative_dwell_time"),
        (F.isnan("dwell_time_s") | F.isnan("scroll_depth") | F.isnan("rating"), "nan_value"),
        (F.col("timestamp") > horizon, "future_timestamp"),
        (~F.col("_user_known"), "unknown_user"),
        (~F.col("_item_known"), "unknown_item"),
    ]
    reason = F.lit(None).cast("string")
    for condition, name in reversed(checks):
        reason = F.when(condition, F.lit(name)).otherwise(reason)
    return reason


def normalize_interactions(interactions: DataFrame) -> DataFrame:
    """Cast to the schema and normalize ids, event types and device names; keep the raw record."""
    raw_json = F.to_json(F.struct(*[F.col(c) for c in interactions.columns]))
    df = interactions.withColumn("_raw", raw_json)
    for c in INTERACTIONS.columns:
        target = INTERACTIONS.spark()[c.name].dataType
        df = df.withColumn(c.name, F.col(c.name).cast(target) if c.name in interactions.columns else F.lit(None).cast(target))
    device = _norm("device")
    device = F.when(device.isin("phone", "smartphone", "android", "ios"), "mobile").when(device.isin("pc", "web", "laptop"), "desktop").otherwise(device)
    return (
        df.withColumn("user_id", F.trim("user_id"))
        .withColumn("item_id", F.trim("item_id"))
        .withColumn("user_id", F.when(F.col("user_id") == "", None).otherwise(F.col("user_id")))
        .withColumn("item_id", F.when(F.col("item_id") == "", None).otherwise(F.col("item_id")))
        .withColumn("event_type", _norm("event_type"))
        .withColumn("device", F.when(device.isin(*DEVICES), device))
        .withColumn("session_id", F.trim("session_id"))
    )


def content_hash(algorithm: str) -> Column:
    """Hash over (user, item, event_type, timestamp, session): md5 or sha256 hex."""
    key = F.concat_ws(
        "\u001f", "user_id", "item_id", "event_type",
        F.date_format("timestamp", "yyyy-MM-dd'T'HH:mm:ss.SSSSSS"), F.coalesce("session_id", F.lit("")),
    )
    return F.md5(key) if algorithm == "md5" else F.sha2(key, 256)


def impute(df: DataFrame) -> tuple[DataFrame, dict[str, int]]:
    """Fill the implicit-signal columns of implicit events (every type but ``rate``):
    median dwell time and scroll depth (Spark ML Imputer), mode for device.

    Explicit ratings carry no dwell, scroll or device by nature and are left as they are,
    as is a column with no observed value to learn from. Returns the frame and the
    number of imputed values per column.
    """
    implicit = F.col("event_type") != "rate"
    columns = ("dwell_time_s", "scroll_depth", "device")
    counts = df.where(implicit).agg(
        *[F.sum(F.col(c).isNull().cast("int")).alias(f"{c}_null") for c in columns],
        *[F.count(c).alias(f"{c}_present") for c in columns],
    ).first()
    todo = [c for c in columns if (counts[f"{c}_present"] or 0) > 0 and (counts[f"{c}_null"] or 0) > 0]
    if not todo:
        return df, {}
    imputed = {c: int(counts[f"{c}_null"]) for c in todo}
    events, explicit = df.where(implicit), df.where(~implicit)
    numeric = [c for c in todo if c != "device"]
    if numeric:
        events = Imputer(strategy="median", inputCols=numeric, outputCols=numeric).fit(events).transform(events)
    if "device" in todo:
        mode = events.where(F.col("device").isNotNull()).groupBy("device").count().orderBy(F.desc("count"), "device").first()["device"]
        events = events.fillna({"device": mode})
    return events.unionByName(explicit), imputed


def sessionize(df: DataFrame, gap_s: int = SESSION_GAP_S) -> DataFrame:
    """Fill missing session ids: a new session starts after ``gap_s`` seconds of inactivity."""
    by_user = Window.partitionBy("user_id").orderBy("timestamp")
    gap = F.col("timestamp").cast("long") - F.lag(F.col("timestamp").cast("long")).over(by_user)
    new_session = F.when(gap.isNull() | (gap > gap_s), 1).otherwise(0)
    return (
        df.withColumn("_new_session", new_session)
        .withColumn("_session_no", F.sum("_new_session").over(by_user.rowsBetween(Window.unboundedPreceding, 0)))
        .withColumn("session_id", F.coalesce("session_id", F.concat_ws("-s", "user_id", F.col("_session_no").cast("string"))))
        .drop("_new_session", "_session_no")
    )


def confidence() -> Column:
    """Confidence in (0, 1] that an interaction expresses a preference (article §3b).

    Explicit ratings dominate: ``rating / 5``. Implicit events start from their event
    type's base weight plus up to 0.1 for scroll depth and 0.1 for dwell (saturating at
    2 minutes), capped at 0.95 so that no implicit signal outranks a 5-star rating.
    """
    base = F.lit(None).cast("double")
    for event, weight in EVENT_CONFIDENCE.items():
        base = F.when(F.col("event_type") == event, F.lit(weight)).otherwise(base)
    implicit = base + 0.1 * F.coalesce("scroll_depth", F.lit(0.0)) + 0.1 * F.least(F.coalesce("dwell_time_s", F.lit(0.0)) / 120.0, F.lit(1.0))
    return F.when(F.col("event_type") == "rate", F.col("rating") / RATING_MAX).otherwise(F.least(implicit, F.lit(0.95)))


def temporal_split(df: DataFrame, test_fraction: float) -> DataFrame:
    """Mark each user's latest ``round(test_fraction · n)`` distinct items as test.

    Users keep at least one training interaction; items seen in train are never in the
    user's test set (no leakage: every test event is later than every train event of
    that user).
    """
    by_user = Window.partitionBy("user_id")
    first_seen = df.groupBy("user_id", "item_id").agg(F.min("timestamp").alias("_first"))
    ranked = first_seen.withColumn("_rank", F.row_number().over(by_user.orderBy(F.desc("_first"), F.desc("item_id")))).withColumn(
        "_n", F.count("*").over(by_user)
    )
    n_test = F.least(F.round(F.col("_n") * test_fraction), F.col("_n") - 1)
    cut = ranked.withColumn("_is_test", F.col("_rank") <= n_test).where("_is_test").groupBy("user_id").agg(F.min("_first").alias("_cutoff"))
    return (
        df.join(cut, "user_id", "left")
        .withColumn("split", F.when(F.col("_cutoff").isNotNull() & (F.col("timestamp") >= F.col("_cutoff")), "test").otherwise("train"))
        .drop("_cutoff")
    )


def preprocess(
    spark: SparkSession,
    raw: RawDataset,
    out_dir: Path,
    settings: PreprocessSettings,
    now: datetime | None = None,
) -> PreprocessReport:
    """Run the whole preprocessing stage from ``raw`` into ``out_dir``.

    Writes ``clean/{interactions,users,items}``, ``quarantine/interactions`` (with
    ``reason`` and ``raw_record``), ``split/{train,test}`` (Parquet) and ``report.json``.
    """
    now = now or datetime.now(timezone.utc)
    interactions, users, items = read_raw(spark, raw)
    users, items = clean_users(users).cache(), clean_items(items).cache()
    known_users = users.select("user_id", F.lit(True).alias("_user_known"))
    known_items = items.select("item_id", F.lit(True).alias("_item_known"))

    df = (
        normalize_interactions(interactions)
        .join(F.broadcast(known_users), "user_id", "left")
        .join(F.broadcast(known_items), "item_id", "left")
        .fillna({"_user_known": False, "_item_known": False})
        .withColumn("reason", quarantine_reason(now, settings.future_tolerance_s))
        .cache()
    )
    n_in = df.count()
    bad = df.where(F.col("reason").isNotNull())
    bad.select(*INTERACTIONS.names, "reason", F.col("_raw").alias("raw_record")).write.mode("overwrite").parquet(str(out_dir / "quarantine" / "interactions"))
    quarantined = {r["reason"]: int(r["count"]) for r in bad.groupBy("reason").count().collect()}

    good = df.where(F.col("reason").isNull()).withColumn("_hash", content_hash(settings.hash_algorithm))
    n_good = good.count()
    deduped = good.dropDuplicates(["_hash"]).drop("_hash", "_raw", "reason", "_user_known", "_item_known")
    deduped, imputed = impute(deduped.cache())
    clean = sessionize(deduped).withColumn("confidence", confidence())
    clean = temporal_split(clean, settings.test_fraction).select(*INTERACTIONS.names, "confidence", "split").cache()
    n_clean = clean.count()

    clean.drop("split").write.mode("overwrite").parquet(str(out_dir / "clean" / "interactions"))
    users.write.mode("overwrite").parquet(str(out_dir / "clean" / "users"))
    items.write.mode("overwrite").parquet(str(out_dir / "clean" / "items"))
    for part in ("train", "test"):
        clean.where(F.col("split") == part).drop("split").write.mode("overwrite").parquet(str(out_dir / "split" / part))
    split_counts = {r["split"]: int(r["count"]) for r in clean.groupBy("split").count().collect()}

    report = PreprocessReport(
        in_=n_in, clean=n_clean, duplicates=n_good - n_clean, quarantined=quarantined, imputed=imputed,
        users=users.count(), items=items.count(), train=split_counts.get("train", 0), test=split_counts.get("test", 0),
    )
    report.check()
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2, sort_keys=True))
    for frame in (df, clean, users, items, deduped):
        frame.unpersist()
    return report
