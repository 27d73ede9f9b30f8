"""The drift stage of recsys_drift_monitor before any comparison: which batches it checks
(those landed since the last check; dropped files claimed first), and "no new batch"."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import monitoring.stage as stage
from core.run_context import RunContext
from monitoring import trigger
from pipelines.landing import LandingZone


@pytest.fixture
def local(settings, tmp_path):
    """Settings with a home and a landing zone of this test's own."""
    return settings.model_copy(
        update={"home": tmp_path / "home", "landing": settings.landing.model_copy(update={"uri": str(tmp_path / "lz")})}
    )


def _run(path) -> RunContext:
    path.mkdir(parents=True, exist_ok=True)
    return RunContext.open(path)


def _no_champion(settings):
    raise AssertionError("a run without a batch must not look for the champion")


def _events(n: int = 5) -> pa.Table:
    return pa.Table.from_pandas(
        pd.DataFrame(
            {
                "user_id": ["u"] * n,
                "item_id": ["i"] * n,
                "event_type": ["click"] * n,
                "timestamp": pd.date_range("2026-11-01", periods=n, freq="h", tz="UTC"),
            }
        ),
        preserve_index=False,
    )


def test_nothing_landed_records_no_new_batch(local, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "reference_run_dir", _no_champion)
    run = _run(tmp_path / "run")
    summary = stage.check_drift(local, run, "", airflow_run_id="scheduled__1")
    assert (summary["decision"], summary["retrain"], summary["batches"]) == (trigger.NO_BATCH, False, [])
    assert run.read_json("drift.json") == summary
    assert not run.drift_dir.exists()  # no report: nothing was compared
    (recorded,) = trigger.read_decisions(local)
    assert recorded["action"] == trigger.NO_BATCH and recorded["airflow_run_id"] == "scheduled__1"


def test_only_batches_not_yet_checked_are_compared(local, tmp_path, monkeypatch):
    zone = LandingZone.of(local)
    old = zone.land_events(_events())
    trigger.record(
        local, trigger.Decision(trigger.NO_DRIFT, "calm", "2026-11-01T00:00:00+00:00", "r0", batches=[old.name])
    )
    new = zone.land_events(_events())
    dropped = tmp_path / "lz" / "incoming" / "late.parquet"
    dropped.parent.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(_events(3), dropped)
    compared = {}

    def champion_lookup(settings):
        compared["names"] = True
        raise LookupError("no champion")

    monkeypatch.setattr(stage, "reference_run_dir", champion_lookup)
    names, paths, where = stage._new_batches(local, zone, "")
    assert names == [new.name] and len(paths) == 1
    with pytest.raises(LookupError, match="no champion"):  # a new batch needs a champion to compare with
        stage.check_drift(local, _run(tmp_path / "run"), "")
    assert not dropped.exists()  # claimed into a batch first
    claimed = [b for b in zone.batches() if b.source == "dropped"]
    assert len(claimed) == 1 and claimed[0].rows == 3
    assert stage._new_batches(local, zone, "")[0] == [new.name, claimed[0].name]


def test_the_task_passes_its_params_and_logs_the_decision(local, monkeypatch):
    from airflow.sdk.execution_time.context import set_current_context

    from hyperrec import tasks

    seen = {}

    def check(settings, run, **kwargs):
        seen.update(kwargs)
        return {"decision": "no new batch", "reason": "nothing landed", "retrain": False, "batches": []}

    run_id = "scheduled__2026-01-01T01:00:00+00:00"
    params = {"current": None, "force": True}
    context = {"ti": SimpleNamespace(task_id="drift_report"), "run_id": run_id, "params": params}
    with set_current_context(context):
        report = tasks.check_drift(check)
    assert seen == {"current": "", "force": True, "airflow_run_id": run_id}
    assert report["decision"] == "no new batch"


def test_model_output_rates_only_items_new_to_a_known_user(tmp_path):
    from fixtures_serving import tiny_bundle

    from training.bundle import load_bundle

    bundle = load_bundle(tiny_bundle(tmp_path / "bundle"))
    user = next(iter(bundle.history))
    seen = {bundle.item_ids[i] for i in bundle.history[user]}
    new = [i for i in bundle.item_ids if i not in seen]
    events = pd.DataFrame(
        {
            "user_id": [user] * (len(seen) + len(new)) + ["stranger"],
            "item_id": [*sorted(seen), *new, new[0]],
        }
    )
    out = stage.model_output(bundle, events)
    assert len(out) == len(new)  # neither the user's own history nor an unknown user counts
    scores = np.asarray(bundle.model.score(bundle.row(user, np.empty(0, dtype=np.int64)), [user]))[0].astype(float)
    expected = sorted((scores[bundle.item_index[i]] - scores.mean()) / scores.std() for i in new)
    assert sorted(out["event_score"]) == pytest.approx(expected)
    assert set(out["event_rank"]) == {"top10"}  # a six-item catalogue
