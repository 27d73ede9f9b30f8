"""The exposure-aware re-ranker as served (serving.exposure_* settings) on a real fitted hybrid:
strength 0 serves the relevance order, a positive strength changes the served lists, meets the
long-tail floor and moves each list's genre mix towards the user's history."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fixtures_serving import hybrid_bundle

from core.settings import ServingSettings
from serving.recommender import RecommendationRequest, ServedModel
from training.bundle import Bundle, load_bundle
from training.rerank import genre_distribution, kl_divergence

USERS = [f"u{n}" for n in range(1, 21)]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return hybrid_bundle(tmp_path_factory.mktemp("hybrid") / "b")


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


def lists(bundle: Bundle, bundle_dir: Path, k: int = 8, **settings) -> tuple[ServedModel, dict[str, list[int]]]:
    model = ServedModel(bundle, bundle_dir, ServingSettings(**settings))
    out = {}
    for user in USERS:
        body = model.recommend(RecommendationRequest(user, k), [])
        out[user] = [bundle.item_index[i.item_id] for i in body.items]
    return model, out


def test_strength_zero_serves_the_relevance_order(bundle: Bundle, bundle_dir: Path) -> None:
    _, served = lists(bundle, bundle_dir, exposure_strength=0.0, exposure_tail_share=0.5)
    for user in USERS:
        scores = bundle.model.score(bundle.row(user, np.empty(0, np.int32)), [user])[0].astype(np.float64)
        scores[bundle.history[user]] = -np.inf
        expected = np.lexsort((np.arange(len(scores)), -scores))[:8]
        assert served[user] == expected.tolist()


def test_the_setting_changes_the_served_list(bundle: Bundle, bundle_dir: Path) -> None:
    _, plain = lists(bundle, bundle_dir, exposure_strength=0.0)
    model, fair = lists(bundle, bundle_dir, exposure_strength=0.5, exposure_tail_share=0.5)
    tail = model.exposure.tail
    assert 0 < tail.sum() < len(tail)
    assert sum(plain[u] != fair[u] for u in USERS) >= len(USERS) // 2
    for user in USERS:
        assert tail[fair[user]].sum() >= math.ceil(0.5 * 8)  # the floor holds on every list
    assert sum(tail[fair[u]].sum() for u in USERS) > sum(tail[plain[u]].sum() for u in USERS)
    # calibration alone (no floor) brings the genre mix closer to the history
    _, calibrated = lists(bundle, bundle_dir, exposure_strength=0.5, exposure_tail_share=0.0)
    assert mean_kl(model, bundle, calibrated) < mean_kl(model, bundle, plain)


def mean_kl(model: ServedModel, bundle: Bundle, served: dict[str, list[int]]) -> float:
    """Mean miscalibration KL(history genres ‖ list genres) over the served lists."""
    genres = model.exposure.genres
    return float(
        np.mean(
            [
                kl_divergence(genre_distribution(bundle.history[u], genres), genre_distribution(np.array(got), genres))
                for u, got in served.items()
            ]
        )
    )


def test_cold_users_get_the_floor_and_mmr_takes_precedence(bundle: Bundle, bundle_dir: Path) -> None:
    model = ServedModel(bundle, bundle_dir, ServingSettings(exposure_strength=0.3, exposure_tail_share=0.5))
    cold = model.recommend(RecommendationRequest("nobody", 6), [])
    assert model.exposure.tail[[bundle.item_index[i.item_id] for i in cold.items]].sum() >= 3
    plain = ServedModel(bundle, bundle_dir, ServingSettings(exposure_strength=0.0))
    mmr_on = [i.item_id for i in model.recommend(RecommendationRequest("u1", 6, diversity=0.5), []).items]
    mmr_off = [i.item_id for i in plain.recommend(RecommendationRequest("u1", 6, diversity=0.5), []).items]
    assert mmr_on == mmr_off
