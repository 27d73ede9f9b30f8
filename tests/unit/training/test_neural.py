"""The neural hybrid on a slice of ml-100k (u75 split): accuracy against popularity,
cold-start scoring from events, save/load, INT8 quantization and config errors; the
sampled softmax of large catalogues on a synthetic one, and the full softmax below its
threshold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic
import pytest
import scipy.sparse as sp
import torch

from core.datasets.movielens import GENRES, read_items, read_ratings, read_users
from pipelines.split import u75_split
from training import neural
from training.metrics import evaluate
from training.models import fit_popularity
from training.neural import (
    NegativeSampler,
    NeuralConfig,
    NeuralData,
    NeuralRecommender,
    build_net,
    fit_neural,
    is_quantized,
    quantize_int8,
)

USERS = 400  # the first 400 users of ml-100k
COLD_EVERY = 10  # every 10th of them is left out of training entirely (cold start)
CFG = NeuralConfig(epochs=30, batch_size=64, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core host, OpenMP threads spinning at barriers
    make these small matrices many times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(settings):
    source = settings.data_dir / "ml-100k"
    ratings = read_ratings(source)
    ratings = ratings[ratings["user_id"] <= USERS]
    train, test = u75_split(ratings)
    cold = set(range(COLD_EVERY, USERS + 1, COLD_EVERY))
    item_ids = np.array(sorted(ratings["item_id"].unique()), dtype=object)
    items = read_items(source).assign(item_id=lambda f: f["item_id"].astype(int)).set_index("item_id")
    genres = np.array([[g in cats for g in GENRES] for cats in items.loc[list(item_ids), "categories"]], np.float32)
    users = read_users(source).assign(user_id=lambda f: f["user_id"].astype(int))
    data = NeuralData.build(
        train[~train["user_id"].isin(cold)], item_ids, users[["user_id", "age", "gender", "occupation"]], genres
    )
    return {"train": train, "test": test, "cold": sorted(cold), "data": data}


@pytest.fixture(scope="module")
def model(corpus):
    return fit_neural(corpus["data"], CFG, progress=False)


def _history(corpus, users: list) -> sp.csr_matrix:
    """Rows of train history over the model's item axis for ``users`` (known or not)."""
    index = corpus["data"].interactions.item_index
    train = corpus["train"][corpus["train"]["user_id"].isin(users)]
    row = {u: r for r, u in enumerate(users)}
    return sp.csr_matrix(
        (
            np.ones(len(train), np.float32),
            (train["user_id"].map(row).to_numpy(), train["item_id"].map(index).to_numpy()),
        ),
        shape=(len(users), len(index)),
    )


def _ndcg(scores: np.ndarray, x: sp.csr_matrix, users: list, corpus) -> float:
    scores = scores.copy()
    scores[np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.indices] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    item_ids = corpus["data"].interactions.item_ids
    relevant = corpus["test"][corpus["test"]["user_id"].isin(users)].groupby("user_id")["item_id"].apply(set).to_dict()
    recs = {u: list(item_ids[t]) for u, t in zip(users, top)}
    return evaluate(recs, relevant, 10)["ndcg@10"]


def _warm(corpus) -> list:
    return list(corpus["data"].interactions.user_ids)


def test_beats_popularity_on_held_out_items(corpus, model):
    users = _warm(corpus)
    x = _history(corpus, users)
    neural = _ndcg(model.score(x, users), x, users, corpus)
    popular = _ndcg(fit_popularity(corpus["data"].interactions.matrix).score(x), x, users, corpus)
    assert popular > 0.15  # sanity: the metric sees real signal
    assert neural > popular + 0.08, (neural, popular)
    # Training reduced the multinomial loss.
    assert np.mean(model.losses[-10:]) < 0.92 * np.mean(model.losses[:10])


def test_unknown_users_are_scored_from_their_events(corpus, model):
    cold = corpus["cold"]
    assert not set(cold) & set(corpus["data"].interactions.user_ids)
    x = _history(corpus, cold)
    from_events = _ndcg(model.score(x, cold), x, cold, corpus)
    popular = _ndcg(fit_popularity(corpus["data"].interactions.matrix).score(x), x, cold, corpus)
    assert from_events > popular + 0.08, (from_events, popular)
    # Unknown ids and no ids are the same thing: zero ID embedding, zero user features.
    np.testing.assert_allclose(model.score(x, cold), model.score(x), rtol=0, atol=0)
    # No history at all: every unknown user gets the same (non-degenerate) list.
    empty = model.score(sp.csr_matrix((2, x.shape[1]), dtype=np.float32))
    np.testing.assert_allclose(empty[0], empty[1])
    assert np.std(empty[0]) > 0


