"""The behaviour simulator (``hyperrec.simulate``) driving the real serving app: synthetic
users from ``hyperrec generate``'s ground truth click by their true tastes, and the
experiment's report names the truly better model, by A/B and by interleaving."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core.datasets.synthetic import generate
from core.settings import load_settings
from hyperrec.simulate import ClickModel, GroundTruth, fit_bundle, run_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("sim")
    dataset = generate(root / "dataset", events=20_000, users=2_000, items=200, seed=5, progress=False).root
    return {
        "root": root,
        "dataset": dataset,
        "truth": GroundTruth.load(dataset),
        "popularity": fit_bundle(dataset, "popularity", root / "popularity", "pop"),
        "ease": fit_bundle(dataset, "ease", root / "ease", "ease"),
    }


def test_ground_truth_and_click_model(world: dict) -> None:
    truth: GroundTruth = world["truth"]
    user = truth.user_ids[0]
    items = sorted(truth.item_topic)
    affinity = truth.affinity(user, [*items, "not-an-item"])
    assert affinity.max() == pytest.approx(1.0) and affinity[-1] == 0.0 and (affinity >= 0).all()
    p = ClickModel().probabilities(np.ones(10))
    assert (np.diff(p) < 0).all() and p[0] == pytest.approx(0.6)  # position bias
    assert ClickModel().probabilities(np.array([0.2]))[0] < ClickModel().probabilities(np.array([0.9]))[0]


def _run(world: dict, tmp_path: Path, champion: str, challenger: str, design: str, seed: int) -> dict:
    settings = load_settings(home=str(tmp_path / "home"))
    return run_experiment(
        settings,
        champion_dir=world[champion],
        challenger_dir=world[challenger],
        truth=world["truth"],
        experiment_id=f"t-{design}-{champion}-{challenger}-{seed}",
        design=design,
        seed=seed,
        step=50,
    )


def test_ab_declares_the_better_model_and_never_the_worse(world: dict, tmp_path: Path) -> None:
    users = []
    for seed in range(3):
        better = _run(world, tmp_path, "popularity", "ease", "ab", seed)
        assert better["verdict"] == "better", better
        worse = _run(world, tmp_path, "ease", "popularity", "ab", seed)
        assert worse["verdict"] == "worse", worse
        users.append(better["users"])
        arms = better["arms"]
        assert arms["challenger"]["ctr"] > arms["champion"]["ctr"]
        assert arms["challenger"]["mrr"] > arms["champion"]["mrr"]
        assert arms["challenger"]["coverage"] > arms["champion"]["coverage"]
        assert arms["challenger"]["p99_latency_ms"] is not None
    world["ab_users"] = users


def test_interleaving_agrees_with_fewer_users(world: dict, tmp_path: Path) -> None:
    ab, il = [], []
    for seed in range(3):
        result = _run(world, tmp_path, "popularity", "ease", "interleaving", seed)
        assert result["verdict"] == "better", result
        assert result["interleaving"]["challenger_wins"] > result["interleaving"]["champion_wins"]
        il.append(result["users"])
        ab.append(_run(world, tmp_path, "popularity", "ease", "ab", seed)["users"])
    assert sum(il) < sum(ab)


def test_cli_experiment_simulate_ends_with_one_json_line(world: dict, tmp_path: Path, monkeypatch) -> None:
    from hyperrec.cli import app

    monkeypatch.setenv("HYPERREC_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(
        app,
        [
            "experiment",
            "simulate",
            "--challenger",
            "ease",
            "--design",
            "interleaving",
            "--seed",
            "1",
            "--dataset",
            str(world["dataset"]),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["verdict"] == "better" and 0 < last["users"] <= 2_000
    assert (tmp_path / "home" / "experiments").is_dir()


def test_simulate_a_training_runs_candidates(world: dict, tmp_path: Path) -> None:
    """``--run-dir``: the users of the run's generated sample (``raw/ground_truth/<source>/``)
    and the run's candidate bundles (``models/<name>``), as after the demo's training run."""
    import shutil

    from hyperrec.simulate import resolve_bundle, simulate

    run = tmp_path / "run"
    shutil.copytree(world["dataset"] / "ground_truth", run / "raw" / "ground_truth" / "synthetic")
    for name in ("popularity", "ease"):
        shutil.copytree(world[name], run / "models" / name)
    settings = load_settings(home=str(tmp_path / "home"))
    result = simulate(settings, challenger="ease", champion="popularity", design="interleaving", run_dir=run, step=50)
    assert result["verdict"] == "better" and result["users"] <= 2_000
    with pytest.raises(FileNotFoundError, match="candidates are ease, popularity"):
        resolve_bundle(settings, "hybrid", run_dir=run, work=tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="nothing is published"):
        resolve_bundle(settings, "current", run_dir=run, work=tmp_path / "work")
