"""The drift stage of ``recsys_drift_monitor``: the batches landed since the last check
against the champion's training data, and the retraining decision.

Compared per feature (:mod:`monitoring.drift`): the numeric behaviour features (KS), the
categorical ones (device, event type, item category; ``drift.categorical_method``) and the
champion's own output (:func:`model_output`) on the batch against its own holdout.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from core.datasets import RawDataset
from core.run_context import RunContext
from core.settings import Settings
from monitoring.drift import CATEGORICAL_FEATURES, NUMERIC_FEATURES, detect_drift, drift_features
from monitoring.trigger import NO_BATCH, Decision, checked_batches, decide, record
from pipelines.landing import LandingError, LandingZone
from pipelines.split import load_split_part

log = logging.getLogger(__name__)

_COLUMNS = ["user_id", "item_id", "event_type", "device", "dwell_time_s", "scroll_depth", "rating", "timestamp"]
# items_per_user scales with the length of the window a batch covers, so comparing a
# batch with a whole training set would always flag it; it is not monitored here.
MONITORED_NUMERIC = (*(c for c in NUMERIC_FEATURES if c != "items_per_user"), "event_score")
MONITORED_CATEGORICAL = (*CATEGORICAL_FEATURES, "event_rank")
MIN_OVERLAP_ROWS = 1000
OUTPUT_EVENTS = 2000
"""Events per side whose champion output is compared (a seeded sample)."""


def reference_run_dir(settings: Settings) -> tuple[Path, int]:
    """The run directory that produced the current champion (MLflow tag ``hyperrec.run_dir``)
    and the champion's version."""
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
    return Path(run_dir), version


def _events(path: Path | list[Path]) -> pd.DataFrame:
    """Interaction rows of Parquet files, with the drift columns coerced (a landed batch is
    raw: a malformed value becomes null here, and preprocessing quarantines its row)."""
    paths = [str(p) for p in (path if isinstance(path, list) else [path])]
    frames = []
    for source in paths:
        dataset = ds.dataset(source, format="parquet")
        present = [c for c in _COLUMNS if c in dataset.schema.names]
        frames.append(dataset.to_table(columns=present).to_pandas())
    frame = pd.concat(frames, ignore_index=True)
    for column in ("dwell_time_s", "scroll_depth", "rating"):
        frame[column] = pd.to_numeric(frame.get(column), errors="coerce")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True, errors="coerce")
    for column in ("user_id", "item_id", "event_type", "device"):
        if column not in frame:
            frame[column] = None
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame.dropna(subset=["timestamp", "user_id"]).reset_index(drop=True)


def model_output(bundle, events: pd.DataFrame, *, seed: int = 0, max_events: int = OUTPUT_EVENTS) -> pd.DataFrame:
    """The champion's view of a seeded sample of ``events`` whose user and item it knows and
    whose item is not in the user's training history:
    ``event_score``, the model's score of the event's item for that user (standardized over
    the catalogue's scores for the user, so users are comparable), and ``event_rank``, where
    the model ranked that item (``top10``, ``top100`` or ``rest``). The user's input is their
    training history in the bundle, so on unseen events that behave as in training (the
    champion run's holdout) both keep their distribution, and a change in what users do
    shows as a change in how the model rates it."""
    known = events[events["user_id"].isin(list(bundle.history)) & events["item_id"].isin(list(bundle.item_index))]
    # Only items new to the user: a score of an item in the user's own history says nothing.
    seen = {(u, bundle.item_ids[i]) for u in known["user_id"].unique() for i in bundle.history[u]}
    known = known[[(u, i) not in seen for u, i in zip(known["user_id"], known["item_id"])]]
    out: dict[str, list] = {"event_score": [], "event_rank": []}
    if known.empty:
        return pd.DataFrame({"event_score": pd.Series(dtype=float), "event_rank": pd.Series(dtype=object)})
    sample = known.sample(n=min(max_events, len(known)), random_state=seed)
    for user, group in sample.groupby("user_id", sort=True):
        row = bundle.row(user, np.empty(0, dtype=np.int64))
        scores = np.asarray(bundle.model.score(row, [user]))[0].astype(float)
        mean, std = float(scores.mean()), float(scores.std()) or 1.0
        for item in group["item_id"]:
            value = scores[bundle.item_index[item]]
            rank = int((scores > value).sum())
            out["event_score"].append((value - mean) / std)
            out["event_rank"].append("top10" if rank < 10 else "top100" if rank < 100 else "rest")
    return pd.DataFrame(out)


def _with_output(features: pd.DataFrame, output: pd.DataFrame) -> pd.DataFrame:
    """``features`` with the model-output columns appended as rows of their own (each column
    is tested on its own non-null values, so the two parts need not align)."""
    out = pd.concat([features, output], ignore_index=True, sort=False)
    out["event_score"] = pd.to_numeric(out["event_score"], errors="coerce")
    return out


def _new_batches(settings: Settings, zone: LandingZone, current: str | None) -> tuple[list[str], list[Path], str]:
    """(batch names, interaction directories, where) of what this check compares."""
    if current:
        path = Path(current)
        if path.is_dir():  # an explicit raw dataset directory (hyperrec drift --current DIR)
            return [str(path.resolve())], [RawDataset(path).check().interactions], "param current"
        batch = zone.batch(current)
        return [batch.name], [zone.raw_dataset(batch, Path(tempfile.mkdtemp())).interactions], "param current"
    done = checked_batches(settings)
    new = [b for b in zone.batches() if b.name not in done]
    staging = Path(tempfile.mkdtemp(prefix="drift-batches-"))
    return [b.name for b in new], [zone.raw_dataset(b, staging).interactions for b in new], zone.uri


