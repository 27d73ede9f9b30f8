"""Registry review and crash-safe registration against the session's sqlite MLflow store:
a retried ``register`` leaves one version per pipeline run, the version description and
tags carry the gate's decision, and the run holds the review artifacts (metrics table,
loss curves, drift report).

Every test registers under a registered-model name of its own. The data is a seeded
40-user × 24-item set in four user groups, each preferring one item cluster.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import ViewType

from core.run_context import RunContext
from core.settings import ServingSettings, Settings
from core.tracking import configure
from serving import publish
from serving.publish import ServedPyfunc
from training import stage
from training.bundle import write_bundle
from training.candidates import NeuralScorer, as_blend
from training.evaluation import history_of
from training.models import InteractionMatrix, fit_ease, fit_popularity, popularity
from training.neural import NeuralConfig, NeuralData, NeuralRecommender, fit_neural, loss_curve
from training.registry import (
    ABANDONED_TAG,
    CHALLENGER,
    CHAMPION,
    DIGEST_TAG,
    RUN_DIR_TAG,
    STACK_TAG,
    bundle_digest,
    evaluate_bundle_on,
    log_and_register,
    promote_version,
    promotion_gate,
    rollback,
)

K = 10
USERS, PER_CLUSTER, GROUPS = 40, 6, 4
NEURAL = NeuralConfig(epochs=3, batch_size=16, embedding_dim=8, hidden=[16], seed=3)


def _interactions(seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows, segments = [], {}
    for u in range(USERS):
        g = u % GROUPS
        segments[f"u{u:02d}"] = "abcd"[g]
        weights = np.concatenate([np.full(PER_CLUSTER, 0.9 if c == g else 0.1 / 3) for c in range(GROUPS)])
        items = rng.choice(len(weights), size=8, replace=False, p=weights / weights.sum())
        held_out = set(rng.choice(8, size=2, replace=False).tolist())
        rows += [(f"u{u:02d}", f"i{i:02d}", j in held_out) for j, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "test"])
    return (
        frame[~frame.test].drop(columns="test").reset_index(drop=True),
        frame[frame.test].drop(columns="test").reset_index(drop=True),
        segments,
    )


TRAIN, TEST, SEGMENTS = _interactions()
ITEMS = np.array([f"i{i:02d}" for i in range(PER_CLUSTER * GROUPS)], dtype=object)


def _write(out: Path, name: str, model) -> Path:
    matrix = InteractionMatrix.from_frame(TRAIN, item_ids=ITEMS)
    return write_bundle(
        out / name,
        model=model,
        item_ids=matrix.item_ids,
        titles=[f"T {i}" for i in matrix.item_ids],
        categories=[[] for _ in matrix.item_ids],
        history=history_of(matrix),
        popularity=popularity(matrix.matrix),
        metadata={"version": f"test-{name}", "k": K, "metrics": {}, "model_name": name},
    )


@pytest.fixture(scope="module")
def neural_model() -> NeuralRecommender:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_neural(NeuralData.build(TRAIN, ITEMS), NEURAL, progress=False)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, neural_model) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("review-bundles")
    matrix = InteractionMatrix.from_frame(TRAIN, item_ids=ITEMS)
    hybrid = as_blend("neural", NeuralScorer(neural_model), len(ITEMS))
    paths = {
        "popularity": _write(out, "popularity", fit_popularity(matrix.matrix)),
        "ease": _write(out, "ease", fit_ease(matrix.matrix, lam=5.0)),
        "neural": _write(out, "neural", hybrid),
    }
    stage.write_loss_history(hybrid, paths["neural"], "neural")
    return paths


@pytest.fixture(scope="module")
def holdout(bundles) -> dict[str, dict]:
    return {name: evaluate_bundle_on(path, TRAIN, TEST, K, SEGMENTS) for name, path in bundles.items()}


def _fresh(settings: Settings) -> Settings:
    mlflow = settings.mlflow.model_copy(update={"registered_model": f"test-review-{uuid.uuid4().hex[:10]}"})
    return settings.model_copy(update={"mlflow": mlflow})


def _register(s: Settings, bundle: Path, run_dir: str | None = None, description: str = ""):
    tags = {"hyperrec.model": bundle.name, **({RUN_DIR_TAG: run_dir} if run_dir else {})}
    return log_and_register(
        s,
        run_name="test",
        params={"model": bundle.name},
        metrics={"ndcg@10": 0.5},
        bundle_dir=bundle,
        artifact_dirs={},
        tags=tags,
        python_model=ServedPyfunc(ServingSettings()),
        description=description,
    )


def _versions(s: Settings) -> list:
    return list(MlflowClient().search_model_versions(f"name = '{s.mlflow.registered_model}'"))


def _runs(s: Settings, run_dir: str, view=ViewType.ACTIVE_ONLY) -> list:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(s.mlflow.experiment).experiment_id
    return [r for r in client.search_runs([experiment], run_view_type=view) if r.data.tags.get(RUN_DIR_TAG) == run_dir]


def _alias(s: Settings, alias: str) -> int | None:
    aliases = MlflowClient().get_registered_model(s.mlflow.registered_model).aliases
    return int(aliases[alias]) if alias in aliases else None


# --------------------------------------------------------------------------- idempotent register


def test_register_retried_for_one_run_dir_keeps_one_version(settings, bundles, tmp_path):
    s, run_dir = _fresh(settings), str(tmp_path / "run-a")
    first = _register(s, bundles["ease"], run_dir)
    assert not first.reused and _alias(s, CHALLENGER) == first.version
    # The retry after a crash between registering and setting the alias: the run never
    # finished, the alias is missing.
    client = MlflowClient()
    client.delete_registered_model_alias(s.mlflow.registered_model, CHALLENGER)
    client.update_run(first.run_id, status="RUNNING")
    again = _register(s, bundles["ease"], run_dir)
    assert (again.version, again.run_id, again.model_uri, again.reused) == (
        first.version,
        first.run_id,
        first.model_uri,
        True,
    )
    assert [int(mv.version) for mv in _versions(s)] == [first.version]
    assert _alias(s, CHALLENGER) == first.version
    assert [r.info.run_id for r in _runs(s, run_dir)] == [first.run_id]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    # Without a run directory nothing is deduplicated (ad-hoc registrations), and another
    # pipeline run gets its own version.
    assert _register(s, bundles["ease"]).version == first.version + 1
    assert _register(s, bundles["ease"], str(tmp_path / "run-b")).version == first.version + 2
    assert _alias(s, CHALLENGER) == first.version + 2
    # A late retry of the first run does not take the alias back from the newer version.
    assert _register(s, bundles["ease"], run_dir).version == first.version
    assert _alias(s, CHALLENGER) == first.version + 2


def test_half_done_attempt_is_replaced_by_exactly_one_version(settings, bundles, tmp_path):
    s, run_dir = _fresh(settings), str(tmp_path / "run-c")
    client = configure(s)
    # The first attempt died after creating its MLflow run, before registering.
    experiment = client.get_experiment_by_name(s.mlflow.experiment).experiment_id
    dead = client.create_run(experiment, tags={RUN_DIR_TAG: run_dir, DIGEST_TAG: bundle_digest(bundles["ease"])})
    with mlflow.start_run(run_id=dead.info.run_id):  # it got as far as logging the model
        mlflow.log_param("model", "ease")
        logged = mlflow.pyfunc.log_model(
            name="model", python_model=ServedPyfunc(ServingSettings()), artifacts={"bundle": str(bundles["ease"])}
        )
    client.update_run(dead.info.run_id, status="RUNNING")  # killed: the run never ended
    reg = _register(s, bundles["ease"], run_dir)
    assert not reg.reused and reg.run_id != dead.info.run_id
    assert [int(mv.version) for mv in _versions(s)] == [reg.version]
    assert [r.info.run_id for r in _runs(s, run_dir)] == [reg.run_id]
    gone = client.get_run(dead.info.run_id)
    assert gone.info.lifecycle_stage == "deleted" and gone.info.status == "FAILED"
    assert "died before its model version was registered" in gone.data.tags[ABANDONED_TAG]
    assert logged.model_id not in {m.model_id for m in client.search_logged_models([experiment])}
    # A further retry reuses the registered version.
    assert _register(s, bundles["ease"], run_dir).version == reg.version and len(_versions(s)) == 1


def test_a_retrained_model_in_the_same_run_dir_is_a_new_version(settings, bundles, tmp_path):
    s, run_dir = _fresh(settings), str(tmp_path / "run-d")
    v1 = _register(s, bundles["ease"], run_dir).version
    copy = shutil.copytree(bundles["ease"], tmp_path / "retrained" / "ease")
    meta = json.loads((copy / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps({**meta, "created_at": "2030-01-01T00:00:00+00:00"}))
    assert bundle_digest(copy) != bundle_digest(bundles["ease"])
    v2 = _register(s, copy, run_dir).version
    assert v2 == v1 + 1 and len(_versions(s)) == 2 and _alias(s, CHALLENGER) == v2


# --------------------------------------------------------------------------- description and tags


def _mv(s: Settings, version: int):
    return MlflowClient().get_model_version(s.mlflow.registered_model, str(version))


def test_description_and_tags_show_the_gate_decision(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    summary = "## Training run\n\n| | |\n|---|---|\n| model | `ease` |"
    v1 = _register(s, bundles["ease"], str(tmp_path / "r1"), description=summary).version
    pending = _mv(s, v1)
    assert pending.tags["gate.decision"] == "pending" and pending.tags[RUN_DIR_TAG] == str(tmp_path / "r1")
    assert pending.description.startswith("## Promotion gate: pending") and "**challenger**" in pending.description
    assert pending.description.endswith(summary)
    assert MlflowClient().get_run(pending.run_id).data.tags["mlflow.note.content"] == summary

    first = promotion_gate(
        s,
        challenger_version=v1,
        challenger_ndcg=holdout["ease"][f"ndcg@{K}"],
        train_df=TRAIN,
        test_df=TEST,
        workdir=tmp_path / "g1",
    )
    assert first.promote
    described = _mv(s, v1).description
    assert described.startswith("## Promotion gate: promoted") and "no champion yet" in described
    assert described.endswith(summary)

    v2 = _register(s, bundles["popularity"], str(tmp_path / "r2"), description=summary).version
    decision = promotion_gate(
        s,
        challenger_version=v2,
        challenger_ndcg=holdout["popularity"][f"ndcg@{K}"],
        train_df=TRAIN,
        test_df=TEST,
        workdir=tmp_path / "g2",
        challenger_metrics=holdout["popularity"],
        segments=SEGMENTS,
    )
    assert not decision.promote
    mv = _mv(s, v2)
    assert mv.tags["gate.decision"] == "rejected" and mv.tags["gate.reason"] == decision.reason
    assert mv.tags["gate.champion"] == str(v1)
    text = mv.description
    assert text.startswith("## Promotion gate: rejected") and f"Reason: {decision.reason}" in text
    assert "| check | metric | challenger | champion | change | limit | result |" in text
    ndcg = decision.checks[0]
    assert (
        f"| ndcg | `ndcg@{K}` | {ndcg.challenger:.4f} | {ndcg.champion:.4f} | "
        f"{ndcg.challenger - ndcg.champion:+.4f} | gain ≥ +0.0000 | FAIL |"
    ) in text
    assert "| fairness |" in text and text.endswith(summary) and text.count("## Training run") == 1
    assert len(text) <= 5000
    # A manual promotion and a rollback put their note on top; the gate's record stays.
    promote_version(s, v2, "won the A/B test", user="alice")
    text = _mv(s, v2).description
    assert text.startswith("## Promoted by hand\n\n**alice** made this version the champion (was v1)")
    assert "won the A/B test" in text and "## Promotion gate: rejected" in text and text.endswith(summary)
    rollback(s, reason="complaints", user="bob")
    assert _mv(s, v2).description.startswith(f"## Rolled back\n\n**bob** replaced this champion with v{v1}")


def test_promote_retried_after_a_crash_inside_the_champion_move(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    client, name = MlflowClient(), s.mlflow.registered_model
    v1 = _register(s, bundles["popularity"], str(tmp_path / "r1")).version
    promotion_gate(s, challenger_version=v1, challenger_ndcg=0.1, train_df=TRAIN, test_df=TEST, workdir=tmp_path / "g1")
    v2 = _register(s, bundles["ease"], str(tmp_path / "r2")).version
    # The first promote attempt decided, moved the alias and died before the history and
    # the promotion record were written.
    client.set_model_version_tag(name, str(v2), "gate.decision", "promoted")
    client.set_model_version_tag(name, str(v2), "gate.reason", f"promoted over champion v{v1}: ...")
    client.set_registered_model_alias(name, CHAMPION, str(v2))
    again = promotion_gate(
        s,
        challenger_version=v2,
        challenger_ndcg=holdout["ease"][f"ndcg@{K}"],
        train_df=TRAIN,
        test_df=TEST,
        workdir=tmp_path / "g2",
    )
    assert again.promote and "already the champion" in again.reason
    assert json.loads(client.get_registered_model(name).tags[STACK_TAG]) == [v1, v2]
    tags = _mv(s, v2).tags
    assert (tags["promotion.previous_champion"], tags["promotion.by"]) == (str(v1), "gate")
    # Once more: nothing changes.
    promotion_gate(s, challenger_version=v2, challenger_ndcg=0.0, train_df=TRAIN, test_df=TEST, workdir=tmp_path / "g3")
    assert json.loads(client.get_registered_model(name).tags[STACK_TAG]) == [v1, v2]


# --------------------------------------------------------------------------- loss curves


def test_loss_history_is_the_recorded_fit_loss_per_epoch(neural_model, bundles, tmp_path):
    curve = loss_curve(neural_model)
    steps = -(-USERS // NEURAL.batch_size)
    assert curve["steps_per_epoch"] == steps and curve["weighted"] and len(curve["loss"]) == NEURAL.epochs
    sizes = [min(NEURAL.batch_size, USERS - i * NEURAL.batch_size) for i in range(steps)]
    first = np.dot(neural_model.losses[:steps], sizes) / USERS
    assert curve["loss"][0] == pytest.approx(first) and curve["step_loss"] == neural_model.losses
    # The DDP path hands the model over through save/load: the curve survives it.
    neural_model.save(tmp_path / "saved")
    assert loss_curve(NeuralRecommender.load(tmp_path / "saved")) == curve
    history = json.loads((bundles["neural"] / stage.LOSS_FILE).read_text())
    assert history["loss"] == curve["loss"] and history["model"] == "neural" and history["segments"] == {}
    # A candidate without a neural component has no (stale) loss file.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / stage.LOSS_FILE).write_text("{}")
    ease = fit_ease(InteractionMatrix.from_frame(TRAIN, item_ids=ITEMS).matrix, lam=5.0)
    assert stage.write_loss_history(as_blend("ease", ease, len(ITEMS)), plain, "ease") is None
    assert not (plain / stage.LOSS_FILE).exists()


# --------------------------------------------------------------------------- the register stage


def _pipeline_run(s: Settings, bundles: dict[str, Path], holdout: dict[str, dict], drift_dir: Path) -> RunContext:
    """A run directory as the stages before ``register`` leave it (the neural candidate best),
    started by drift."""
    run = RunContext.create(s, f"review_{uuid.uuid4().hex[:8]}")
    shutil.copytree(bundles["neural"], run.models_dir / "neural")
    models, segments = {}, {}
    for name in ("popularity", "ease", "neural"):
        m = holdout[name]
        models[name] = {key: v for key, v in m.items() if key not in ("segment_ndcg",)}
        segments[name] = {
            "segments": {seg: {f"ndcg@{K}": v, "users": 10} for seg, v in m["segment_ndcg"].items()},
            "gap": {f"ndcg@{K}": m["segment_gap"]},
        }
    evaluation = {
        "k": K,
        "best": "neural",
        "models": models,
        "split_fingerprint": "abc123",
        "lift_over_popularity": {n: models[n][f"ndcg@{K}"] / models["popularity"][f"ndcg@{K}"] - 1 for n in models},
        "segments": segments,
        "cold_start": {"users": 0},
        "segment_models": {},
    }
    run.write_json("evaluation.json", evaluation)
    run.write_json("segments.json", {"method": "kmeans", "k": 4})
    run.write_json(
        "model_selection.json",
        {
            "ease_lambda": 5.0,
            "plain_ease_lambda": 5.0,
            "temporal_beta": 0.0,
            "input_alpha": 1.0,
            "weights": {"ease": 1.0},
            "folds": 2,
            "validation": {"ease": 0.3},
        },
    )
    run.write_json("segment_tuning.json", {"skipped": "test"})
    run.write_json(
        "params.json",
        {"dataset": "ml-100k", "reason": "drift", "drift_report": str(drift_dir / "drift" / "drift_report.json")},
    )
    (run.features_dir / "segments").mkdir(parents=True)
    (run.features_dir / "segments" / "summary.md").write_text("# segments\n")
    shutil.copy(run.models_dir / "neural" / "metadata.json", run.features_dir / "segments" / "segments_tsne.png")
    run.gx_dir.mkdir()
    (run.gx_dir / "index.html").write_text("<html>data docs</html>")
    return run


def test_register_stage_logs_review_artifacts_once(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    monitor = tmp_path / "monitor-run"
    (monitor / "drift").mkdir(parents=True)
    (monitor / "drift" / "drift_report.json").write_text(json.dumps({"drifted": True}))
    (monitor / "drift" / "drift_report.html").write_text("<html>drift</html>")
    (monitor / "drift.json").write_text(json.dumps({"retrain": True}))
    run = _pipeline_run(s, bundles, holdout, monitor)

    result = publish.register(s, run)  # the register task: the served pyfunc
    client = MlflowClient()

    def listing(path: str = "") -> set[str]:
        found = set()
        for item in client.list_artifacts(result["run_id"], path):
            found |= listing(item.path) if item.is_dir else {item.path}
        return found

    files = listing()
    assert {
        "evaluation/metrics.md",
        "evaluation/models.csv",
        "evaluation/segments.csv",
        "training/loss.png",
        "training/loss.json",
        "drift/drift_report.json",
        "drift/drift_report.html",
        "drift/drift.json",
        "segments/segments_tsne.png",
        "gx_data_docs/index.html",
        "pipeline/params.json",
    } <= files
    metrics_md = (run.path("evaluation") / "metrics.md").read_text()
    assert "| **neural** |" in metrics_md and f"ndcg@{K}" in metrics_md
    history = client.get_metric_history(result["run_id"], "neural.train_loss")
    assert [m.step for m in history] == list(range(NEURAL.epochs))
    expected = json.loads((run.models_dir / "neural" / stage.LOSS_FILE).read_text())["loss"]
    assert [m.value for m in history] == pytest.approx(expected)

    mv = client.get_model_version(s.mlflow.registered_model, str(result["version"]))
    assert mv.tags["hyperrec.reason"] == "drift" and mv.tags["hyperrec.model"] == "neural"
    assert mv.tags["hyperrec.airflow_run_id"] == run.run_id and mv.tags[RUN_DIR_TAG] == str(run.root)
    assert mv.tags["hyperrec.drift_report"].endswith("drift_report.json") and mv.tags["gate.decision"] == "pending"
    assert "| started because | drift (report `" in mv.description and "### Candidates" in mv.description
    assert f"| NDCG@{K} | {holdout['neural'][f'ndcg@{K}']:.4f}" in mv.description

    again = publish.register(s, run)  # the retried task
    assert (again["version"], again["run_id"], again["reused"]) == (result["version"], result["run_id"], True)
    assert len(_versions(s)) == 1 and run.read_json("registration.json")["version"] == result["version"]
