"""Per-segment fine-tuning and the per-segment Optuna search of the neural recommender,
on a synthetic dataset whose users fall in four latent taste groups (the segments)."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from pydantic import ValidationError

from core.datasets.synthetic import generate
from core.settings import NeuralSettings, TuningSettings
from training.metrics import ndcg_at_k
from training.models import InteractionMatrix
from training.neural import NeuralData, fit_neural
from training.segment_tuning import (
    SegmentedRecommender,
    fine_tune,
    fine_tune_segments,
    finetune_config,
    search_segment,
    train_global_models,
    tune_segments,
    validation_split,
)

K = 10
TINY = "tiny"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: the box is shared, and results stay reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory, settings):
    """10k synthetic events (4 groups, ~200 users, 100 items), fold 0 of the per-user
    k-fold as fit/validation, a 16-dim global model trained on the fit part and a
    snapshot of its weights. Segments are the ground-truth groups plus a 3-user segment."""
    root = tmp_path_factory.mktemp("segtune")
    generate(root, events=10_000, groups=4, seed=0, progress=False)
    frame = pd.read_parquet(root / "interactions", columns=["user_id", "item_id"]).drop_duplicates()
    truth = pd.read_parquet(root / "ground_truth" / "users.parquet")
    segment_of = dict(zip(truth["user_id"], truth["group"].astype(int)))
    for user in sorted(u for u, g in segment_of.items() if g == 0)[:3]:
        segment_of[user] = TINY
    cfg = settings.model_copy(
        update={
            "neural": NeuralSettings(embedding_dim=16, hidden=[32], epochs=40, batch_size=64, lr=3e-3, seed=0),
            "tuning": TuningSettings(
                segment_finetune_epochs=5,
                min_validation_users=5,
                optuna_trials=4,
                optuna_startup_trials=2,
                embedding_dims=[8, 16],
            ),
        }
    )
    item_ids = np.array(sorted(frame["item_id"].unique()), dtype=object)
    fit, val = validation_split(frame, cfg)
    global_rec = fit_neural(NeuralData.build(fit, item_ids), cfg.neural, progress=False)
    snapshot = {name: v.clone() for name, v in global_rec.net.state_dict().items()}
    return {
        "settings": cfg,
        "fit": fit,
        "val": val,
        "segment_of": segment_of,
        "item_ids": item_ids,
        "global": global_rec,
        "snapshot": snapshot,
    }


@pytest.fixture(scope="module")
def tuned(world):
    """fine_tune_segments with defaults, except segment 3 gets lr 1e-9 (a copy that ranks
    exactly like the global model: gain 0)."""
    messages: list[str] = []
    result = fine_tune_segments(
        world["global"],
        world["fit"],
        world["val"],
        world["segment_of"],
        world["item_ids"],
        world["settings"],
        params_by_segment={3: {"lr": 1e-9}},
        log=messages.append,
    )
    return result, messages


def _relevant_by_hand(fit: pd.DataFrame, val: pd.DataFrame, users) -> dict:
    seen = fit.groupby("user_id")["item_id"].agg(set)
    held = val.groupby("user_id")["item_id"].agg(set)
    out = {}
    for u in users:
        rel = held.get(u, set()) - seen.get(u, set())
        if u in seen.index and rel:
            out[u] = rel
    return out


def _ndcg_by_hand(model, fit: pd.DataFrame, item_ids: np.ndarray, relevant: dict) -> float:
    """Mean NDCG@K of ``model``'s top-K (fit history excluded) over ``relevant``'s users."""
    users = sorted(relevant)
    item_pos = {item: j for j, item in enumerate(item_ids)}
    x = np.zeros((len(users), len(item_pos)), np.float32)
    history = fit.groupby("user_id")["item_id"].agg(list)
    for r, u in enumerate(users):
        x[r, [item_pos[i] for i in history[u]]] = 1.0
    top = model.recommend(sp.csr_matrix(x), K, users)
    return float(np.mean([ndcg_at_k(list(item_ids[t]), relevant[u], K) for u, t in zip(users, top)]))


def test_one_row_per_segment_and_the_gain_recomputed_by_hand(world, tuned):
    result, messages = tuned
    rows = {r["segment"]: r for r in result.results}
    assert set(rows) == {0, 1, 2, 3, TINY}
    tiny = rows[TINY]
    assert tiny["users"] == 3 and tiny["gain"] is None and not tiny["kept"]
    assert "min_validation_users" in tiny["reason"]
    assert any("skipped" in m and "'tiny'" in m for m in messages)
    for segment in (0, 1, 2, 3):
        row = rows[segment]
        assert row["validation_users"] >= 40
        assert row["gain"] == pytest.approx(row["finetuned_ndcg"] - row["global_ndcg"], abs=1e-12)
        assert row["kept"] == (row["gain"] > 0) and (segment in result.models) == row["kept"]
    # Segment 1 recomputed from the frames alone: relevant items, top-k, NDCG.
    members = [u for u, s in world["segment_of"].items() if s == 1]
    relevant = _relevant_by_hand(world["fit"], world["val"], members)
    assert len(relevant) == rows[1]["validation_users"]
    by_hand = {
        name: _ndcg_by_hand(model, world["fit"], world["item_ids"], relevant)
        for name, model in (("global_ndcg", world["global"]), ("finetuned_ndcg", result.models[1]))
    }
    assert by_hand == pytest.approx({name: rows[1][name] for name in by_hand}, abs=1e-9)
    print({s: round(r["gain"], 4) for s, r in rows.items() if r["gain"] is not None})


def test_a_segment_model_is_kept_only_when_it_gains(world, tuned):
    result, _ = tuned
    rows = {r["segment"]: r for r in result.results}
    kept = [s for s, r in rows.items() if r["kept"]]
    assert kept and set(result.models) == set(kept)
    assert all(rows[s]["gain"] > 0 for s in kept)
    # An (almost) untouched copy ties the global model: gain 0 is not a gain.
    assert rows[3]["params"]["lr"] == 1e-9 and rows[3]["gain"] == 0.0 and not rows[3]["kept"]
    assert "gain +0.0000 <= tuning.min_gain" in rows[3]["reason"]
    assert result.to_dict()["kept"] == kept
    # A higher bar: only the segments whose gain exceeds it keep their model.
    bar = float(np.median([rows[s]["gain"] for s in kept]))
    s = world["settings"]
    strict = s.model_copy(update={"tuning": s.tuning.model_copy(update={"min_gain": bar})})
    again = fine_tune_segments(
        world["global"], world["fit"], world["val"], world["segment_of"], world["item_ids"], strict, log=lambda m: None
    )
    gains = {r["segment"]: r["gain"] for r in again.results if r["gain"] is not None}
    assert set(again.models) == {seg for seg, g in gains.items() if g > bar}
    assert 0 < len(again.models) < len(gains)


def test_kept_model_is_a_fine_tuned_copy_and_the_global_model_is_unchanged(world, tuned):
    result, _ = tuned
    state = world["global"].net.state_dict()
    assert all(torch.equal(state[name], world["snapshot"][name]) for name in state)
    segment = next(iter(result.models))
    model = result.models[segment]
    assert model.net is not world["global"].net
    tuned_state = model.net.state_dict()
    assert not torch.equal(tuned_state["user_tower.out.weight"], state["user_tower.out.weight"])
    assert not torch.equal(tuned_state["item_bias"], state["item_bias"])
    # ID embeddings: fine-tuned for the segment's users, the global ones for everyone else.
    index = world["global"].user_index
    inside = [index[u] for u, s in world["segment_of"].items() if s == segment and u in index]
    outside = [index[u] for u, s in world["segment_of"].items() if s != segment and u in index]
    assert torch.equal(tuned_state["user_id.weight"][outside], state["user_id.weight"][outside])
    assert not torch.equal(tuned_state["user_id.weight"][inside], state["user_id.weight"][inside])
    assert model.cfg.epochs == 5 and model.cfg.lr == pytest.approx(world["global"].cfg.lr * 0.3)
    assert len(model.losses) == 5 * math.ceil(len(inside) / 64)


def test_segmented_recommender_routes_rows_and_round_trips(world, tuned, tmp_path):
    result, _ = tuned
    rec = result.recommender()
    kept = next(iter(result.models))
    users = list(world["global"].user_ids[:6])
    segments = [kept, 3, None, kept, TINY, "unknown"]
    x = np.zeros((6, len(world["item_ids"])), np.float32)
    x[np.arange(6), np.arange(6)] = 1.0
    scores = rec.score(x, users, segments)
    np.testing.assert_allclose(scores[[0, 3]], result.models[kept].score(x[[0, 3]], [users[0], users[3]]), rtol=1e-6)
    np.testing.assert_allclose(
        scores[[1, 2, 4, 5]], world["global"].score(x[[1, 2, 4, 5]], [users[i] for i in (1, 2, 4, 5)]), rtol=1e-6
    )
    assert not np.allclose(scores[0], world["global"].score(x[[0]], [users[0]])[0])
    loaded = SegmentedRecommender.load(rec.save(tmp_path / "bundle"))
    assert set(loaded.models) == set(result.models)
    np.testing.assert_allclose(loaded.score(x, users, segments), scores, rtol=1e-6)
    top = loaded.recommend(x, 3, users, segments)
    assert top.shape == (6, 3) and not (top == np.arange(6)[:, None]).any()  # seen items excluded
    with pytest.raises(ValueError, match="segments for 6 history rows"):
        rec.score(x, users, segments[:2])


@pytest.fixture(scope="module")
def globals_by_dim(world):
    return train_global_models(world["fit"], world["item_ids"], world["settings"], [8, 16], known={16: world["global"]})


def test_search_is_reproducible_and_logged_to_mlflow(world, globals_by_dim):
    assert globals_by_dim[16] is world["global"] and globals_by_dim[8].cfg.embedding_dim == 8
    members = [u for u, s in world["segment_of"].items() if s == 2]
    args = (2, members, world["fit"], world["val"], globals_by_dim, world["item_ids"])
    with _parent(world["settings"]) as parent:
        first = search_segment(*args, world["settings"], log=lambda m: None)
    second = search_segment(*args, world["settings"], track=False, log=lambda m: None)
    assert first.best_params == second.best_params and first.best_value == second.best_value
    assert [t.value for t in first.study.trials] == [t.value for t in second.study.trials]
    assert set(first.best_params) == {"lr", "weight_decay", "dropout", "embedding_dim"}
    tuning = world["settings"].tuning
    assert tuning.lr_range[0] <= first.best_params["lr"] <= tuning.lr_range[1]
    assert first.best_params["embedding_dim"] in (8, 16) and first.n_trials == 4
    other = world["settings"].model_copy(update={"tuning": tuning.model_copy(update={"optuna_seed": 1})})
    third = search_segment(*args, other, track=False, log=lambda m: None)
    assert third.study.trials[0].params != first.study.trials[0].params

    runs = mlflow.search_runs(
        experiment_names=[world["settings"].mlflow.experiment], filter_string=f"attributes.run_id = '{first.run_id}'"
    )
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.mlflow.parentRunId"] == parent.info.run_id
    assert run["params.segment"] == "2" and run["params.n_trials"] == "4"
    assert float(run["params.best_lr"]) == pytest.approx(first.best_params["lr"])
    assert run["params.best_embedding_dim"] == str(first.best_params["embedding_dim"])
    assert run["metrics.best_value"] == pytest.approx(first.best_value)
    assert run["metrics.global_ndcg"] == pytest.approx(first.global_ndcg)
    client = mlflow.MlflowClient()
    history = client.get_metric_history(first.run_id, "trial_value")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [t.value for t in first.study.trials]
    )
    assert len(client.get_metric_history(first.run_id, "trial_lr")) == 4
    trials = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=first.run_id, artifact_path="trials.csv"))
    assert len(trials) == 4 and trials["value"].max() == pytest.approx(first.best_value)


class _parent:
    """A parent MLflow run in the test experiment."""

    def __init__(self, settings):
        self.settings = settings

    def __enter__(self):
        from core.tracking import configure

        configure(self.settings)
        self.run = mlflow.start_run(run_name="segment-tuning-parent")
        return self.run

    def __exit__(self, *exc):
        mlflow.end_run()


def test_tune_segments_searches_then_judges_on_other_users(world, globals_by_dim):
    result = tune_segments(
        world["global"],
        world["fit"],
        world["val"],
        world["segment_of"],
        world["item_ids"],
        world["settings"],
        globals_by_dim=globals_by_dim,
        progress=False,
        log=lambda m: None,
    )
    rows = {r["segment"]: r for r in result.results}
    assert set(rows) == {0, 1, 2, 3, TINY} and set(result.searches) == {0, 1, 2, 3}
    assert rows[TINY]["gain"] is None and "min_validation_users" in rows[TINY]["reason"]
    relevant = _relevant_by_hand(world["fit"], world["val"], list(world["segment_of"]))
    client = mlflow.MlflowClient()
    for segment in (0, 1, 2, 3):
        row, search = rows[segment], result.searches[segment]
        members = [u for u, s in world["segment_of"].items() if s == segment]
        assert row["search_users"] + row["validation_users"] == sum(u in relevant for u in members)
        assert abs(row["search_users"] - row["validation_users"]) <= 1
        assert row["params"] == pytest.approx(search.best_params)
        assert row["kept"] == (row["gain"] > 0) and (segment in result.models) == row["kept"]
        metrics = client.get_run(search.run_id).data.metrics
        assert metrics["gain"] == pytest.approx(row["gain"]) and metrics["kept"] == float(row["kept"])
    assert result.to_dict()["searches"]["0"]["n_trials"] == 4
    print(
        "segment: (search best, decision global, decision fine-tuned, kept, params)",
        {
            s: (
                round(r["search_value"], 4),
                round(r["global_ndcg"], 4),
                round(r["finetuned_ndcg"], 4),
                r["kept"],
                {k: round(v, 5) for k, v in r["params"].items()},
            )
            for s, r in rows.items()
            if r["gain"] is not None
        },
    )


def test_misuse_raises_clear_errors(world, globals_by_dim):
    s = world["settings"]
    other_users = world["fit"][world["fit"]["user_id"] != world["fit"]["user_id"].iloc[0]]
    stranger = fit_neural(
        NeuralData.build(other_users, world["item_ids"]), s.neural.model_copy(update={"epochs": 1}), progress=False
    )
    with pytest.raises(ValueError, match="must be trained on fit_frame"):
        fine_tune_segments(stranger, world["fit"], world["val"], world["segment_of"], world["item_ids"], s)
    with pytest.raises(ValueError, match="unknown parameter"):
        finetune_config(world["global"].cfg, s.tuning, {"momentum": 0.9})
    with pytest.raises(ValueError, match="embedding_dim 8 differs"):
        finetune_config(world["global"].cfg, s.tuning, {"embedding_dim": 8})
    with pytest.raises(ValueError, match="validation users"):
        search_segment(
            TINY,
            [u for u, g in world["segment_of"].items() if g == TINY],
            world["fit"],
            world["val"],
            globals_by_dim,
            world["item_ids"],
            s,
            track=False,
        )
    with pytest.raises(ValueError, match="no user"):
        fine_tune(world["global"], None, [], world["global"].cfg)
    with pytest.raises(ValidationError, match="lr_range"):
        TuningSettings(lr_range=(1e-2, 1e-3))


def test_segment_fine_tuning_beats_the_same_recipe_on_all_users(tmp_path, settings):
    """20k events: per segment, fine-tuning on the segment's users vs fine-tuning the same
    global model by the same recipe on every user (more epochs alone), both against the
    global model on the segment's validation users."""
    generate(tmp_path, events=20_000, groups=4, seed=3, progress=False)
    frame = pd.read_parquet(tmp_path / "interactions", columns=["user_id", "item_id"]).drop_duplicates()
    truth = pd.read_parquet(tmp_path / "ground_truth" / "users.parquet")
    segment_of = dict(zip(truth["user_id"], truth["group"].astype(int)))
    s = settings.model_copy(
        update={
            "neural": NeuralSettings(embedding_dim=16, hidden=[32], epochs=60, batch_size=64, lr=3e-3, seed=0),
            "tuning": TuningSettings(segment_finetune_epochs=5, min_validation_users=10),
        }
    )
    item_ids = np.array(sorted(frame["item_id"].unique()), dtype=object)
    fit, val = validation_split(frame, s)
    global_rec = fit_neural(NeuralData.build(fit, item_ids), s.neural, progress=False)
    result = fine_tune_segments(global_rec, fit, val, segment_of, item_ids, s, log=lambda m: None)
    everyone = fine_tune(
        global_rec,
        InteractionMatrix.from_frame(fit, item_ids=item_ids),
        list(global_rec.user_ids),
        finetune_config(global_rec.cfg, s.tuning),
    )
    lift = {}
    for row in result.results:
        members = [u for u, g in segment_of.items() if g == row["segment"]]
        relevant = _relevant_by_hand(fit, val, members)
        control = _ndcg_by_hand(everyone, fit, item_ids, relevant)
        lift[row["segment"]] = (round(row["global_ndcg"], 4), round(control, 4), round(row["finetuned_ndcg"], 4))
    print("segment: (global, all-users fine-tune, segment fine-tune)", lift)
    assert np.mean([seg - ctl for _, ctl, seg in lift.values()]) > 0


