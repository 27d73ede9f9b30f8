"""Great Expectations quality gates on Spark DataFrames (GX 1.x API).

Each gate builds an expectation suite ``<table>_<stage>`` for one table, runs it through a
checkpoint against an in-memory Spark DataFrame and renders Data Docs into ``docs_dir``
(pass or fail). A failed gate raises :class:`ValidationFailed` naming every failed
expectation, its column and arguments, and how many rows failed out of how many.

GX's stores (suites, validation results, checkpoints) live in ``<docs_dir.parent>/.gx``, so
the Data Docs index of one run lists every gate that wrote into the same ``docs_dir``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import great_expectations as gx
import great_expectations.expectations as gxe
from great_expectations.checkpoint import UpdateDataDocsAction
from great_expectations.data_context.types.base import (
    DataContextConfig,
    FilesystemStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.row_conditions import Column as RowColumn

from core.errors import DataQualityError
from core.schemas import (
    DEVICES,
    EVENT_TYPES,
    INTERACTIONS,
    ITEMS,
    RATING_MAX,
    RATING_MIN,
    USERS,
    TableSchema,
)

if TYPE_CHECKING:  # pragma: no cover
    from great_expectations.core.expectation_validation_result import ExpectationValidationResult
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation
    from pyspark.sql import DataFrame

_SITE = "local_site"
_DATASOURCE = "hyperrec_spark"
_MAX_SHOWN_VALUES = 10  # a value_set longer than this is summarised in messages
_MAX_SAMPLES = 5  # unexpected values kept per failed expectation
_MAX_REASONS = 10  # quarantine reasons listed in a failed quarantine gate
_SHARE_TOLERANCE = 1e-9  # float slack on the upper bound of share/affinity features

EXPLICIT_EVENT_TYPE = "rate"
# Rows that can carry implicit signals (dwell_time_s, scroll_depth): every event but an
# explicit rating, which has none by nature (the same split as preprocessing's imputation).
IMPLICIT_EVENTS = RowColumn("event_type") != EXPLICIT_EVENT_TYPE
NOT_APPLICABLE_META = "hyperrec_not_applicable"

QUARANTINE_TABLE = "quarantine"
FEATURES_TABLE = "user_features"

logging.getLogger("great_expectations").setLevel(logging.WARNING)


class ValidationFailed(DataQualityError):
    """A quality gate failed.

    ``results`` holds one dict per failed expectation with keys ``expectation`` (GX type),
    ``column`` (or None), ``kwargs``, ``unexpected_count`` and ``element_count`` (None for
    table-level expectations) and ``details`` (observed value, sample of unexpected values,
    or the raised exception).
    """

    def __init__(self, message: str, results: list[dict] | None = None) -> None:
        super().__init__(message)
        self.results: list[dict] = list(results or [])


@dataclass
class GateResult:
    """Outcome of one gate: ``evaluated`` expectations ran, ``failed`` lists the failures
    (same dicts as :attr:`ValidationFailed.results`), ``docs_index`` is the Data Docs index,
    ``not_applicable`` the checks this batch could not carry (each a dict with ``reason``
    and ``expectations``; see :func:`interactions_expectations`), recorded in the suite
    and the Data Docs in place of the checks themselves."""

    table: str
    stage: str
    success: bool
    evaluated: int
    failed: list[dict]
    docs_index: Path | None
    row_count: int
    not_applicable: list[dict] = field(default_factory=list)

    @property
    def suite(self) -> str:
        return f"{self.table}_{self.stage}"


# ---------------------------------------------------------------- suites


def _row_count_positive() -> Expectation:
    return gxe.ExpectTableRowCountToBeBetween(min_value=1)


def _schema(schema: TableSchema) -> Expectation:
    return gxe.ExpectTableColumnsToMatchSet(column_set=schema.names, exact_match=True)


def _key_unique_not_null(column: str) -> list[Expectation]:
    return [gxe.ExpectColumnValuesToNotBeNull(column=column), gxe.ExpectColumnValuesToBeUnique(column=column)]


def interactions_expectations(
    known_users: Sequence[str] | None = None,
    known_items: Sequence[str] | None = None,
    unique_key: Sequence[str] | None = None,
    *,
    row_count_between: tuple[int, int] | None = None,
    dwell_mean_between: tuple[float, float] | None = None,
    scroll_mean_between: tuple[float, float] | None = None,
    implicit_events: bool = True,
) -> list[Expectation]:
    """The interactions suite. Nullable columns (rating, device, ...) are checked on their
    non-null values only (GX ignores nulls in value expectations and means).

    ``row_count_between`` bounds the row count (inclusive), ``dwell_mean_between`` and
    ``scroll_mean_between`` the means of ``dwell_time_s`` and ``scroll_depth`` over the
    implicit events (``event_type != "rate"``: explicit ratings carry no implicit signals).
    When the feed has no implicit events (``implicit_events=False``, e.g. MovieLens
    ratings alone) the mean checks are not applicable: they are replaced by one
    expectation that the feed indeed has no implicit event, whose description (shown in
    the Data Docs) and ``meta[NOT_APPLICABLE_META]`` name the checks left out and why."""
    expectations: list[Expectation] = [
        _row_count_positive(),
        _schema(INTERACTIONS),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "item_id", "event_type", "timestamp")),
        gxe.ExpectColumnValuesToBeInSet(column="event_type", value_set=list(EVENT_TYPES)),
        gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=RATING_MIN, max_value=RATING_MAX),
        gxe.ExpectColumnValuesToBeBetween(column="scroll_depth", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeBetween(column="dwell_time_s", min_value=0.0),
        gxe.ExpectColumnValuesToBeInSet(column="device", value_set=list(DEVICES)),
    ]
    if known_users is not None:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="user_id", value_set=sorted(set(known_users))))
    if known_items is not None:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=sorted(set(known_items))))
    if unique_key:
        expectations.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=list(unique_key)))
    if row_count_between is not None:
        low, high = row_count_between
        expectations.append(gxe.ExpectTableRowCountToBeBetween(min_value=low, max_value=high))
    means = [
        gxe.ExpectColumnMeanToBeBetween(
            column=column, min_value=bounds[0], max_value=bounds[1], row_condition=IMPLICIT_EVENTS
        )
        for column, bounds in (("dwell_time_s", dwell_mean_between), ("scroll_depth", scroll_mean_between))
        if bounds is not None
    ]
    if means and not implicit_events:
        expectations.append(_no_implicit_events(means))
    else:
        expectations.extend(means)
    return expectations


def _no_implicit_events(skipped: list[Expectation]) -> Expectation:
    """What stands in for the implicit-signal mean checks ``skipped`` on a feed without
    implicit events: an expectation that the feed has none (so the record is checked, not
    just asserted), saying in the Data Docs which checks were not applicable and why."""
    left_out = [
        {"expectation": e.expectation_type, "column": e.column, "min_value": e.min_value, "max_value": e.max_value}
        for e in skipped
    ]
    names = " and ".join(f"the mean of {e['column']} in [{e['min_value']}, {e['max_value']}]" for e in left_out)
    reason = (
        f"Not applicable: {names}. The feed has no implicit events (every event is an explicit "
        f"'{EXPLICIT_EVENT_TYPE}' rating), and explicit ratings carry no implicit signals by nature."
    )
    return gxe.ExpectTableRowCountToBeBetween(
        min_value=0,
        max_value=0,
        row_condition=IMPLICIT_EVENTS,
        description=f"{reason} Checked: the feed has 0 implicit events.",
        notes=reason,
        meta={NOT_APPLICABLE_META: {"reason": "no implicit events", "expectations": left_out}},
    )


def users_expectations() -> list[Expectation]:
    """The users suite: user_id present and unique, age within [0, 120]."""
    return [
        _row_count_positive(),
        *_key_unique_not_null("user_id"),
        gxe.ExpectColumnValuesToBeBetween(column="age", min_value=0, max_value=120),
    ]


def items_expectations() -> list[Expectation]:
    """The items suite: item_id present and unique, title present."""
    return [
        _row_count_positive(),
        *_key_unique_not_null("item_id"),
        gxe.ExpectColumnValuesToNotBeNull(column="title"),
    ]


def quarantine_expectations(max_fraction: float) -> list[Expectation]:
    """The quarantine suite over one ``reason`` column (null for a kept row): at least one
    row, and at most ``max_fraction`` of the rows carry a reason."""
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"max_fraction must lie in [0, 1], got {max_fraction}")
    return [
        _row_count_positive(),
        gxe.ExpectColumnValuesToBeNull(column="reason", mostly=1.0 - max_fraction),
    ]


def is_share_feature(column: str) -> bool:
    """A share/affinity feature: name starts with ``cat_`` or ``share_``; values in [0, 1]."""
    return column.startswith(("cat_", "share_"))


def is_count_feature(column: str) -> bool:
    """A count, windowed aggregate or decayed sum: name ends with ``_1d``/``_7d``/``_30d``/
    ``_total`` or starts with ``decayed_``; values >= 0."""
    return column.endswith(("_1d", "_7d", "_30d", "_total")) or column.startswith("decayed_")


def features_expectations(columns: Sequence[str]) -> list[Expectation]:
    """The user-profile suite, built from the table's ``columns``: ``user_id`` present and
    unique, at least one row, share features within [0, 1 + 1e-9], count features >= 0."""
    if "user_id" not in columns:
        raise ValueError(f"user feature table has no user_id column (columns: {list(columns)})")
    expectations: list[Expectation] = [_row_count_positive(), *_key_unique_not_null("user_id")]
    for column in columns:
        if is_share_feature(column):
            expectations.append(
                gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0.0, max_value=1.0 + _SHARE_TOLERANCE)
            )
        elif is_count_feature(column):
            expectations.append(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0.0))
    return expectations


def row_count_bounds(previous: int | None, tolerance: float) -> tuple[int, int] | None:
    """Row-count bounds for a run given the ``previous`` run's count: ``None`` without a
    previous count, else ``(floor(previous * (1 - tolerance)), ceil(previous * (1 + tolerance)))``
    (the lower bound clipped at 0). The products are rounded to 9 decimals first so float
    noise (``100 * 1.1 == 110.00000000000001``) does not widen the bounds."""
    if previous is None:
        return None
    if previous < 0 or tolerance < 0:
        raise ValueError(f"row_count_bounds needs previous >= 0 and tolerance >= 0, got {previous}, {tolerance}")
    low = math.floor(round(previous * (1 - tolerance), 9))
    high = math.ceil(round(previous * (1 + tolerance), 9))
    return max(0, low), high


# ---------------------------------------------------------------- running


def _context(docs_dir: Path) -> AbstractDataContext:
    """An ephemeral GX context: no analytics, no progress bars, filesystem stores under
    ``docs_dir.parent/.gx`` and one local Data Docs site rooted at ``docs_dir``."""
    config = DataContextConfig(
        store_backend_defaults=FilesystemStoreBackendDefaults(root_directory=str(docs_dir.parent / ".gx")),
        data_docs_sites={
            _SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _describe_kwargs(kwargs: dict[str, Any]) -> str:
    parts = []
    for key, value in kwargs.items():
        if key in ("column", "batch_id") or value is None:
            continue
        if isinstance(value, (list, tuple, set)) and len(value) > _MAX_SHOWN_VALUES:
            value = f"<{len(value)} values>"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _failure(result: ExpectationValidationResult) -> dict:
    """One failed expectation as a plain dict (see :class:`ValidationFailed`)."""
    config = result.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k != "batch_id"}
    outcome = dict(result.result or {})
    details: dict[str, Any] = {}
    for key in ("observed_value", "details"):
        if outcome.get(key) is not None:
            details[key] = outcome[key]
    if outcome.get("partial_unexpected_list"):
        details["unexpected_sample"] = list(outcome["partial_unexpected_list"])[:_MAX_SAMPLES]
    info = result.exception_info or {}
    if info.get("raised_exception"):
        details["exception"] = info.get("exception_message")
    return {
        "expectation": config.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "unexpected_count": outcome.get("unexpected_count"),
        "element_count": outcome.get("element_count"),
        "details": details,
    }


def _failure_line(failure: dict) -> str:
    column = f" on column '{failure['column']}'" if failure["column"] else ""
    line = f"{failure['expectation']}{column} ({_describe_kwargs(failure['kwargs'])})"
    if failure["unexpected_count"] is not None:
        line += f": {failure['unexpected_count']} of {failure['element_count']} rows failed"
    details = failure["details"]
    if "unexpected_sample" in details:
        line += f", e.g. {details['unexpected_sample']}"
    elif "exception" in details:
        line += f": error {details['exception']}"
    elif "observed_value" in details:
        line += f": observed {details['observed_value']}"
    return line


def failure_message(table: str, stage: str, failed: list[dict], evaluated: int) -> str:
    """The text of a :class:`ValidationFailed`: one line per failed expectation."""
    lines = [f"{table}_{stage}: {len(failed)} of {evaluated} expectations failed"]
    lines += [f"  - {_failure_line(f)}" for f in failed]
    return "\n".join(lines)


def _row_count(results: list[ExpectationValidationResult]) -> int:
    for result in results:
        config = result.expectation_config
        if config.type == "expect_table_row_count_to_be_between" and not config.kwargs.get("row_condition"):
            observed = (result.result or {}).get("observed_value")
            if observed is not None:
                return int(observed)
    return -1


def run_suite(
    df: DataFrame,
    *,
    table: str,
    stage: str,
    expectations: list[Expectation],
    docs_dir: Path,
    raise_on_failure: bool = True,
) -> GateResult:
    """Validate ``df`` against ``expectations`` as suite ``<table>_<stage>`` through a
    checkpoint that renders Data Docs into ``docs_dir``; raise :class:`ValidationFailed`
    on failure when ``raise_on_failure``."""
    docs_dir = Path(docs_dir).resolve()
    docs_dir.mkdir(parents=True, exist_ok=True)
    name = f"{table}_{stage}"
    context = _context(docs_dir)

    asset = context.data_sources.add_spark(name=_DATASOURCE).add_dataframe_asset(name=table)
    batch_definition = asset.add_batch_definition_whole_dataframe(name)
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch_definition, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=name,
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[_SITE])],
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": _MAX_SAMPLES},
        )
    )

    was_cached = df.is_cached
    try:
        outcome = checkpoint.run(batch_parameters={"dataframe": df})
    finally:
        if not was_cached:  # GX persists the batch DataFrame; release it again
            df.unpersist()

    results = [r for run in outcome.run_results.values() for r in run.results]
    failed = [_failure(r) for r in results if not r.success]
    index = docs_dir / "index.html"
    gate = GateResult(
        table=table,
        stage=stage,
        success=bool(outcome.success),
        evaluated=len(results),
        failed=failed,
        docs_index=index if index.exists() else None,
        row_count=_row_count(results),
        not_applicable=[
            dict(r.expectation_config.meta[NOT_APPLICABLE_META])
            for r in results
            if r.success and NOT_APPLICABLE_META in (r.expectation_config.meta or {})
        ],
    )
    if not gate.success and raise_on_failure:
        raise ValidationFailed(failure_message(table, stage, failed, len(results)), failed)
    return gate


# ---------------------------------------------------------------- public gates


def validate_interactions(
    df: DataFrame,
    *,
    stage: str,
    docs_dir: Path,
    known_users: list[str] | None = None,
    known_items: list[str] | None = None,
    unique_key: list[str] | None = None,
    row_count_between: tuple[int, int] | None = None,
    dwell_mean_between: tuple[float, float] | None = None,
    scroll_mean_between: tuple[float, float] | None = None,
    raise_on_failure: bool = True,
) -> GateResult:
    """Gate cleaned interactions (schema ``INTERACTIONS``); ``known_users``/``known_items``
    add referential integrity checks, ``unique_key`` a compound uniqueness check,
    ``row_count_between`` and ``dwell_mean_between``/``scroll_mean_between`` inclusive
    bounds on the row count and on the column means over implicit events (nulls ignored).
    On a feed without implicit events the mean checks are not applicable and recorded so
    (:attr:`GateResult.not_applicable`, the Data Docs) instead of failing."""
    means = dwell_mean_between is not None or scroll_mean_between is not None
    expectations = interactions_expectations(
        known_users,
        known_items,
        unique_key,
        row_count_between=row_count_between,
        dwell_mean_between=dwell_mean_between,
        scroll_mean_between=scroll_mean_between,
        implicit_events=has_implicit_events(df) if means else True,
    )
    return run_suite(
        df,
        table=INTERACTIONS.name,
        stage=stage,
        expectations=expectations,
        docs_dir=docs_dir,
        raise_on_failure=raise_on_failure,
    )


def has_implicit_events(df: DataFrame) -> bool:
    """Whether ``df`` holds at least one implicit event (``event_type`` other than ``rate``)."""
    from pyspark.sql import functions as F

    if "event_type" not in df.columns:  # the schema check fails the gate; let the means run too
        return True
    return bool(df.where(F.col("event_type") != EXPLICIT_EVENT_TYPE).limit(1).count())


def validate_users(df: DataFrame, *, stage: str, docs_dir: Path, raise_on_failure: bool = True) -> GateResult:
    """Gate the users table (schema ``USERS``)."""
    return run_suite(
        df,
        table=USERS.name,
        stage=stage,
        expectations=users_expectations(),
        docs_dir=docs_dir,
        raise_on_failure=raise_on_failure,
    )


def validate_items(df: DataFrame, *, stage: str, docs_dir: Path, raise_on_failure: bool = True) -> GateResult:
    """Gate the items table (schema ``ITEMS``)."""
    return run_suite(
        df,
        table=ITEMS.name,
        stage=stage,
        expectations=items_expectations(),
        docs_dir=docs_dir,
        raise_on_failure=raise_on_failure,
    )


def _reason_counts(df: DataFrame, limit: int = _MAX_REASONS) -> dict[str, int]:
    """The ``limit`` most frequent non-null ``reason`` values with their row counts,
    most frequent first (ties by reason)."""
    from pyspark.sql import functions as F

    rows = (
        df.where(F.col("reason").isNotNull())
        .groupBy("reason")
        .count()
        .orderBy(F.col("count").desc(), F.col("reason"))
        .limit(limit)
        .collect()
    )
    return {row["reason"]: int(row["count"]) for row in rows}


def validate_quarantine(
    df: DataFrame,
    *,
    stage: str,
    docs_dir: Path,
    max_fraction: float,
    raise_on_failure: bool = True,
) -> GateResult:
    """Gate the quarantine share as suite ``quarantine_<stage>``. ``df`` has one string
    column ``reason``: null for a kept row, the quarantine reason for a quarantined one.
    Fails when more than ``max_fraction`` of the rows carry a reason (or ``df`` is empty);
    the failure's ``details["reason_counts"]`` and the message list the top reasons with
    their row counts."""
    gate = run_suite(
        df,
        table=QUARANTINE_TABLE,
        stage=stage,
        expectations=quarantine_expectations(max_fraction),
        docs_dir=docs_dir,
        raise_on_failure=False,
    )
    if gate.success:
        return gate
    for failure in gate.failed:
        if failure["expectation"] == "expect_column_values_to_be_null" and "exception" not in failure["details"]:
            failure["details"]["reason_counts"] = _reason_counts(df)
    if raise_on_failure:
        message = failure_message(QUARANTINE_TABLE, stage, gate.failed, gate.evaluated)
        for failure in gate.failed:
            counts = failure["details"].get("reason_counts")
            if counts:
                message += "\n  reasons: " + ", ".join(f"{reason}={n}" for reason, n in counts.items())
        raise ValidationFailed(message, gate.failed)
    return gate


def validate_features(df: DataFrame, *, stage: str, docs_dir: Path, raise_on_failure: bool = True) -> GateResult:
    """Gate the user profile table as suite ``user_features_<stage>``; the expectations
    follow the table's columns (see :func:`features_expectations`)."""
    return run_suite(
        df,
        table=FEATURES_TABLE,
        stage=stage,
        expectations=features_expectations(df.columns),
        docs_dir=docs_dir,
        raise_on_failure=raise_on_failure,
    )
