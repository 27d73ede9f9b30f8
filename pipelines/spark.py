"""The one Spark session of a process, configured from settings."""

from __future__ import annotations

import threading

from pyspark.sql import SparkSession

from core.settings import Settings

_lock = threading.Lock()


def get_spark(settings: Settings) -> SparkSession:
    """Return the process-wide Spark session, creating it on first use.

    Timestamps are handled in UTC; the master URL and sizes come from ``settings.spark``.
    """
    with _lock:
        active = SparkSession.getActiveSession()
        if active is not None:
            return active
        builder = (
            SparkSession.builder.appName("hyperrec")
            .master(settings.spark.master)
            .config("spark.driver.memory", settings.spark.driver_memory)
            .config("spark.sql.shuffle.partitions", str(settings.spark.shuffle_partitions))
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            # pandas writes nanosecond timestamps; read them as epoch numbers and parse.
            .config("spark.sql.legacy.parquet.nanosAsLong", "true")
            # -Xss16m: deep task graphs (ALS without checkpoints) overflow the 1 MiB default stack.
            .config("spark.driver.extraJavaOptions", "-Duser.timezone=UTC -Xss16m")
            .config("spark.executor.extraJavaOptions", "-Duser.timezone=UTC -Xss16m")
            .config("spark.sql.warehouse.dir", str(settings.home / "spark-warehouse"))
        )
        if settings.spark.master.startswith("local"):
            # Local mode: keep the driver on loopback; cluster executors must reach it by name.
            builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        session = builder.getOrCreate()
        session.sparkContext.setLogLevel("ERROR")
        return session