def test_refit_segment_models_fine_tunes_each_kept_segment_with_its_parameters(world):
    """The served models: no keep/discard decision, the chosen parameters, a global model of
    another dimension trained when a segment chose it; the start model is not modified."""
    from training.segment_tuning import kept_params, refit_segment_models

    tuning = {
        "results": [
            {"segment": 0, "kept": True, "params": {"lr": 3e-3, "embedding_dim": 16}},
            {"segment": 1, "kept": True, "params": {"embedding_dim": 8, "dropout": 0.2}},
            {"segment": 2, "kept": False, "params": {"lr": 1e-2}},
            {"segment": "nobody", "kept": True, "params": {}},
        ]
    }
    params = kept_params(tuning)
    assert set(params) == {"0", "1", "nobody"}
    segment_of = {u: str(s) for u, s in world["segment_of"].items()}
    messages: list[str] = []
    models = refit_segment_models(
        world["global"], world["fit"], world["item_ids"], params, segment_of, world["settings"], log=messages.append
    )
    assert set(models) == {"0", "1"} and any("'nobody': no user" in m for m in messages)
    state = world["global"].net.state_dict()
    assert all(torch.equal(state[name], world["snapshot"][name]) for name in state)
    assert models["0"].cfg.embedding_dim == 16 and models["0"].cfg.lr == pytest.approx(3e-3)
    assert not torch.equal(models["0"].net.state_dict()["item_bias"], state["item_bias"])
    assert models["1"].cfg.embedding_dim == 8 and models["1"].cfg.dropout == pytest.approx(0.2)
    assert models["1"].net.state_dict()["user_id.weight"].shape[1] == 8


