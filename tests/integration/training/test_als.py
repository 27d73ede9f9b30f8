import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from training.als import ITERATIONS_PER_STACK_MIB, FactorModel, fit_als, task_thread_stack_mib, thread_stack_mib
from training.metrics import evaluate
from training.models import InteractionMatrix, fit_popularity, top_k

N_USERS, N_ITEMS, N_GROUPS = 200, 120, 4


def _planted(seed: int = 0) -> pd.DataFrame:
    """~3,600 events: each user belongs to one of 4 taste groups and picks 75% of their
    items from that group's 30 items, the rest from the whole (Zipf-popular) catalogue."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
    pop /= pop.sum()
    rows = []
    for u in range(N_USERS):
        group = u % N_GROUPS
        own = np.arange(group * 30, (group + 1) * 30)
        picks = set(rng.choice(own, size=14, replace=False)) | set(rng.choice(N_ITEMS, size=5, replace=False, p=pop))
        rows += [(f"u{u:03d}", f"i{i:03d}") for i in sorted(picks)]
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


@pytest.fixture(scope="module")
def planted(spark):
    events = _planted()
    rng = np.random.default_rng(1)
    is_test = rng.random(len(events)) < 0.25
    train, test = events[~is_test], events[is_test]
    item_ids = np.array([f"i{i:03d}" for i in range(N_ITEMS)] + ["never_seen"], dtype=object)
    model = fit_als(spark, train, item_ids, rank=8, reg=0.05, alpha=10.0, max_iter=8, seed=3)
    return train, test, item_ids, model


def _ndcg(recommend, train, test, item_ids) -> float:
    m = InteractionMatrix.from_frame(train, item_ids=item_ids)
    relevant = test.groupby("user_id")["item_id"].apply(set).to_dict()
    users = [u for u in relevant if u in m.user_index]
    rows = np.array([m.user_index[u] for u in users])
    top = recommend(m.matrix[rows], rows)
    return evaluate({u: list(item_ids[t]) for u, t in zip(users, top)}, relevant, 10)["ndcg@10"]


@pytest.mark.spark
def test_als_beats_popularity_on_held_out_events(planted):
    train, test, item_ids, model = planted
    m = InteractionMatrix.from_frame(train, item_ids=item_ids)
    pop = fit_popularity(m.matrix)
    als_ndcg = _ndcg(lambda x, rows: model.recommend(x, 10, user_rows=rows), train, test, item_ids)
    pop_ndcg = _ndcg(lambda x, rows: pop.recommend(x, 10), train, test, item_ids)
    assert als_ndcg > 1.3 * pop_ndcg and als_ndcg > pop_ndcg + 0.05, (als_ndcg, pop_ndcg)


@pytest.mark.spark
def test_indices_follow_the_interaction_matrix_and_unseen_items_get_zeros(planted):
    train, _, item_ids, model = planted
    m = InteractionMatrix.from_frame(train, item_ids=item_ids)
    assert list(model.user_ids) == list(m.user_ids)
    assert model.user_factors.shape == (len(m.user_ids), 8) and model.user_factors.dtype == np.float32
    assert model.item_factors.shape == (len(item_ids), 8)
    assert np.all(model.item_factors[-1] == 0) and np.all(np.abs(model.item_factors[:-1]).sum(axis=1) > 0)
    # A user of group g scores group g's items highest on average.
    scores = model.score(np.array([m.user_index["u002"]]))[0]
    group_means = [scores[g * 30 : (g + 1) * 30].mean() for g in range(N_GROUPS)]
    assert int(np.argmax(group_means)) == 2


@pytest.mark.spark
def test_fold_in_of_a_known_user_reproduces_its_learned_factors(planted):
    train, _, item_ids, model = planted
    m = InteractionMatrix.from_frame(train, item_ids=item_ids)
    rows = np.arange(20)
    folded = model.fold_in(m.matrix[rows])
    np.testing.assert_allclose(folded, model.user_factors[rows], atol=1e-3)
    by_factors = model.recommend(m.matrix[rows], 10, user_rows=rows)
    by_history = model.recommend(m.matrix[rows], 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(by_factors, by_history)])
    assert overlap >= 0.9


@pytest.mark.spark
def test_unknown_user_is_scored_from_session_events(planted):
    _, _, item_ids, model = planted
    session = sp.csr_matrix((np.ones(4), ([0, 0, 0, 0], [90, 95, 100, 110])), shape=(2, len(item_ids)))
    top = model.recommend(session, 10)
    assert np.mean((top[0] >= 90) & (top[0] < 120)) >= 0.8  # group 3's items
    assert not set(top[0]) & {90, 95, 100, 110}
    assert np.all(model.score_history(session)[1] == 0)  # empty history: no preference


def test_fold_in_solves_the_weighted_least_squares():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 3)).astype(np.float32)
    model = FactorModel(np.array(["a"], dtype=object), np.zeros((1, 3), np.float32), y, reg=0.1, alpha=4.0)
    x = sp.csr_matrix(np.array([[2.0, 0, 1.0, 0, 0, 0]]))
    u = model.fold_in(x)[0].astype(np.float64)
    c = 1 + 4.0 * x.toarray()[0]
    p = (x.toarray()[0] > 0).astype(float)
    grad = -2 * (y.T * c) @ (p - y @ u) + 2 * 0.1 * 2 * u  # reg · n_u with n_u = 2
    np.testing.assert_allclose(grad, 0, atol=1e-4)


def test_top_k_excludes_seen_and_breaks_ties_by_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.5]])
    assert list(top_k(scores, sp.csr_matrix([[0, 1, 0, 0, 0]]), 3)[0]) == [0, 2, 4]
    with pytest.raises(ValueError, match="does not match"):
        top_k(scores, sp.csr_matrix((1, 4)), 2)


def test_fit_als_rejects_bad_arguments():
    frame = pd.DataFrame({"user_id": ["a"], "item_id": ["x"]})
    with pytest.raises(ValueError, match="rank"):
        fit_als(None, frame, np.array(["x"], dtype=object), rank=0)
    with pytest.raises(ValueError, match="no interactions"):
        fit_als(None, frame, np.array(["y"], dtype=object))


def test_thread_stack_is_read_from_jvm_options():
    assert thread_stack_mib("-Duser.timezone=UTC") == 1.0
    assert thread_stack_mib("-Xss16m -Dx=y") == 16.0
    assert thread_stack_mib("-Xss512k") == 0.5
    assert thread_stack_mib("-XX:ThreadStackSize=2048 -Xss4m") == 4.0


@pytest.mark.spark
def test_too_many_iterations_without_checkpointing_are_refused_before_spark_runs(spark):
    if spark.sparkContext.getCheckpointDir() is not None:
        pytest.skip("the session checkpoints, so any max_iter is allowed")
    limit = int(ITERATIONS_PER_STACK_MIB * task_thread_stack_mib(spark))
    frame = pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"]})
    with pytest.raises(ValueError, match=f"max_iter={limit + 1} without checkpointing"):
        fit_als(spark, frame, np.array(["x", "y"], dtype=object), rank=2, max_iter=limit + 1)
    assert spark.range(3).count() == 3  # the session is still alive
