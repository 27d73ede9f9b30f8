"""The MLflow registry against a real backend (the session's sqlite store): promotion gate
(NDCG margin, coverage drop, fairness gap), manual promotion, rollback, listing and the
``hyperrec model`` commands.

Every test registers under a registered-model name of its own, so tests do not share a
champion. The data is a seeded 80-user × 48-item set with four user groups, each
preferring one item cluster; the group is the user's segment.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

from core.settings import ServingSettings, Settings
from hyperrec.cli import app
from serving.publish import ServedPyfunc
from training.bundle import write_bundle
from training.evaluation import history_of, recommend_ids, relevant_items
from training.metrics import ndcg_at_k
from training.models import InteractionMatrix, ItemItemModel, fit_ease, fit_item_knn, fit_popularity, popularity
from training.registry import (
    CHALLENGER,
    CHAMPION,
    STACK_TAG,
    RegistryError,
    champion_version,
    evaluate_bundle_on,
    list_versions,
    log_and_register,
    promote_version,
    promotion_gate,
    rollback,
)

K = 10
GROUP_SIZES = (40, 20, 10, 10)
PER_CLUSTER = 12


def _interactions(seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """12 distinct items per user, 90% from the user's group's cluster (Zipf within a
    cluster); 3 random interactions per user are held out. Returns train, test, segments."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, PER_CLUSTER + 1) ** 0.8
    groups = [g for g, size in enumerate(GROUP_SIZES) for _ in range(size)]
    rows, segments = [], {}
    for u, g in enumerate(groups):
        segments[f"u{u:02d}"] = "abcd"[g]
        weights = np.concatenate([zipf * (0.9 if c == g else 0.1 / 3) for c in range(len(GROUP_SIZES))])
        items = rng.choice(len(weights), size=12, replace=False, p=weights / weights.sum())
        held_out = set(rng.choice(12, size=3, replace=False).tolist())
        rows += [(f"u{u:02d}", f"i{i:02d}", j in held_out) for j, i in enumerate(items)]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "test"])
    return (
        frame[~frame.test].drop(columns="test").reset_index(drop=True),
        frame[frame.test].drop(columns="test").reset_index(drop=True),
        segments,
    )


TRAIN, TEST, SEGMENTS = _interactions()
ITEMS = np.array([f"i{i:02d}" for i in range(PER_CLUSTER * len(GROUP_SIZES))], dtype=object)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """One bundle per model, all fitted on TRAIN: popularity, ease, item_knn and a seeded
    random item-item model (every user gets a different arbitrary list)."""
    out = tmp_path_factory.mktemp("registry-bundles")
    matrix = InteractionMatrix.from_frame(TRAIN, item_ids=ITEMS)
    rng = np.random.default_rng(1)
    n = len(ITEMS)
    models = {
        "popularity": fit_popularity(matrix.matrix),
        "ease": fit_ease(matrix.matrix, lam=10.0),
        "item_knn": fit_item_knn(matrix.matrix, neighbours=10),
        "random": ItemItemModel("random", bias=np.zeros(n, np.float32), weights=rng.random((n, n), dtype=np.float32)),
    }
    return {
        name: write_bundle(
            out / name,
            model=model,
            item_ids=matrix.item_ids,
            titles=[f"Title {i}" for i in matrix.item_ids],
            categories=[[] for _ in matrix.item_ids],
            history=history_of(matrix),
            popularity=popularity(matrix.matrix),
            metadata={"version": f"test-{name}", "k": K, "metrics": {}, "model_name": name},
        )
        for name, model in models.items()
    }


@pytest.fixture(scope="module")
def holdout(bundles) -> dict[str, dict]:
    """Each bundle's metrics on the shared holdout, with per-segment NDCG."""
    return {name: evaluate_bundle_on(path, TRAIN, TEST, K, SEGMENTS) for name, path in bundles.items()}


def _fresh(settings: Settings, **promotion) -> Settings:
    """The session settings under a registered-model name of this test's own."""
    mlflow = settings.mlflow.model_copy(update={"registered_model": f"test-registry-{uuid.uuid4().hex[:10]}"})
    return settings.model_copy(update={"mlflow": mlflow, "promotion": settings.promotion.model_copy(update=promotion)})


