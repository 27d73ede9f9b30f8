"""Read raw tables as CSV, JSON lines or Parquet, from a local path or ``s3://``.

Every schema column comes back as a string (missing columns as null) so that parsing,
and the quarantine of what does not parse, happens in one place
(:mod:`pipelines.preprocess`). Three extra columns travel with each row:

- ``_raw``: the record as it arrived (JSON of its fields, or the unparseable line);
- ``_corrupt``: true when the line itself could not be parsed (bad JSON, wrong
  number of CSV fields);
- ``_row``: increasing in file order (files in name order), for "first occurrence" rules;
- ``_undecodable``: true when the record held bytes that are not valid in the input
  encoding (they arrive as U+FFFD, the replacement character).

:func:`check_input` looks at every input file before Spark starts (exists, supported
format, not empty, text that decodes, the table's required columns present) and raises
:class:`core.errors.InputFileError` with one line naming the file and what is wrong.
Text in another encoding than UTF-8, or with undecodable bytes, is transcoded line by
line to a UTF-8 copy under the staging directory, so one bad record never rejects the
rest of its file.

S3 objects are staged to a local directory through boto3: Spark's s3a connector
needs Maven, which this project does not rely on.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from urllib.parse import urlparse

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from core.errors import InputFileError
from core.schemas import TableSchema

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}
CORRUPT = "_corrupt_record"
REPLACEMENT = "\ufffd"
SNIFF_BYTES = 64 * 1024  # bytes of a text file looked at for binary content
JSON_SAMPLE_LINES = 1000  # JSON lines looked at for the table's keys


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


def _supported() -> str:
    return ", ".join(sorted(FORMATS))


def _files(path: Path) -> list[Path]:
    """The input files at ``path`` (a file, or the supported files under a directory, in
    name order); zero-byte files in a directory are left out (they hold no record)."""
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise InputFileError(
                f"{path}: unsupported file type {path.suffix or '(none)'!r} (supported: {_supported()})"
            )
        if path.stat().st_size == 0:
            raise InputFileError(f"{path}: empty file (0 bytes): no header and no record")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS)
        non_empty = [p for p in files if p.stat().st_size > 0]
        if non_empty:
            return non_empty
        if files:
            raise InputFileError(f"{path}: every input file in this directory is empty (0 bytes)")
        raise InputFileError(f"{path}: no {_supported()} file in this directory")
    raise InputFileError(f"{path}: no such file or directory")


def detect_format(path: Path) -> str:
    """``csv``, ``json`` or ``parquet`` from the file extension(s) under ``path``."""
    kinds = {FORMATS[f.suffix.lower()] for f in _files(path)}
    if len(kinds) != 1:
        raise InputFileError(f"{path} mixes formats {sorted(kinds)}: give one format per table")
    return kinds.pop()


def _string_schema(names: list[str], list_columns: set[str]) -> T.StructType:
    """All-string read schema (list columns as array<string>) plus the corrupt-record column."""
    fields = [T.StructField(n, T.ArrayType(T.StringType()) if n in list_columns else T.StringType()) for n in names]
    return T.StructType([*fields, T.StructField(CORRUPT, T.StringType())])


def _sniff_text(path: Path, encoding: str) -> None:
    """Refuse a file that is not text in ``encoding``: NUL bytes (binary content, or
    UTF-16/32 read as a single-byte encoding) or mostly undecodable bytes."""
    head = path.read_bytes()[:SNIFF_BYTES] if path.stat().st_size <= SNIFF_BYTES else _head(path)
    wide = head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE))
    if wide and not codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        raise InputFileError(
            f"{path}: UTF-16/32 text, but preprocess.input_encoding is {encoding!r} (set it to utf-16 or utf-32)"
        )
    if wide:
        return
    text = head.decode(encoding, errors="replace")
    if "\x00" in text or text.count(REPLACEMENT) > max(16, len(text) // 10):
        raise InputFileError(f"{path}: binary content, not {path.suffix.lstrip('.').upper()} text in {encoding}")


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(SNIFF_BYTES)


def _text_lines(path: Path, encoding: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` lines of ``path`` decoded with ``encoding`` (undecodable bytes
    as U+FFFD, a leading BOM dropped)."""
    lines = []
    with open(path, encoding=encoding, errors="replace", newline="") as fh:
        for line in fh:
            lines.append(line.lstrip("\ufeff") if not lines else line)
            if limit is not None and len(lines) >= limit:
                break
    return lines


def _has_record(path: Path, encoding: str) -> bool:
    """Whether a CSV file has a non-blank line after its header."""
    with open(path, encoding=encoding, errors="replace", newline="") as fh:
        next(fh, None)
        return any(line.strip() for line in fh)