def test_known_user_id_changes_the_score(corpus, model):
    users = _warm(corpus)[:5]
    x = _history(corpus, users)
    assert not np.allclose(model.score(x, users), model.score(x))
    assert model.user_embeddings(x, users).shape == (5, CFG.embedding_dim)
    assert model.item_embeddings().shape == (corpus["data"].n_items, CFG.embedding_dim)


def test_save_load_round_trip_gives_identical_scores(corpus, model, tmp_path):
    users = _warm(corpus)[:50] + corpus["cold"][:5]
    x = _history(corpus, users)
    model.save(tmp_path / "neural")
    loaded = NeuralRecommender.load(tmp_path / "neural")
    np.testing.assert_array_equal(loaded.score(x, users), model.score(x, users))
    assert list(loaded.item_ids) == list(model.item_ids) and list(loaded.user_ids) == list(model.user_ids)
    assert loaded.cfg == model.cfg and loaded.losses == model.losses
    assert loaded.user_feature_names == model.user_feature_names


def test_int8_quantized_model_keeps_ndcg_within_one_percent(corpus, model, tmp_path):
    users = _warm(corpus)
    x = _history(corpus, users)
    quantized = quantize_int8(model)
    assert is_quantized(quantized.net) and not is_quantized(model.net)
    float_ndcg = _ndcg(model.score(x, users), x, users, corpus)
    int8_ndcg = _ndcg(quantized.score(x, users), x, users, corpus)
    assert abs(int8_ndcg - float_ndcg) <= 0.01 * float_ndcg, (float_ndcg, int8_ndcg)
    assert not np.array_equal(quantized.score(x[:3], users[:3]), model.score(x[:3], users[:3]))
    with pytest.raises(ValueError, match="quantized"):
        quantized.save(tmp_path / "q")


def test_same_seed_same_model_and_different_seed_differs(corpus):
    small = corpus["data"]
    cfg = NeuralConfig(epochs=2, batch_size=128, seed=3)
    a, b = fit_neural(small, cfg, progress=False), fit_neural(small, cfg, progress=False)
    assert a.losses == b.losses
    c = fit_neural(small, NeuralConfig(epochs=2, batch_size=128, seed=4), progress=False)
    assert a.losses != c.losses


