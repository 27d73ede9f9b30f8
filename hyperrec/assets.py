"""The Airflow assets that close the loop. A landed batch updates :data:`LANDING_NAME`
(``hyperrec land``, the event-stream consumer), which wakes ``recsys_drift_monitor``; a
drift check that decides to retrain updates :data:`RETRAIN_NAME`, whose event carries the
batches and the report, and wakes ``recsys_training``. Both DAGs keep their cron schedules
too (:func:`schedule`)."""

from __future__ import annotations

from typing import Any

LANDING_NAME = "hyperrec_landing"
RETRAIN_NAME = "hyperrec_retrain_request"
_URIS = {LANDING_NAME: "x-hyperrec://landing", RETRAIN_NAME: "x-hyperrec://retrain-request"}


def asset(name: str) -> Any:
    """The :class:`airflow.sdk.Asset` called ``name`` (one of the names above)."""
    from airflow.sdk import Asset

    return Asset(name=name, uri=_URIS[name], group="hyperrec")


def schedule(cron: str | None, asset_name: str) -> Any:
    """Runs on the asset's events and, with ``cron``, also on that cron (an asset-triggered
    run has no logical date; a cron run has one)."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    if cron is None:
        return [asset(asset_name)]
    timetable = CronTriggerTimetable(cron, timezone="UTC", run_immediately=True)  # the latest missed slot runs
    return AssetOrTimeSchedule(timetable=timetable, assets=[asset(asset_name)])