def _register(settings: Settings, bundles: dict[str, Path], holdout: dict[str, dict], name: str) -> int:
    metrics = {m: v for m, v in holdout[name].items() if isinstance(v, float)}
    reg = log_and_register(
        settings,
        run_name=f"test-{name}",
        params={"model": name},
        metrics=metrics,
        bundle_dir=bundles[name],
        artifact_dirs={},
        tags={"hyperrec.model": name},
        python_model=ServedPyfunc(ServingSettings()),
    )
    return reg.version


def _gate(settings: Settings, holdout: dict[str, dict], version: int, name: str, workdir: Path, **kwargs):
    return promotion_gate(
        settings,
        challenger_version=version,
        challenger_ndcg=holdout[name][f"ndcg@{K}"],
        train_df=TRAIN,
        test_df=TEST,
        workdir=workdir,
        **kwargs,
    )


def _tags(settings: Settings, version: int) -> dict[str, str]:
    return MlflowClient().get_model_version(settings.mlflow.registered_model, str(version)).tags


def _aliases(settings: Settings) -> dict[str, int]:
    model = MlflowClient().get_registered_model(settings.mlflow.registered_model)
    return {alias: int(v) for alias, v in model.aliases.items()}


def test_holdout_scores_match_a_direct_computation(holdout):
    """The scenario the gate tests rely on, and per-segment NDCG recomputed by hand."""
    ndcg = {name: m[f"ndcg@{K}"] for name, m in holdout.items()}
    coverage = {name: m[f"coverage@{K}"] for name, m in holdout.items()}
    assert ndcg["item_knn"] > ndcg["ease"] > ndcg["popularity"] > ndcg["random"]
    assert coverage["ease"] == coverage["item_knn"] == 1.0
    assert coverage["random"] - coverage["popularity"] > 0.5
    assert holdout["item_knn"]["segment_gap"] - holdout["ease"]["segment_gap"] > 0.05
    matrix = InteractionMatrix.from_frame(TRAIN, item_ids=ITEMS)
    relevant = relevant_items(matrix, TEST)
    model = fit_ease(matrix.matrix, lam=10.0)
    recs = recommend_ids(model, matrix, list(relevant), K)
    for segment in "abcd":
        users = [u for u in relevant if SEGMENTS[u] == segment]
        expected = np.mean([ndcg_at_k(recs[u], relevant[u], K) for u in users])
        assert holdout["ease"]["segment_ndcg"][segment] == pytest.approx(expected, abs=1e-12)
    per = holdout["ease"]["segment_ndcg"]
    assert holdout["ease"]["segment_gap"] == pytest.approx(max(per.values()) - min(per.values()))


