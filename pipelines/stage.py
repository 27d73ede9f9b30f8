"""Pipeline stages of ``recsys_training``: Spark preprocessing and the GX gates."""

from __future__ import annotations

from hyperrec.datasets import RawDataset
from hyperrec.run_context import RunContext
from hyperrec.schemas import INTERACTIONS
from hyperrec.settings import Settings
from pipelines.preprocess import preprocess as run_preprocess
from pipelines.spark import get_spark
from pipelines.validate import check_quarantine_share, validate_interactions, validate_items, validate_users


def preprocess(settings: Settings, run: RunContext) -> dict:
    """Clean, quarantine, dedup, impute and split ``run.raw_dir`` into the run directory."""
    report = run_preprocess(get_spark(settings), RawDataset(run.raw_dir), run.root, settings.preprocess)
    return report.to_json()


def validate(settings: Settings, run: RunContext) -> dict:
    """Gate the run: GX suites on the clean tables, then the quarantined share.

    Data Docs are rendered into ``run.gx_dir`` whether the gates pass or fail.
    """
    report = run.read_json("report.json")
    spark = get_spark(settings)
    users = spark.read.parquet(str(run.clean_dir / "users"))
    items = spark.read.parquet(str(run.clean_dir / "items"))
    interactions = spark.read.parquet(str(run.clean_dir / "interactions")).select(*INTERACTIONS.names)
    results = [
        validate_users(users, stage="clean", docs_dir=run.gx_dir),
        validate_items(items, stage="clean", docs_dir=run.gx_dir),
        validate_interactions(
            interactions, stage="clean", docs_dir=run.gx_dir,
            known_users=[r.user_id for r in users.select("user_id").collect()],
            known_items=[r.item_id for r in items.select("item_id").collect()],
            unique_key=list(INTERACTIONS.key),
        ),
    ]
    check_quarantine_share({"in": report["in"], "quarantined": report["quarantined_total"]}, settings.validation.max_quarantine_fraction)
    summary = {
        "quarantine_share": report["quarantined_total"] / report["in"] if report["in"] else 0.0,
        "gates": {f"{r.stage}:{i}": {"success": r.success, "evaluated": r.evaluated, "rows": r.row_count} for i, r in enumerate(results)},
        "data_docs": str(results[-1].docs_index) if results[-1].docs_index else None,
    }
    run.write_json("validation.json", summary)
    return summary
