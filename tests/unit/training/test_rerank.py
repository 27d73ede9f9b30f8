"""The exposure-aware re-ranker (training/rerank.py): strength 0 is the relevance order, the
long-tail floor holds, calibration lowers the miscalibration KL, and the result is deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.rerank import exposure_rerank, genre_distribution, item_genre_matrix, kl_divergence


def _world(seed: int = 0, n_items: int = 60, n_genres: int = 5):
    rng = np.random.default_rng(seed)
    hot = (rng.random((n_items, n_genres)) < 0.3).astype(float)
    hot[np.arange(n_items), rng.integers(0, n_genres, n_items)] = 1.0
    genres = item_genre_matrix(hot)
    tail = np.zeros(n_items, dtype=bool)
    tail[n_items // 3 :] = True
    return rng, genres, tail


def test_strength_zero_returns_the_input_order_exactly() -> None:
    rng, genres, tail = _world()
    pool = rng.permutation(60)[:30]
    relevance = rng.random(30)
    expected = pool[np.lexsort((pool, -relevance))][:10]
    for share in (0.0, 0.5, 1.0):
        picked = exposure_rerank(
            pool, relevance, 10, strength=0.0, tail=tail, tail_share=share, genres=genres, target=genres[0]
        )
        assert picked.tolist() == expected.tolist()
    # ties in relevance go to the lower item index, as the plain top-k does
    assert exposure_rerank(np.array([7, 3, 5]), np.ones(3), 3, strength=0.0, tail=tail, tail_share=0).tolist() == [
        3,
        5,
        7,
    ]


@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 1.0])
def test_long_tail_floor_holds_when_the_pool_has_enough_tail_items(share: float) -> None:
    rng, genres, tail = _world(1)
    for _ in range(20):
        pool = rng.permutation(60)[:40]
        relevance = rng.random(40) + 3.0 * ~tail[pool]  # head items far more relevant
        k = 10
        picked = exposure_rerank(
            pool, relevance, k, strength=0.05, tail=tail, tail_share=share, genres=genres, target=genres[pool[0]]
        )
        assert len(picked) == k and len(set(picked.tolist())) == k and set(picked.tolist()) <= set(pool.tolist())
        assert tail[picked].sum() >= math.ceil(share * k)


def test_floor_takes_what_tail_items_there_are() -> None:
    _, genres, tail = _world(2)
    pool = np.array([0, 1, 2, 3, 40])  # one tail item only
    picked = exposure_rerank(pool, np.arange(5.0)[::-1], 4, strength=0.1, tail=tail, tail_share=0.5)
    # two tail slots owed of 4: the only tail item takes slot 3 (when the slots left equal the
    # debt), and the last slot falls back to the most relevant remaining item
    assert picked.tolist() == [0, 1, 40, 2]


def test_calibration_lowers_the_kl_divergence() -> None:
    rng, genres, tail = _world(3)
    before, after = [], []
    for _ in range(30):
        history = rng.choice(60, 15, replace=False)
        target = genre_distribution(history, genres)
        pool = rng.permutation(60)[:40]
        relevance = rng.random(40)
        plain = exposure_rerank(pool, relevance, 10, strength=0.0, tail=tail, tail_share=0.0)
        calibrated = exposure_rerank(
            pool, relevance, 10, strength=0.9, tail=tail, tail_share=0.0, genres=genres, target=target
        )
        before.append(kl_divergence(target, genre_distribution(plain, genres)))
        after.append(kl_divergence(target, genre_distribution(calibrated, genres)))
    assert np.mean(after) < 0.5 * np.mean(before)
    assert sum(a <= b + 1e-12 for a, b in zip(after, before)) >= 28


def test_deterministic_and_independent_of_pool_order() -> None:
    rng, genres, tail = _world(4)
    pool = rng.permutation(60)[:40]
    relevance = np.round(rng.random(40), 1)  # many ties
    target = genre_distribution(np.arange(10), genres)
    kw = {"strength": 0.3, "tail": tail, "tail_share": 0.3, "genres": genres, "target": target}
    first = exposure_rerank(pool, relevance, 10, **kw)
    assert exposure_rerank(pool, relevance, 10, **kw).tolist() == first.tolist()
    shuffle = rng.permutation(40)
    assert exposure_rerank(pool[shuffle], relevance[shuffle], 10, **kw).tolist() == first.tolist()


def test_distributions_and_kl_by_hand() -> None:
    genres = item_genre_matrix(np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]]))
    assert genres[0].tolist() == [0.5, 0.5, 0.0] and genres[2].tolist() == [0.0, 0.0, 0.0]
    p = genre_distribution(np.array([0, 1, 2]), genres)  # the genreless item carries no mass
    assert p.tolist() == pytest.approx([0.25, 0.25, 0.5])
    q = np.array([0.5, 0.5, 0.0])
    smoothed = 0.99 * q + 0.01 * p
    assert kl_divergence(p, q) == pytest.approx(float(np.sum(p * np.log(p / smoothed))))
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(np.zeros(3), q) == 0.0


def test_bad_settings_raise() -> None:
    _, _, tail = _world()
    with pytest.raises(ValueError, match="strength"):
        exposure_rerank(np.arange(3), np.ones(3), 2, strength=1.5, tail=tail, tail_share=0.0)
    with pytest.raises(ValueError, match="tail_share"):
        exposure_rerank(np.arange(3), np.ones(3), 2, strength=0.5, tail=tail, tail_share=-0.1)


def test_a_fractional_floor_is_met_over_users_by_the_stable_offset() -> None:
    from training.rerank import rerank_rows, user_offset

    assert user_offset("u1") == user_offset("u1") and 0 <= user_offset("u1") < 1
    rng, genres, tail = _world(5)
    users = [f"u{n}" for n in range(400)]
    # 12 head candidates (items 0..19) and 3 long-tail ones (items 20..59) per user
    pools = np.stack(
        [np.concatenate([rng.permutation(20)[:12], rng.choice(np.arange(20, 60), 3, replace=False)]) for _ in users]
    )
    scores = rng.random(pools.shape) + 2.0 * ~tail[pools]
    picks = rerank_rows(
        pools, scores, [np.arange(5)] * len(users), users, 10, strength=0.05, tail=tail, tail_share=0.05, genres=genres
    )
    per_list = np.array([tail[p].sum() for p in picks])
    assert set(per_list.tolist()) <= {0, 1}  # ⌊0.5 + o_u⌋
    assert per_list.tolist() == [int(user_offset(u) >= 0.5) for u in users]
    assert 0.4 < per_list.mean() < 0.6  # 5 % of the slots on average
