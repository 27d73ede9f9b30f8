"""The drift stage of ``recsys_drift_monitor``: recent events against the champion's
training data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds

from core.datasets import RawDataset
from core.run_context import RunContext
from core.settings import Settings
from monitoring.drift import DRIFT_FEATURES, detect_drift, drift_features
from monitoring.trigger import should_retrain

_COLUMNS = ["user_id", "dwell_time_s", "scroll_depth", "rating", "timestamp"]
# items_per_user scales with the length of the window a batch covers, so comparing a
# batch with a whole training set would always flag it; it is not monitored here.
MONITORED_FEATURES = tuple(c for c in DRIFT_FEATURES if c != "items_per_user")
MIN_OVERLAP_ROWS = 1000


def reference_run_dir(settings: Settings) -> Path:
    """The run directory that produced the current champion (MLflow tag ``hyperrec.run_dir``)."""
    from mlflow import MlflowClient

    from training import registry

    version = registry.champion_version(settings)
    if version is None:
        raise LookupError("no champion model yet: run recsys_training first (e.g. `make demo`)")
    client = MlflowClient()
    mv = client.get_model_version(settings.mlflow.registered_model, str(version))
    run_dir = client.get_run(mv.run_id).data.tags.get("hyperrec.run_dir")
    if not run_dir or not Path(run_dir).exists():
        raise LookupError(
            f"champion v{version} has no run directory on this machine (tag hyperrec.run_dir={run_dir!r})"
        )
    return Path(run_dir)


def _events(path: Path) -> pd.DataFrame:
    return ds.dataset(str(path), format="parquet").to_table(columns=_COLUMNS).to_pandas()


NO_CURRENT_BATCH = "no current batch: the 'current' param is empty and there is no new data to check"


def resolve_current_batch(settings: Settings, current: str | None) -> Path | None:
    """The raw dataset directory holding the batch to check, or ``None`` when there is none.

    Today the batch is the ``current`` param (a scheduled run passes ``""``: no batch).
    This is where a landing zone of new data would be looked up when no batch is named.
    """
    return Path(current) if current else None


def check_drift(settings: Settings, run: RunContext, current: str | None = "") -> dict:
    """KS drift of :data:`DRIFT_FEATURES` between the champion's clean training events
    and the raw events of the current batch (:func:`resolve_current_batch`); reports go
    to ``run.drift_dir``. Without a current batch nothing is compared: the summary says
    ``{"retrain": False, "skipped": ...}`` and the run succeeds."""
    batch = resolve_current_batch(settings, current)
    if batch is None:
        summary = {"retrain": False, "drifted": False, "skipped": NO_CURRENT_BATCH, "current": None}
        run.write_json("drift.json", summary)
        return summary
    reference_dir = reference_run_dir(settings)
    reference_events = _events(reference_dir / "clean" / "interactions")
    recent_events = _events(RawDataset(batch).check().interactions)
    # Compare like with like: when the batch's users were in training, the reference is
    # their training events (a training set may mix populations, e.g. ml-100k + synthetic).
    same_users = reference_events[reference_events["user_id"].isin(set(recent_events["user_id"].dropna()))]
    restricted = len(same_users) >= MIN_OVERLAP_ROWS
    result = detect_drift(
        drift_features(same_users if restricted else reference_events),
        drift_features(recent_events),
        out_dir=run.drift_dir,
        ks_threshold=settings.drift.ks_threshold,
        drift_share=settings.drift.drift_share,
        columns=list(MONITORED_FEATURES),
    )
    summary = {
        "retrain": should_retrain(result),
        "drifted": result.drifted,
        "share_drifted": result.share_drifted,
        "columns": result.columns,
        "html_path": str(result.html_path),
        "json_path": str(result.json_path),
        "reference": str(reference_dir),
        "current": str(batch),
        "reference_rows": int(len(same_users) if restricted else len(reference_events)),
        "reference_restricted_to_batch_users": restricted,
    }
    run.write_json("drift.json", summary)
    return summary
