"""Warm-started training against the session's sqlite MLflow store: the choices a run
registers with its model are read back from the champion, a scheduled run reuses them
without searching and says so, and a drift-triggered or forced run searches.

The stages run on a hand-made run directory (a seeded 48-user × 24-item set in two user
segments, no Spark: the side data holds item categories only, so the neural model is the
one blend component) under a registered-model name of this module's own.
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from core.run_context import RunContext
from core.settings import ServingSettings, Settings
from feature_store.stage import SEGMENT_LABELS_FILE, SEGMENTS_DIR
from serving.publish import ServedPyfunc
from training import stage, warm_start
from training.candidates import category_multi_hot
from training.registry import champion_version

USERS, ITEMS, GROUPS = 48, 24, 2
SEGMENTATION = {"method": "kmeans", "k": GROUPS, "sizes": [USERS // GROUPS] * GROUPS}
PARAMS = {"dataset": "ml-100k", "synthetic_events": 0, "seed": 0}


def _frames(seed: int = 3) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """train, test (each user's last 2 events) and the catalogue: users of group g mostly
    consume the items of cluster g."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(USERS):
        g = u % GROUPS
        weights = np.where(np.arange(ITEMS) % GROUPS == g, 0.9, 0.1)
        items = rng.choice(ITEMS, size=10, replace=False, p=weights / weights.sum())
        rows += [(f"u{u:02d}", f"i{i:02d}", float(rng.uniform(0.4, 1.0)), t) for t, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "confidence", "t"])
    frame["timestamp"] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(frame.pop("t"), unit="h")
    test = frame.groupby("user_id").tail(2)
    catalogue = pd.DataFrame(
        {
            "item_id": [f"i{i:02d}" for i in range(ITEMS)],
            "title": [f"Item {i}" for i in range(ITEMS)],
            "categories": [[f"c{i % 3}"] for i in range(ITEMS)],
        }
    )
    return frame.drop(test.index), test, catalogue


TRAIN, TEST, CATALOGUE = _frames()


class Searched(Exception):
    """Raised by a stand-in for a search: the run searched."""


@pytest.fixture(scope="module")
def own(settings) -> Settings:
    mlflow = settings.mlflow.model_copy(update={"registered_model": f"test-warm-{uuid.uuid4().hex[:10]}"})
    return settings.model_copy(update={"mlflow": mlflow})


def _side_data(settings: Settings, run: RunContext, items: pd.DataFrame) -> dict:
    """Side data without Spark or content embeddings: ALS and content are not offered."""
    return {"item_categories": category_multi_hot(list(items["categories"]))}


@pytest.fixture(autouse=True)
def no_spark(monkeypatch):
    monkeypatch.setattr(stage, "side_data", _side_data)


def _run(settings: Settings, reason: str, **params) -> RunContext:
    run = RunContext.create(settings, f"warm-{reason}-{uuid.uuid4().hex[:8]}")
    for part, frame in (("train", TRAIN), ("test", TEST)):
        (run.split_dir / part).mkdir(parents=True)
        frame.to_parquet(run.split_dir / part / "part-0.parquet", index=False)
    (run.clean_dir / "items").mkdir(parents=True)
    CATALOGUE.to_parquet(run.clean_dir / "items" / "part-0.parquet", index=False)
    (run.features_dir / SEGMENTS_DIR).mkdir(parents=True)
    users = sorted(TRAIN["user_id"].unique())
    labels = pd.DataFrame({"user_id": users, "segment": [str(int(u[1:]) % GROUPS) for u in users]})
    labels.to_parquet(run.features_dir / SEGMENTS_DIR / SEGMENT_LABELS_FILE, index=False)
    run.write_json("segments.json", SEGMENTATION)
    run.write_json("params.json", PARAMS | {"reason": reason, **params})
    return run


def _train_and_promote(settings: Settings, run: RunContext) -> dict:
    """train → evaluate → register → promote, as the DAG chains them."""
    summary = stage.train(settings, run)
    stage.evaluate(settings, run)
    stage.register(settings, run, python_model=ServedPyfunc(ServingSettings()))
    stage.promote(settings, run)
    return summary


@pytest.fixture(scope="module")
def champion(own) -> RunContext:
    """A first scheduled run: no champion yet, so it searches, registers and is promoted."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage, "side_data", _side_data)
        run = _run(own, "scheduled")
        _train_and_promote(own, run)
    return run


def test_a_first_run_searches_and_its_choices_come_back_from_the_champion(own, champion):
    record = champion.read_json(warm_start.RECORD_FILE)
    assert (record["mode"], record["reason"], record["from_version"]) == ("searched", "no champion yet", None)
    assert record["choice"] == champion.read_json("model_selection.json")
    version, stored = warm_start.champion_record(own)
    assert version == champion_version(own) == champion.read_json("registration.json")["version"]
    assert stored == record


def _search(*args, **kwargs):
    raise Searched


def test_a_scheduled_run_reuses_the_champions_choices_without_searching(own, champion, monkeypatch):
    monkeypatch.setattr(stage, "tune_choice", _search)
    monkeypatch.setattr(stage, "tune_neural_segments", _search)
    run = _run(own, "scheduled")
    summary = _train_and_promote(own, run)
    first, version = champion.read_json(warm_start.RECORD_FILE), champion.read_json("registration.json")["version"]
    assert summary["search"] | {"reason": ""} == {
        "mode": "warm",
        "reason": "",
        "from_version": version,
        "searched_at": first["searched_at"],
        "segment_tuning": "reused",
    }
    assert f"v{version}" in summary["search"]["reason"]
    assert run.read_json("model_selection.json") == first["choice"] | {"seconds": 0.0}
    assert "results" in first["tuning"]  # the segment search ran on the first run
    assert run.read_json("segment_tuning.json") == first["tuning"] | {"reused_from": version}
    # The registered version says how its choices were made.
    registered = run.read_json("registration.json")["version"]
    tags = MlflowClient().get_model_version(own.mlflow.registered_model, str(registered)).tags
    assert tags["hyperrec.search.mode"] == "warm" and tags["hyperrec.search.from_version"] == str(version)
    assert tags["hyperrec.search.searched_at"] == first["searched_at"]


@pytest.mark.parametrize("params", [{"reason": "drift"}, {"reason": "manual", warm_start.FORCE_PARAM: True}])
def test_a_drift_triggered_or_forced_run_searches(own, champion, monkeypatch, params):
    monkeypatch.setattr(stage, "tune_neural_segments", _search)
    with pytest.raises(Searched):
        stage.train(own, _run(own, **params))
