"""The neural hybrid on a slice of ml-100k (u75 split): accuracy against popularity,
cold-start scoring from events, save/load, INT8 quantization and config errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydantic
import pytest
import scipy.sparse as sp
import torch

from core.datasets.movielens import GENRES, read_items, read_ratings, read_users
from pipelines.split import u75_split
from training.metrics import evaluate
from training.models import fit_popularity
from training.neural import NeuralConfig, NeuralData, NeuralRecommender, fit_neural, is_quantized, quantize_int8

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
