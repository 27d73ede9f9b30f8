"""Pipeline stages of ``recsys_training``: Spark preprocessing and the GX gates."""

from __future__ import annotations

import json

from pyspark.sql import functions as F

from core.datasets import RawDataset
from core.run_context import RunContext
from core.schemas import INTERACTIONS
from core.settings import Settings
from core.tracking import log_artifact_run
from pipelines.preprocess import preprocess as run_preprocess
from pipelines.spark import get_spark
from pipelines.validate import (
    ValidationFailed,
    failure_message,
    row_count_bounds,
    validate_interactions,
    validate_items,
    validate_quarantine,
    validate_users,
)


def preprocess(settings: Settings, run: RunContext) -> dict:
    """Clean, quarantine, dedup, impute and split ``run.raw_dir`` into the run directory."""
    raw = RawDataset(run.raw_dir).check()
    report = run_preprocess(
        get_spark(settings),
        raw.interactions,
        run.root,
        settings.preprocess,
        users=raw.users,
        items=raw.items,
        half_life_days=settings.features.half_life_days,
        s3_endpoint_url=settings.object_store.s3_endpoint_url,
    )
    return report.to_json()


def previous_clean_rows(settings: Settings, run: RunContext) -> int | None:
    """Clean interaction rows of the latest earlier run whose gates passed, if any."""
    earlier = (
        [
            d
            for d in settings.runs_dir.iterdir()
            if d.is_dir() and d != run.root and (d / "validation.json").exists() and (d / "report.json").exists()
        ]
        if settings.runs_dir.exists()
        else []
    )
    if not earlier:
        return None
    latest = max(earlier, key=lambda d: (d / "validation.json").stat().st_mtime)
    return int(json.loads((latest / "report.json").read_text())["clean"])


def validate(settings: Settings, run: RunContext) -> dict:
    """The GX checkpoints of the run, Data Docs in ``run.gx_dir`` pass or fail:

    - ``quarantine_raw``: the share of malformed raw rows stays within
      ``validation.max_quarantine_fraction``;
    - ``users_clean``, ``items_clean``: schema, ids, ranges;
    - ``interactions_clean``: schema, ids, allowed sets, ranges, uniqueness after dedup,
      referential integrity, row count against the previous run, dwell and scroll means.

    Every gate runs and the Data Docs are logged to MLflow (a run named
    ``<run_id>-validation``, pass or fail); then one :class:`ValidationFailed` names all
    failed expectations.
    """
    cfg = settings.validation
    spark = get_spark(settings)
    users = spark.read.parquet(str(run.clean_dir / "users"))
    items = spark.read.parquet(str(run.clean_dir / "items"))
    interactions = spark.read.parquet(str(run.clean_dir / "interactions")).select(*INTERACTIONS.names)
    reasons = interactions.select(F.lit(None).cast("string").alias("reason")).unionByName(
        spark.read.parquet(str(run.quarantine_dir / "interactions")).select("reason")
    )
    previous = previous_clean_rows(settings, run)
    gate = dict(docs_dir=run.gx_dir, raise_on_failure=False)
    results = [
        validate_quarantine(reasons, stage="raw", max_fraction=cfg.max_quarantine_fraction, **gate),
        validate_users(users, stage="clean", **gate),
        validate_items(items, stage="clean", **gate),
        validate_interactions(
            interactions,
            stage="clean",
            known_users=[r.user_id for r in users.select("user_id").collect()],
            known_items=[r.item_id for r in items.select("item_id").collect()],
            unique_key=list(INTERACTIONS.key),
            row_count_between=row_count_bounds(previous, cfg.row_count_tolerance),
            dwell_mean_between=cfg.dwell_mean_between,
            scroll_mean_between=cfg.scroll_mean_between,
            **gate,
        ),
    ]
    summary = {
        "gates": {
            r.suite: {
                "success": r.success,
                "evaluated": r.evaluated,
                "rows": r.row_count,
                "failed": len(r.failed),
                "not_applicable": r.not_applicable,
            }
            for r in results
        },
        "previous_clean_rows": previous,
        "data_docs": str(run.gx_dir / "index.html"),
    }
    summary["mlflow_run_id"] = log_artifact_run(
        settings,
        run_name=f"{run.run_id}-validation",
        artifact_dirs={"gx_data_docs": run.gx_dir},
        tags={
            "hyperrec.stage": "validate",
            "hyperrec.run_dir": str(run.root),
            "hyperrec.gates_passed": str(all(r.success for r in results)).lower(),
        },
    )
    run.write_json("validation-attempt.json", summary)
    failed = [r for r in results if not r.success]
    if failed:
        raise ValidationFailed(
            "\n".join(failure_message(r.table, r.stage, r.failed, r.evaluated) for r in failed),
            [f for r in failed for f in r.failed],
        )
    run.write_json("validation.json", summary)
    return summary