def _csv_header(files: list[Path], encoding: str = "utf-8", where: Path | None = None) -> list[str]:
    headers: dict[tuple[str, ...], Path] = {}
    for f in files:
        first = _text_lines(f, encoding, limit=1)
        headers.setdefault(tuple(h.strip() for h in next(csv.reader(io.StringIO(first[0] if first else "")), [])), f)
    if len(headers) != 1:
        described = "; ".join(f"{f.name}: {','.join(h)}" for h, f in headers.items())
        prefix = f"{where}: " if where is not None else ""
        raise InputFileError(f"{prefix}CSV files disagree on their header ({described}): give one header per table")
    return list(next(iter(headers)))


def _missing(path: Path, schema: TableSchema, columns: set[str], where: str) -> None:
    missing = [c for c in schema.required if c not in columns]
    if missing:
        found = ", ".join(sorted(columns)[:12]) or "none"
        raise InputFileError(
            f"{path}: {schema.name} needs column(s) {', '.join(missing)}, not in its {where} (found: {found})"
        )


def check_input(path: str | Path, schema: TableSchema, encoding: str = "utf-8") -> str:
    """Check the ``schema`` table at ``path`` before Spark reads it; return its format.

    Raises :class:`InputFileError` naming the file when ``path`` does not exist, holds no
    file of a supported format or mixes formats, a file is binary or not text in
    ``encoding``, the table holds no record, or a CSV header, the keys of the JSON lines
    (the first :data:`JSON_SAMPLE_LINES`) or a Parquet schema lack the table's required
    columns (for JSON lines: all of them; a record without some is quarantined).
    ``s3://`` inputs are checked after staging, by :func:`read_raw_table`.
    """
    if str(path).startswith("s3://"):
        return "s3"
    try:
        codecs.lookup(encoding)
    except LookupError as exc:
        raise InputFileError(f"preprocess.input_encoding: unknown encoding {encoding!r}") from exc
    path = Path(path)
    fmt = detect_format(path)
    files = _files(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = 0
        for f in files:
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as exc:  # pyarrow raises several types for a damaged file
                raise InputFileError(f"{f}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from exc
            _missing(f, schema, set(meta.schema.names), "Parquet schema")
            rows += meta.num_rows
        if rows == 0:
            raise InputFileError(f"{path}: the Parquet input holds no record")
        return fmt
    for f in files:
        _sniff_text(f, encoding)
    if fmt == "csv":
        header = _csv_header(files, encoding, path)
        _missing(files[0] if len(files) == 1 else path, schema, set(header), "CSV header")
        if not any(_has_record(f, encoding) for f in files):
            raise InputFileError(f"{path}: a CSV header but no record")
        return fmt
    keys: set[str] = set()
    objects = 0
    for f in files:
        for line in _text_lines(f, encoding, limit=JSON_SAMPLE_LINES):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                objects += 1
                keys.update(record)
    if objects == 0:
        raise InputFileError(f"{path}: no JSON object on its first {JSON_SAMPLE_LINES} lines: not JSON lines")
    if not keys & set(schema.required):
        _missing(path, schema, keys, "JSON records")
    return fmt


def _decodes(path: Path, encoding: str) -> bool:
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def as_utf8(files: list[Path], encoding: str, staging_dir: Path) -> list[Path]:
    """``files`` as UTF-8 for Spark: a file already valid UTF-8 as it is; any other (another
    ``encoding``, or undecodable bytes) transcoded line by line to a copy under
    ``staging_dir`` with each undecodable byte as U+FFFD."""
    utf8 = codecs.lookup(encoding).name == "utf-8"
    out = []
    for i, f in enumerate(files):
        if utf8 and _decodes(f, "utf-8"):
            out.append(f)
            continue
        target = staging_dir / f"{i:05d}-{f.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(f, encoding=encoding, errors="replace", newline="") as src,
            open(target, "w", encoding="utf-8", newline="") as dst,
        ):
            for line in src:
                dst.write(line)
        out.append(target)
    return out


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
    spark: SparkSession,
    path: str | Path,
    schema: TableSchema,
    staging_dir: Path,
    s3_endpoint_url: str | None = None,
    encoding: str = "utf-8",
) -> DataFrame:
    """Read one raw table with every ``schema`` column as a string plus ``_raw``,
    ``_corrupt``, ``_row`` and ``_undecodable`` (CSV and JSON lines decoded from ``encoding``)."""
    if str(path).startswith("s3://"):
        path = stage_s3(str(path), staging_dir / schema.name, s3_endpoint_url)
    path = Path(path)
    fmt = check_input(path, schema, encoding)
    files = [str(f) for f in _files(path)]
    if fmt != "parquet":
        files = [str(f) for f in as_utf8([Path(f) for f in files], encoding, staging_dir / f"{schema.name}-utf8")]
    if fmt == "parquet":
        df = spark.read.parquet(*files)
        raw = F.to_json(F.struct(*[F.col(c) for c in df.columns]))
        corrupt = F.lit(False)
    elif fmt == "csv":
        names = _csv_header([Path(f) for f in files])  # UTF-8 by now
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
        (F.lit(False) if fmt == "parquet" else F.coalesce(raw.contains(REPLACEMENT), F.lit(False))).alias(
            "_undecodable"
        ),
    )