def check_drift(
    settings: Settings, run: RunContext, current: str | None = "", force: bool = False, airflow_run_id: str = ""
) -> dict:
    """Compare the batches landed since the last check (or the ``current`` batch: a batch
    name or a raw dataset directory) with the champion's clean training events, decide
    (:func:`monitoring.trigger.decide`), record the decision with its report in the
    decisions log and in MLflow (experiment ``<mlflow.experiment>-drift``), and return the
    summary; ``summary["retrain"]`` is true exactly for a ``retrain`` decision."""
    from training.registry import bundle_dir_of

    zone = LandingZone.of(settings)
    rejected = None
    try:
        claimed = [b.name for b in zone.claim_dropped()]
    except LandingError as exc:  # the good entries landed; the bad ones stay in incoming/
        log.error("%s", exc)
        claimed, rejected = [], str(exc)
    names, paths, where = _new_batches(settings, zone, current)
    now = datetime.now(UTC)
    base = {"landing": zone.uri, "claimed_dropped": claimed, "rejected_dropped": rejected, "batches": names}
    if not names:
        decision = Decision(
            NO_BATCH, f"nothing landed in {where} since the last check", now.isoformat(), airflow_run_id
        )
        record(settings, decision)
        summary = {**base, "decision": NO_BATCH, "reason": decision.reason, "retrain": False, "drifted": False}
        run.write_json("drift.json", summary)
        return summary

    reference_dir, champion = reference_run_dir(settings)
    reference_events = _events(reference_dir / "clean" / "interactions")
    recent_events = _events(paths)
    items = pd.read_parquet(reference_dir / "clean" / "items") if (reference_dir / "clean" / "items").exists() else None
    # Compare like with like: when the batch's users were in training, the reference is
    # their training events (a training set may mix populations, e.g. ml-100k + synthetic).
    same_users = reference_events[reference_events["user_id"].isin(set(recent_events["user_id"]))]
    restricted = len(same_users) >= MIN_OVERLAP_ROWS
    reference = same_users if restricted else reference_events
    from training.bundle import load_bundle

    with tempfile.TemporaryDirectory(prefix="drift-champion-") as tmp:
        bundle = load_bundle(bundle_dir_of(settings, champion, Path(tmp)))
    holdout = load_split_part(reference_dir / "split", "test", columns=["user_id", "item_id"])
    result = detect_drift(
        _with_output(drift_features(reference, items), model_output(bundle, holdout)),
        _with_output(drift_features(recent_events, items), model_output(bundle, recent_events)),
        out_dir=run.drift_dir,
        numeric=list(MONITORED_NUMERIC),
        categorical=list(MONITORED_CATEGORICAL),
        ks_threshold=settings.drift.ks_threshold,
        drift_share=settings.drift.drift_share,
        categorical_method=settings.drift.categorical_method,
        categorical_threshold=settings.drift.categorical_threshold,
    )
    action, reason = decide(settings, drifted=result.drifted, forced=force, now=now)
    drifted_columns = sorted(c for c, v in result.columns.items() if v["drifted"])
    decision = Decision(
        action,
        reason,
        now.isoformat(),
        airflow_run_id,
        batches=names,
        forced=force,
        drifted=result.drifted,
        report_html=str(result.html_path),
        report_json=str(result.json_path),
        drifted_columns=drifted_columns,
    )
    decision.mlflow_run_id = _log_to_mlflow(settings, decision, result, champion)
    record(settings, decision)
    summary = {
        **base,
        "decision": action,
        "reason": reason,
        "retrain": decision.retrain,
        "forced": force,
        "drifted": result.drifted,
        "share_drifted": result.share_drifted,
        "drifted_columns": drifted_columns,
        "columns": result.columns,
        "html_path": str(result.html_path),
        "json_path": str(result.json_path),
        "mlflow_run_id": decision.mlflow_run_id,
        "champion": champion,
        "reference": str(reference_dir),
        "current_rows": int(len(recent_events)),
        "reference_rows": int(len(reference)),
        "reference_restricted_to_batch_users": restricted,
    }
    run.write_json("drift.json", summary)
    return summary


def _log_to_mlflow(settings: Settings, decision: Decision, result, champion: int) -> str:
    """One MLflow run per drift check in ``<experiment>-drift``: the decision as tags, each
    column's p-value (or PSI) as a metric, the Evidently HTML and JSON as artifacts."""
    import mlflow

    from core.tracking import configure

    configure(settings, experiment=f"{settings.mlflow.experiment}-drift")
    with mlflow.start_run(run_name=f"drift {decision.at}") as mlrun:
        mlflow.set_tags(
            {
                "hyperrec.drift.decision": decision.action,
                "hyperrec.drift.reason": decision.reason,
                "hyperrec.drift.batches": ",".join(decision.batches)[:5000],
                "hyperrec.airflow_run_id": decision.airflow_run_id,
                "hyperrec.champion": str(champion),
            }
        )
        mlflow.log_metrics(
            {
                **{f"{col}.{v['method']}": float(v["score"]) for col, v in result.columns.items()},
                "share_drifted": float(result.share_drifted),
            }
        )
        mlflow.log_artifact(str(result.html_path), artifact_path="drift")
        mlflow.log_artifact(str(result.json_path), artifact_path="drift")
        return mlrun.info.run_id