def test_user_features_are_encoded_and_missing_users_get_zeros():
    train = pd.DataFrame({"user_id": ["a", "a", "b", "c"], "item_id": [1, 2, 2, 3]})
    features = pd.DataFrame({"user_id": ["a", "b", "zz"], "age": [20.0, 40.0, 99.0], "segment": ["s1", "s2", "s1"]})
    data = NeuralData.build(train, np.array([1, 2, 3], dtype=object), features)
    assert data.user_feature_names == ["age", "segment=s1", "segment=s2"]
    dense = dict(zip(data.interactions.user_ids, data.user_dense))
    np.testing.assert_allclose(dense["a"], [-1.0, 1.0, 0.0])
    np.testing.assert_allclose(dense["b"], [1.0, 0.0, 1.0])
    np.testing.assert_allclose(dense["c"], [0.0, 0.0, 0.0])  # no feature row: zeros


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"hidden": [64, 0]}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"input_dropout": -0.1}, "input_dropout"),
        ({"batch_size": 0}, "batch_size"),
        ({"epocs": 3}, "epocs"),
        ({"full_softmax_max_items": -1}, "full_softmax_max_items"),
        ({"sampled_negatives": 0}, "sampled_negatives"),
    ],
)
def test_bad_config_raises_a_clear_error(fields, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        NeuralConfig(**fields)


def test_bad_inputs_raise_clear_errors(model):
    train = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2]})
    with pytest.raises(ValueError, match="item_features has shape"):
        NeuralData.build(train, np.array([1, 2], dtype=object), item_features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="lacks column 'confidence'"):
        NeuralData.build(train, np.array([1, 2], dtype=object), weight_col="confidence")
    with pytest.raises(ValueError, match="none of its 1 user ids occurs in train"):
        NeuralData.build(train, np.array([1, 2], dtype=object), pd.DataFrame({"user_id": ["1"], "age": [3]}))
    with pytest.raises(ValueError, match="item columns"):
        model.score(sp.csr_matrix((1, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="2 user ids for 1 history rows"):
        model.score(sp.csr_matrix((1, len(model.item_ids)), dtype=np.float32), ["a", "b"])


# --------------------------------------------------------------------------- sampled softmax
def _grouped(seed: int = 0, users: int = 600, groups: int = 15, per_group: int = 40, history: int = 16, held: int = 4):
    """Users in ``groups`` taste groups: each has ``history`` train items of its group's
    ``per_group`` (plus 2 random items anywhere) and ``held`` other items of the group held out."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for u in range(users):
        picked = rng.choice(per_group, history + held, replace=False) + (u % groups) * per_group
        seen = np.union1d(picked[:history], rng.choice(groups * per_group, 2, replace=False))
        train += [(u, int(i)) for i in seen]
        test += [(u, int(i)) for i in picked[history:] if i not in seen]
    columns = ["user_id", "item_id"]
    return pd.DataFrame(train, columns=columns), pd.DataFrame(test, columns=columns), groups * per_group


def test_sampled_softmax_trains_and_ranks_held_out_items():
    train, test, n_items = _grouped()
    item_ids = np.arange(n_items, dtype=object)
    data = NeuralData.build(train, item_ids)
    cfg = NeuralConfig(
        epochs=10,
        batch_size=16,
        lr=0.01,
        embedding_dim=32,
        hidden=[64],
        full_softmax_max_items=100,
        sampled_negatives=200,
    )
    # A step scores a part of the catalogue only: the batch's positives plus the negatives.
    x = data.interactions.matrix
    assert len(NegativeSampler(x, cfg).candidates(x[:16], 0, 0).items) < 0.7 * n_items
    model = fit_neural(data, cfg, progress=False)
    per_epoch = np.array(model.losses).reshape(cfg.epochs, -1).mean(axis=1)
    assert per_epoch[-1] < 0.9 * per_epoch[0], per_epoch
    users = list(data.interactions.user_ids)
    relevant = test.groupby("user_id")["item_id"].apply(set).to_dict()

    def ndcg(scores: np.ndarray) -> float:
        scores[np.repeat(np.arange(x.shape[0]), np.diff(x.indptr)), x.indices] = -np.inf
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return evaluate({u: list(item_ids[t]) for u, t in zip(users, top)}, relevant, 10)["ndcg@10"]

    sampled, popular = ndcg(model.score(x, users)), ndcg(fit_popularity(x).score(x))
    assert sampled > 0.2 and sampled > 10 * popular, (sampled, popular)


def test_negative_sampler_estimates_the_full_normaliser_without_bias():
    """``Σ_{j∈C} exp(s_j − o_j)`` averages to ``Σ_j exp(s_j)`` over the draws (logQ correction)."""
    rng = np.random.default_rng(0)
    x = sp.random(50, 400, density=0.05, format="csr", random_state=1, dtype=np.float32)
    x.data[:] = 1.0
    cfg = NeuralConfig(sampled_negatives=64)
    sampler = NegativeSampler(x, cfg)
    scores = rng.normal(0, 1.5, 400)
    batch = x[:5]
    estimates = []
    for step in range(500):
        c = sampler.candidates(batch, 0, step)
        positives = np.unique(batch.indices)
        assert np.all(np.diff(c.items) > 0) and set(positives) <= set(c.items)
        np.testing.assert_array_equal(c.offset[np.isin(c.items, positives)], 0.0)
        estimates.append(np.exp(scores[c.items] - c.offset).sum())
    assert np.mean(estimates) == pytest.approx(np.exp(scores).sum(), rel=0.05)  # per-draw spread: 28 %
    # Same position, same draws: the candidates depend on (seed, epoch, step) only.
    np.testing.assert_array_equal(sampler.candidates(batch, 2, 7).items, sampler.candidates(batch, 2, 7).items)


def test_below_the_threshold_training_is_the_full_softmax(corpus, monkeypatch):
    """Up to ``full_softmax_max_items`` items nothing is sampled and the first step's loss is
    exactly the full-catalogue multinomial loss of the initial net."""
    data = corpus["data"]
    cfg = NeuralConfig(epochs=1, batch_size=64, full_softmax_max_items=data.n_items)
    assert data.n_items <= NeuralConfig().full_softmax_max_items  # ml-100k: the default keeps the full path
    net = build_net(data, cfg)
    rows = np.random.default_rng([cfg.seed, 0]).permutation(data.n_users)[:64]
    step = neural._make_step(data.interactions.matrix, rows, cfg, 0, 0, 0, 1, torch.device("cpu"))
    net.train()
    logits = net(step.bag_index, step.bag_offsets, step.bag_weight, step.user_rows, step.user_masks, step.item_masks)
    assert logits.shape == (64, data.n_items)
    first = -(torch.log_softmax(logits, dim=1).reshape(-1)[step.target_flat] * step.target_weight).sum() / 64

    def no_sampling(*args, **kwargs):
        raise AssertionError("the sampler must not run below the threshold")

    monkeypatch.setattr(neural, "NegativeSampler", no_sampling)
    fitted = fit_neural(data, cfg, progress=False)
    assert fitted.losses[0] == float(first.detach())
    # One more item than the threshold switches to sampling.
    monkeypatch.undo()
    sampled = fit_neural(data, cfg.model_copy(update={"full_softmax_max_items": data.n_items - 1}), progress=False)
    assert sampled.losses[0] != fitted.losses[0]