def test_first_version_is_promoted_and_a_worse_one_stays_challenger(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    v1 = _register(s, bundles, holdout, "ease")
    first = _gate(s, holdout, v1, "ease", tmp_path / "g1")
    assert first.promote and first.reason.startswith("no champion yet") and champion_version(s) == v1

    v2 = _register(s, bundles, holdout, "popularity")
    assert _aliases(s) == {CHAMPION: v1, CHALLENGER: v2}
    decision = _gate(s, holdout, v2, "popularity", tmp_path / "g2")  # challenger scored from its registered bundle
    assert not decision.promote and champion_version(s) == v1
    assert decision.champion_ndcg == pytest.approx(holdout["ease"][f"ndcg@{K}"])
    checks = {c.name: c for c in decision.checks}
    assert checks["ndcg"].passed is False and checks["fairness"].passed is None
    assert checks["coverage"].challenger == pytest.approx(holdout["popularity"][f"coverage@{K}"])
    pop, ease = holdout["popularity"][f"ndcg@{K}"], holdout["ease"][f"ndcg@{K}"]
    assert (
        f"ndcg@{K} {pop:.4f} vs champion {ease:.4f}: gain {pop - ease:+.4f} < required +0.0000 -> FAIL"
        in decision.reason
    )
    tags = _tags(s, v2)
    assert tags["gate.decision"] == "rejected" and tags["gate.reason"] == decision.reason
    assert [c["name"] for c in json.loads(tags["gate.checks"])] == ["ndcg", "coverage", "fairness"]
    assert decision.reason in MlflowClient().get_model_version(s.mlflow.registered_model, str(v2)).description
    assert json.loads((tmp_path / "g2" / "gate.json").read_text())["promote"] is False
    # Re-running the gate on the version that is champion changes nothing.
    again = _gate(s, holdout, v1, "ease", tmp_path / "g3")
    assert again.promote and "already the champion" in again.reason and _tags(s, v1)["gate.decision"] == "promoted"


def test_better_model_becomes_champion(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    v1 = _register(s, bundles, holdout, "popularity")
    _gate(s, holdout, v1, "popularity", tmp_path / "g1")
    v2 = _register(s, bundles, holdout, "ease")
    decision = _gate(s, holdout, v2, "ease", tmp_path / "g2", challenger_metrics=holdout["ease"], segments=SEGMENTS)
    assert decision.promote and decision.reason.startswith(f"promoted over champion v{v1}: ")
    assert [c.passed for c in decision.checks] == [True, True, True]
    fairness = decision.checks[2]
    assert fairness.champion == pytest.approx(holdout["popularity"]["segment_gap"])
    assert fairness.challenger == pytest.approx(holdout["ease"]["segment_gap"])
    assert _aliases(s) == {CHAMPION: v2, CHALLENGER: v2}
    tags = _tags(s, v2)
    assert tags["promotion.previous_champion"] == str(v1) and tags["promotion.by"] == "gate"
    assert json.loads(MlflowClient().get_registered_model(s.mlflow.registered_model).tags[STACK_TAG]) == [v1, v2]


def test_better_ndcg_that_loses_coverage_is_rejected(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    v1 = _register(s, bundles, holdout, "random")
    _gate(s, holdout, v1, "random", tmp_path / "g1")
    v2 = _register(s, bundles, holdout, "popularity")
    decision = _gate(s, holdout, v2, "popularity", tmp_path / "g2", challenger_metrics=holdout["popularity"])
    checks = {c.name: c for c in decision.checks}
    assert not decision.promote and champion_version(s) == v1
    assert checks["ndcg"].passed is True and checks["coverage"].passed is False
    assert decision.reason.startswith(f"rejected against champion v{v1} (failed: coverage): ")
    new, old = holdout["popularity"][f"coverage@{K}"], holdout["random"][f"coverage@{K}"]
    assert (
        f"coverage@{K} {new:.4f} vs champion {old:.4f}: drop {old - new:+.4f} > allowed 0.0500 -> FAIL"
        in decision.reason
    )
    # The limit is configuration: allowing the measured drop promotes the same challenger.
    lenient = s.model_copy(update={"promotion": s.promotion.model_copy(update={"max_coverage_drop": old - new + 0.01})})
    assert _gate(lenient, holdout, v2, "popularity", tmp_path / "g3", challenger_metrics=holdout["popularity"]).promote
    assert champion_version(s) == v2


def test_better_ndcg_that_widens_the_segment_gap_is_rejected(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    v1 = _register(s, bundles, holdout, "ease")
    _gate(s, holdout, v1, "ease", tmp_path / "g1")
    v2 = _register(s, bundles, holdout, "item_knn")
    # No challenger_metrics: coverage and the segment gap are scored from the registered bundle.
    decision = _gate(s, holdout, v2, "item_knn", tmp_path / "g2", segments=SEGMENTS)
    assert [c.passed for c in decision.checks] == [True, True, False] and champion_version(s) == v1
    gap_new, gap_old = holdout["item_knn"]["segment_gap"], holdout["ease"]["segment_gap"]
    assert decision.reason.startswith(f"rejected against champion v{v1} (failed: fairness): ")
    assert (
        f"gap (best-worst) {gap_new:.4f} vs champion {gap_old:.4f}: increase {gap_new - gap_old:+.4f} > allowed "
        "0.0500 -> FAIL"
    ) in decision.reason
    with pytest.raises(ValueError, match=f"must include 'coverage@{K}'"):
        _gate(s, holdout, v2, "item_knn", tmp_path / "g3", challenger_metrics={f"ndcg@{K}": 0.9})


def test_manual_promote_then_rollback(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    v1 = _register(s, bundles, holdout, "ease")
    _gate(s, holdout, v1, "ease", tmp_path / "g1")
    v2 = _register(s, bundles, holdout, "popularity")
    _gate(s, holdout, v2, "popularity", tmp_path / "g2")
    assert champion_version(s) == v1

    record = promote_version(s, v2, "won the online A/B test", user="alice")
    assert record["previous_champion"] == v1 and champion_version(s) == v2
    tags = _tags(s, v2)
    assert tags["gate.decision"] == "manual" and tags["gate.auto_decision"] == "rejected"
    assert tags["gate.reason"] == "manual promotion by alice: won the online A/B test"
    assert (tags["promotion.previous_champion"], tags["promotion.user"], tags["promotion.by"]) == (
        str(v1),
        "alice",
        "manual",
    )
    with pytest.raises(RegistryError, match=f"version {v2} of .* is already the champion"):
        promote_version(s, v2, "again")
    with pytest.raises(RegistryError, match="has no version 99"):
        promote_version(s, 99, "typo")

    back = rollback(s, reason="complaints", user="bob")
    assert (back["version"], back["rolled_back_from"], back["history"]) == (v1, v2, [v1]) and champion_version(s) == v1
    assert _tags(s, v2)["rollback.replaced_by"] == str(v1) and _tags(s, v1)["rollback.restored_from"] == str(v2)
    with pytest.raises(RegistryError, match=f"nothing to roll back to: v{v1} is the first champion"):
        rollback(s)


def test_rollback_walks_back_and_to_an_earlier_champion(settings, bundles, holdout):
    s = _fresh(settings)
    v1, v2, v3 = (_register(s, bundles, holdout, name) for name in ("popularity", "ease", "item_knn"))
    with pytest.raises(RegistryError, match="has no champion: nothing to roll back"):
        rollback(s)
    for version in (v1, v2, v3):
        promote_version(s, version, "review", user="carol")
    with pytest.raises(RegistryError, match=f"version {v3} .* is already the champion"):
        rollback(s, to=v3)
    assert rollback(s, to=v1)["history"] == [v1] and champion_version(s) == v1
    with pytest.raises(RegistryError, match=f"version {v2} .* was never champion before v{v1}"):
        rollback(s, to=v2)
    rows = list_versions(s)
    assert [r["version"] for r in rows] == [v3, v2, v1]
    assert rows[0]["aliases"] == [CHALLENGER] and rows[2]["aliases"] == [CHAMPION]
    assert rows[1]["ndcg"] == pytest.approx(holdout["ease"][f"ndcg@{K}"]) and rows[1]["gate_decision"] == "manual"
    assert rows[1]["previous_champion"] == str(v1) and rows[1]["created"].endswith("+00:00")


def test_rollback_of_an_unregistered_model_is_a_clear_error(settings):
    s = _fresh(settings)
    assert list_versions(s) == []
    with pytest.raises(RegistryError, match=f"registered model '{s.mlflow.registered_model}' not found"):
        rollback(s)


def test_model_cli_list_promote_rollback(settings, bundles, holdout, tmp_path):
    s = _fresh(settings)
    config = tmp_path / "overlay.yaml"
    config.write_text(yaml.safe_dump({"home": str(s.home), "mlflow": {"registered_model": s.mlflow.registered_model}}))
    runner = CliRunner()
    empty = runner.invoke(app, ["model", "list", "--config", str(config)])
    assert empty.exit_code == 0 and "no versions" in empty.output
    v1 = _register(s, bundles, holdout, "ease")
    _gate(s, holdout, v1, "ease", tmp_path / "g1")
    v2 = _register(s, bundles, holdout, "popularity")
    _gate(s, holdout, v2, "popularity", tmp_path / "g2")

    listed = runner.invoke(app, ["model", "list", "--config", str(config)])
    assert listed.exit_code == 0, listed.output
    lines = {line.split("│")[1].strip(): line for line in listed.output.splitlines() if line.count("│") >= 5}
    assert "champion" in lines[str(v1)] and "promoted" in lines[str(v1)]
    assert "challenger" in lines[str(v2)] and "rejected" in lines[str(v2)]
    assert f"{holdout['popularity'][f'ndcg@{K}']:.4f}" in lines[str(v2)]

    promoted = runner.invoke(
        app, ["model", "promote", str(v2), "--reason", "editorial review", "--by", "dana", "--config", str(config)]
    )
    assert promoted.exit_code == 0, promoted.output
    assert f"champion: v{v2} (was v{v1}), by dana: editorial review" in promoted.output and champion_version(s) == v2
    rolled = runner.invoke(app, ["model", "rollback", "--config", str(config)])
    assert rolled.exit_code == 0 and f"champion: v{v1} (rolled back from v{v2})" in rolled.output
    assert champion_version(s) == v1
    nothing = runner.invoke(app, ["model", "rollback", "--config", str(config)])
    assert nothing.exit_code == 1 and "error: nothing to roll back to" in nothing.output
    missing = runner.invoke(app, ["model", "promote", "42", "--config", str(config)])
    assert missing.exit_code == 1 and "has no version 42" in missing.output