def test_neural_scorer_routes_users_to_their_segment_model_and_round_trips(world, tuned, tmp_path):
    from training.candidates import NeuralScorer, load_scorer, save_scorer

    result, _ = tuned
    kept = next(iter(result.models))
    models = {str(kept): result.models[kept]}
    routing = {u: str(s) for u, s in world["segment_of"].items()}
    scorer = NeuralScorer(world["global"], models, routing)
    assert set(scorer.user_segments.values()) == {str(kept)}  # users of segments without a model are not routed
    inside = next(u for u in world["global"].user_ids if world["segment_of"].get(u) == kept)
    outside = next(u for u in world["global"].user_ids if world["segment_of"].get(u) not in (kept, None))
    users = [inside, outside, None]
    x = sp.csr_matrix(np.eye(3, len(world["item_ids"]), dtype=np.float32))
    scores = scorer.score(x, users)
    np.testing.assert_allclose(scores[0], result.models[kept].score(x[[0]], [inside])[0], rtol=1e-6)
    np.testing.assert_allclose(scores[1:], world["global"].score(x[[1, 2]], [outside, None]), rtol=1e-6)
    assert not np.allclose(scores[0], scorer.without_segments().score(x[[0]], [inside])[0])
    loaded = load_scorer(save_scorer(scorer, tmp_path / "neural"))
    assert loaded.user_segments == {str(u): s for u, s in scorer.user_segments.items()}
    np.testing.assert_allclose(loaded.score(x, [str(inside), str(outside), None]), scores, rtol=1e-6)
    plain = load_scorer(save_scorer(scorer.without_segments(), tmp_path / "neural"))  # a re-save drops them
    assert plain.segment_models == {} and not (tmp_path / "neural" / "segments").exists()
