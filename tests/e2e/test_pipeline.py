"""Both DAGs end to end through Airflow's ``dag.test()`` on a small synthetic platform."""

import json

import pytest
from fastapi.testclient import TestClient

from core.datasets.synthetic import generate
from core.run_context import RunContext
from hyperrec.orchestration import load_dags, run_dag, task_order, task_states

pytestmark = [pytest.mark.slow, pytest.mark.spark]


@pytest.fixture(scope="module")
def trained(settings, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    raw = generate(root / "raw", events=8000, seed=11, malformed_fraction=0.01, duplicate_fraction=0.01, progress=False)
    state, run_id = run_dag(settings, "recsys_training", {"dataset": str(raw.root), "synthetic_events": 0})
    manifest = json.loads((raw.ground_truth / "manifest.json").read_text())
    return state, RunContext.of_airflow_run(settings, run_id), manifest, root


def test_training_dag_succeeds(trained):
    state, run, _, _ = trained
    assert state == "success"
    assert set(run.read_json("timings.json")) == set(task_order(load_dags().dags["recsys_training"]))


def test_preprocess_counts_match_the_injected_dirt(trained):
    _, run, manifest, _ = trained
    report, counts = run.read_json("report.json"), manifest["counts"]
    assert report["in"] == counts["total_rows"]
    assert report["duplicates"] == counts["duplicates"]
    assert report["quarantined_total"] == counts["malformed_total"]
    assert report["clean"] == counts["good_events"]
    assert report["train"] + report["test"] == report["clean"]


def test_quality_gates_and_features_ran(trained):
    _, run, _, _ = trained
    validation = run.read_json("validation.json")
    assert all(g["success"] for g in validation["gates"].values())
    assert (run.gx_dir / "index.html").exists()
    import pandas as pd

    n_users = len(pd.read_parquet(run.clean_dir / "users"))
    assert run.read_json("features.json")["users"] == n_users
    segments = run.read_json("segments.json")
    assert segments["k"] >= 2 and sum(segments["sizes"]) == n_users


def test_models_are_evaluated_on_the_holdout_and_beat_popularity(trained):
    _, run, _, _ = trained
    evaluation = run.read_json("evaluation.json")
    k = evaluation["k"]
    models = evaluation["models"]
    assert {"popularity", "item_knn", "ease", "als", "content", "neural", "hybrid"} <= set(models)
    assert evaluation["best"] in {"ease", "item_knn", "hybrid"}
    assert models[evaluation["best"]][f"ndcg@{k}"] > models["popularity"][f"ndcg@{k}"]
    # Per segment, with the best-worst gap, and cold-start users apart.
    per = evaluation["segments"][evaluation["best"]]
    assert len(per["segments"]) >= 2 and per["gap"][f"ndcg@{k}"] == models[evaluation["best"]]["segment_gap"]
    assert "users" in evaluation["cold_start"]
    # Choices came from validation folds of train; per-segment tuning ran and logged its gains.
    selection, tuning = run.read_json("model_selection.json"), run.read_json("segment_tuning.json")
    assert selection["folds"] == 2 and selection["weights"]["ease"] == 1.0
    assert "skipped" in tuning or all({"segment", "gain", "kept"} <= set(r) for r in tuning["results"])
    # The segments validation kept are served: the neural and hybrid bundles carry their models.
    from training.bundle import load_bundle
    from training.candidates import NeuralScorer

    kept = set(tuning.get("kept", []))
    for name in ("neural", "hybrid"):  # the hybrid holds a neural component only if its blend weight is > 0
        bundle = load_bundle(run.models_dir / name)
        neural = [c for c in bundle.model.components.values() if isinstance(c, NeuralScorer)]
        assert len(neural) == (1 if name == "neural" else len(neural)) <= 1
        served = kept if neural else set()
        assert all(set(c.segment_models) == served for c in neural)
        assert set(bundle.metadata["segment_models"].get("segments", [])) == served
        assert (name in evaluation["segment_models"]) == bool(served)


def test_registered_promoted_published_and_served(trained, settings):
    _, run, _, _ = trained
    from serving.app import create_app
    from training.registry import champion_version

    registration, promotion, published = (
        run.read_json("registration.json"),
        run.read_json("promotion.json"),
        run.read_json("publish.json"),
    )
    assert registration["version"] >= 1
    assert promotion["promoted"] and champion_version(settings) == registration["version"]
    assert published["current"] == f"v{registration['version']}"
    import pandas as pd

    user = pd.read_parquet(run.split_dir / "train", columns=["user_id"])["user_id"].iloc[0]
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        body = client.get(f"/v1/recommendations/{user}", params={"k": 5}).json()
    assert body["model_version"] == published["current"] and len(body["items"]) == 5 and not body["cold_start"]
    # Publishing stored the ANN index serving would otherwise build; the worker read it.
    ann = [f for f in published["serving_extras"]["files"] if f.startswith("ann/")]
    if ready.json()["ann"] == "none":
        assert not ann
    else:
        assert ready.json()["ann_origin"] == "stored" and any(f.endswith("index.faiss") for f in ann)


def test_drift_monitor_requests_a_retrain_on_drift_only(trained, settings):
    """A batch of the same platform later in time retrains nothing; the same users drifting
    (device, time of day, tastes) make the monitor request a retrain through the asset that
    wakes recsys_training, with the batch and the report in the request."""
    from datetime import UTC, datetime

    from hyperrec.assets import RETRAIN_NAME
    from hyperrec.orchestration import asset_events

    _, _, _, root = trained
    same = {"events": 4000, "users": 160, "items": 80, "seed": 11, "progress": False}  # the trained platform's
    requests_before = len(asset_events(RETRAIN_NAME))
    calm = generate(root / "calm", start=datetime(2026, 3, 1, tzinfo=UTC), **same)
    state, run_id = run_dag(settings, "recsys_drift_monitor", {"current": str(calm.root)})
    assert state == "success"
    report = RunContext.of_airflow_run(settings, run_id).read_json("drift.json")
    assert report["decision"] == "no drift", report["drifted_columns"]
    assert task_states("recsys_drift_monitor", run_id)["retrain_request"] == "skipped"
    assert len(asset_events(RETRAIN_NAME)) == requests_before

    drifted = generate(root / "drifted", start=datetime(2026, 4, 1, tzinfo=UTC), drift=0.9, **same)
    state, run_id = run_dag(settings, "recsys_drift_monitor", {"current": str(drifted.root)})
    assert state == "success"
    drift_run = RunContext.of_airflow_run(settings, run_id)
    assert set(drift_run.read_json("timings.json")) == {"drift_report"}  # timed under its task id
    report = drift_run.read_json("drift.json")
    assert report["decision"] == "retrain" and report["share_drifted"] >= settings.drift.drift_share
    kinds = {c: v["kind"] for c, v in report["columns"].items()}
    assert {"device", "event_type", "category", "event_rank"} <= {c for c, k in kinds.items() if k == "categorical"}
    assert {"dwell_time_s", "event_score"} <= {c for c, k in kinds.items() if k == "numeric"}
    assert "device" in report["drifted_columns"] and report["html_path"].endswith(".html")
    assert task_states("recsys_drift_monitor", run_id)["retrain_request"] == "success"
    request = asset_events(RETRAIN_NAME)[-1]
    assert request["extra"]["reason"] == "drift" and request["extra"]["drift_report"] == report["json_path"]
    assert request["extra"]["batches"] == [str(drifted.root)]


def test_poisoned_feed_stops_at_the_gx_gate(settings, tmp_path, capfd):
    raw = generate(tmp_path / "poisoned", events=3000, seed=21, malformed_fraction=0.3 / 0.7, progress=False)
    state, run_id = run_dag(settings, "recsys_training", {"dataset": str(raw.root), "synthetic_events": 0})
    log = capfd.readouterr()
    assert state == "failed"
    states = task_states("recsys_training", run_id)
    assert states["preprocess"] == "success" and states["validate"] == "failed"
    assert states["build_features"] == "upstream_failed"
    report = RunContext.of_airflow_run(settings, run_id).read_json("report.json")
    assert report["quarantined_total"] / report["in"] == pytest.approx(0.3, abs=0.01)
    text = log.out + log.err
    assert "expect_column_values_to_be_null on column 'reason'" in text
    assert "quarantine_raw" in text
    run = RunContext.of_airflow_run(settings, run_id)
    assert (run.gx_dir / "index.html").exists()
    # The failed run's Data Docs still reach MLflow.
    from mlflow import MlflowClient

    from core.tracking import configure

    configure(settings)
    attempt = run.read_json("validation-attempt.json")
    artifacts = [a.path for a in MlflowClient().list_artifacts(attempt["mlflow_run_id"], "gx_data_docs")]
    assert "gx_data_docs/index.html" in artifacts
    assert MlflowClient().get_run(attempt["mlflow_run_id"]).data.tags["hyperrec.gates_passed"] == "false"
