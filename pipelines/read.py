"""Read raw tables as CSV, JSON lines or Parquet, from a local path or ``s3://``.

Every schema column comes back as a string (missing columns as null) so that parsing,
and the quarantine of what does not parse, happens in one place
(:mod:`pipelines.preprocess`). Three extra columns travel with each row:

- ``_raw``: the record as it arrived (JSON of its fields, or the unparseable line);
- ``_corrupt``: true when the line itself could not be parsed (bad JSON, wrong
  number of CSV fields);
- ``_row``: increasing in file order (files in name order), for "first occurrence" rules.

S3 objects are staged to a local directory through boto3: Spark's s3a connector
needs Maven, which this project does not rely on.
"""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import urlparse

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.schemas import TableSchema

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
CORRUPT = "_corrupt_record"


def stage_s3(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """Download ``s3://bucket/key`` (one object) or ``s3://bucket/prefix/`` (every object
    under it) into ``dest``; return the local path standing for ``uri``."""
    import boto3

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    client = boto3.client("s3", endpoint_url=endpoint_url)
    dest.mkdir(parents=True, exist_ok=True)
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for obj in page.get("Contents", [])
        if not obj["Key"].endswith("/")
    ]
    if not keys:
        raise FileNotFoundError(f"nothing found at {uri}")
    if keys == [key]:  # a single object
        target = dest / Path(key).name
        client.download_file(bucket, key, str(target))
        return target
    root = dest / (Path(key.rstrip("/")).name or bucket)
    for k in keys:
        target = root / Path(k[len(key) :].lstrip("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, k, str(target))
    return root


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        if files:
            return files
    raise FileNotFoundError(f"no {'/'.join(sorted(FORMATS))} file at {path}")


def detect_format(path: Path) -> str:
    """``csv``, ``json`` or ``parquet`` from the file extension(s) under ``path``."""
    kinds = {FORMATS[f.suffix.lower()] for f in _files(path)}
    if len(kinds) != 1:
        raise ValueError(f"{path} mixes formats {sorted(kinds)}: give one format per table")
    return kinds.pop()


def _string_schema(names: list[str], list_columns: set[str]) -> T.StructType:
    """All-string read schema (list columns as array<string>) plus the corrupt-record column."""
    fields = [T.StructField(n, T.ArrayType(T.StringType()) if n in list_columns else T.StringType()) for n in names]
    return T.StructType([*fields, T.StructField(CORRUPT, T.StringType())])


def _csv_header(files: list[Path]) -> list[str]:
    headers = set()
    for f in files:
        with open(f, newline="", encoding="utf-8-sig") as fh:  # tolerate a BOM (Excel)
            headers.add(tuple(h.strip() for h in next(csv.reader(fh), [])))
    if len(headers) != 1:
        raise ValueError(f"CSV files disagree on their header: {sorted(headers)}")
    return list(headers.pop())


def _as_string(df: DataFrame, name: str, schema: TableSchema) -> Column:
    column = schema.columns[schema.names.index(name)]
    if name not in df.columns:
        return F.lit(None).cast(T.ArrayType(T.StringType()) if column.dtype == "string_list" else T.StringType())
    dtype = df.schema[name].dataType
    if column.dtype == "string_list":
        if isinstance(dtype, T.ArrayType):
            return F.col(name).cast(T.ArrayType(T.StringType()))
        # A delimited string ("a|b", "a;b", "a,b") becomes a list.
        return F.when(F.trim(F.col(name)) == "", F.array().cast("array<string>")).otherwise(
            F.split(F.col(name).cast("string"), r"\s*[|;,]\s*")
        )
    if isinstance(dtype, T.TimestampType):
        return F.date_format(name, "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX")
    return F.col(name).cast("string")


def read_raw_table(
    spark: SparkSession, path: str | Path, schema: TableSchema, staging_dir: Path, s3_endpoint_url: str | None = None
) -> DataFrame:
    """Read one raw table with every ``schema`` column as a string plus ``_raw`` and ``_corrupt``."""
    if str(path).startswith("s3://"):
        path = stage_s3(str(path), staging_dir / schema.name, s3_endpoint_url)
    path = Path(path)
    fmt = detect_format(path)
    files = [str(f) for f in _files(path)]
    if fmt == "parquet":
        df = spark.read.parquet(*files)
        raw = F.to_json(F.struct(*[F.col(c) for c in df.columns]))
        corrupt = F.lit(False)
    elif fmt == "csv":
        names = _csv_header([Path(f) for f in files])
        df = (
            spark.read.schema(_string_schema(names, set()))
            .option("header", True)
            .option("mode", "PERMISSIVE")
            .option("enforceSchema", True)
            .option("multiLine", True)  # RFC 4180: quoted fields may hold line breaks
            .option("columnNameOfCorruptRecord", CORRUPT)
            .csv(files)
        )
        raw = F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*[F.col(n) for n in names])))
        corrupt = F.col(CORRUPT).isNotNull()
    else:
        names = schema.names
        df = (
            spark.read.schema(_string_schema(names, {c.name for c in schema.columns if c.dtype == "string_list"}))
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .json(files)
        )
        raw = F.coalesce(F.col(CORRUPT), F.to_json(F.struct(*[F.col(n) for n in names])))
        corrupt = F.col(CORRUPT).isNotNull()
    return df.select(
        *[_as_string(df, n, schema).alias(n) for n in schema.names],
        raw.alias("_raw"),
        corrupt.alias("_corrupt"),
        F.monotonically_increasing_id().alias("_row"),
    )
