"""The recommendation logic behind the API on a real fitted hybrid: candidate scoring through
the model's own scoring interface, ANN retrieval, filters, MMR, explanations, cold start and INT8."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from fixtures_serving import hybrid_bundle, hybrid_frames

from core.settings import ServingSettings
from serving.recommender import RecommendationRequest, RequestError, ServedModel
from serving.rerank import intra_list_diversity, mmr, normalize_rows
from serving.retrieval import AnnIndex, CandidateScorer, ItemSpace
from serving.segments import SegmentProfiles
from training.bundle import Bundle, load_bundle


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return hybrid_bundle(tmp_path_factory.mktemp("hybrid") / "b", als=True)


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


def served(bundle: Bundle, bundle_dir: Path | None, **settings) -> ServedModel:
    return ServedModel(bundle, bundle_dir, ServingSettings(**settings))


def req(user: str, k: int = 5, **kw) -> RecommendationRequest:
    return RecommendationRequest(user, k, **kw)


def ask(model: ServedModel, request: RecommendationRequest, recent: list[str]) -> dict:
    """The response body of ``model.recommend`` as a plain dict."""
    body = model.recommend(request, recent)
    return body if isinstance(body, dict) else body.model_dump()


def ids(body: dict) -> list[str]:
    return [i["item_id"] for i in body["items"]]


def test_candidate_scores_equal_the_full_model(bundle: Bundle) -> None:
    model = bundle.model
    assert set(model.components) == {"als", "content", "neural", "popularity"}
    scorer = CandidateScorer(model)
    rng = np.random.default_rng(0)
    cases = [("u3", []), ("u3", [5, 7]), (None, [1, 2]), (None, [30])]
    for user, extra in cases:
        row = bundle.row(user, np.array(extra, dtype=np.int32))
        full = model.score(row, [user])[0]
        state = scorer.prepare(row, user)
        np.testing.assert_allclose(scorer.score(state, np.arange(bundle.n_items)), full, rtol=1e-5, atol=1e-5)
        subset = rng.choice(bundle.n_items, 7, replace=False)
        np.testing.assert_allclose(scorer.score(state, subset), full[subset], rtol=1e-5, atol=1e-5)
        # Each component alone, and a batch of rows: the same interface, the same numbers.
        batch = bundle.row(user, np.array(extra, dtype=np.int32))
        rows = sp.vstack([batch, bundle.row("u5", np.empty(0, np.int32)), batch]).tocsr()
        ids = [user, "u5", user]
        for component in [model.anchor, *model.components.values()]:
            state = component.prepare(rows, ids)
            whole = component.score_items(state)
            np.testing.assert_allclose(component.score_items(state, subset), whole[:, subset], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(whole, component.score(rows, ids), rtol=0, atol=0)


def test_int8_model_is_served_in_place_of_the_float_one(bundle: Bundle) -> None:
    quantized = bundle.model.quantized()
    assert quantized.is_quantized() and not bundle.model.is_quantized()
    assert served(bundle, None).model is bundle.model
    row = bundle.row("u3", np.array([], dtype=np.int32))
    q_scores = quantized.score(row, ["u3"])[0]
    f_scores = bundle.model.score(row, ["u3"])[0]
    assert not np.allclose(q_scores, f_scores, atol=1e-7)  # really a different network
    scorer = CandidateScorer(quantized)
    np.testing.assert_allclose(
        scorer.score(scorer.prepare(row, "u3"), np.arange(bundle.n_items)), q_scores, rtol=1e-5, atol=1e-5
    )
    assert np.corrcoef(q_scores, f_scores)[0, 1] > 0.99
    model = served(bundle, None, quantized=True)
    assert model.quantized and model.describe()["quantized"] is True
    assert len(ask(model, req("u3", 10), [])["items"]) == 10


def test_ann_retrieval_then_hybrid_ranking(bundle: Bundle, bundle_dir: Path) -> None:
    # the plain relevance order (the exposure-aware re-ranker is tested in test_serving_exposure.py)
    ann = served(bundle, bundle_dir, candidates=10, exposure_strength=0.0)
    assert ann.ann_source == "neural" and ann.index is not None
    body = ask(ann, req("u3", 5), [])
    assert body["retrieval"] == "ann"
    row = bundle.row("u3", np.array([], dtype=np.int32))
    full = bundle.model.score(row, ["u3"])[0]
    seen = set(bundle.history["u3"].tolist())
    state = ann.scorer.prepare(row, "u3")
    retrieved = set(ann.index.search(ann.space.query(state), 10 + len(seen)).tolist()) - seen
    served_idx = [bundle.item_index[i] for i in ids(body)]
    assert set(served_idx) <= retrieved
    # Ranked by the full hybrid score among the retrieved candidates.
    expected = sorted(retrieved, key=lambda i: (-full[i], i))[:5]
    assert served_idx == expected
    assert [i["score"] for i in body["items"]] == pytest.approx([float(full[i]) for i in expected], rel=1e-5)

    exact = served(bundle, bundle_dir, candidates=1000, exposure_strength=0.0)
    assert exact.index is None
    body = ask(exact, req("u3", 5), [])
    assert body["retrieval"] == "exact"
    unseen = [i for i in range(bundle.n_items) if i not in seen]
    assert [bundle.item_index[i] for i in ids(body)] == sorted(unseen, key=lambda i: (-full[i], i))[:5]


def test_hnsw_index_finds_the_true_inner_product_neighbours(bundle: Bundle) -> None:
    scorer = CandidateScorer(bundle.model)
    space = ItemSpace.of(bundle.model)
    assert space is not None and space.source == "neural" and space.vectors.shape[1] == 9  # 8 dims + the item bias
    samples = np.stack(
        [
            space.query(scorer.prepare(bundle.row(u, np.array([], dtype=np.int32)), u))
            for u in ("u10", "u11", "u12", "u13")
        ]
    )
    index = AnnIndex(space.vectors, samples, 10)
    assert index.recall >= 0.95 and index.kind in ("hnsw-ip", "hnsw-lifted-l2")
    for user in ("u1", "u2", "u7"):
        query = space.query(scorer.prepare(bundle.row(user, np.array([], dtype=np.int32)), user))
        truth = np.argsort(-(space.vectors @ query), kind="stable")[:10]
        assert len(set(index.search(query, 10).tolist()) & set(truth.tolist())) >= 9


def test_ann_recall_with_uneven_norms() -> None:
    """Inner products over vectors whose norms vary a lot, and over a dominant bias column:
    the calibrated index keeps recall high on fresh queries (calibration used other ones)."""
    rng = np.random.default_rng(0)
    items = rng.normal(size=(3000, 16)) * rng.lognormal(0, 0.7, size=(3000, 1))
    index = AnnIndex(items, rng.normal(size=(16, 16)), 50)
    assert index.kind != "flat-ip" and index.recall >= 0.95
    recalls = []
    for query in rng.normal(size=(40, 16)):
        truth = np.argsort(-(items @ query), kind="stable")[:50]
        found = index.search(query, 50)
        assert len(found) == 50
        recalls.append(len(set(found.tolist()) & set(truth.tolist())) / 50)
    assert np.mean(recalls) >= 0.93

    # A huge bias column (as the neural item bias can be): whichever graph reaches the recall is kept.
    biased = np.hstack([rng.normal(size=(3000, 8)), rng.normal(0, 20, size=(3000, 1))])
    queries = np.hstack([rng.normal(size=(56, 8)), np.ones((56, 1))])
    index = AnnIndex(biased, queries[:16], 50)
    found = [set(index.search(q, 50).tolist()) for q in queries[16:]]
    truth = [set(np.argsort(-(biased @ q), kind="stable")[:50].tolist()) for q in queries[16:]]
    assert np.mean([len(f & t) / 50 for f, t in zip(found, truth)]) >= 0.93

    # Nothing reaches an impossible target: exact search, recall 1.
    exact = AnnIndex(items[:500], rng.normal(size=(4, 16)), 50, target_recall=1.01)
    assert exact.kind == "flat-ip"
    query = rng.normal(size=16)
    assert exact.search(query, 20).tolist() == np.argsort(-(items[:500] @ query), kind="stable")[:20].tolist()


def test_filters_and_unknown_names(bundle: Bundle, bundle_dir: Path) -> None:
    model = served(bundle, bundle_dir, candidates=10, exposure_strength=0.0)  # the plain relevance order
    news = {i for i, cats in zip(bundle.item_ids, bundle.categories) if "news" in cats}
    body = ask(model, req("u3", 5, categories=("news",)), [])
    assert len(body["items"]) == 5 and set(ids(body)) <= news
    assert all("news" in i["categories"] for i in body["items"])
    both = ask(model, req("u3", 40, categories=("news", "drama")), [])
    assert all({"news", "drama"} & set(i["categories"]) for i in both["items"])
    top = ids(ask(model, req("u3", 3), []))
    dropped = ask(model, req("u3", 3, exclude_items=tuple(top[:2])), [])
    assert not set(top[:2]) & set(ids(dropped)) and ids(dropped)[0] == top[2]
    with pytest.raises(RequestError, match=r"unknown categories \['horror', 'zzz'\]"):
        ask(model, req("u3", categories=("news", "zzz", "horror")), [])
    with pytest.raises(RequestError, match="unknown item ids \\['nope'\\]"):
        ask(model, req("u3", exclude_items=("nope",)), [])


def test_mmr_diversity_changes_the_list_and_raises_intra_list_diversity(bundle: Bundle, bundle_dir: Path) -> None:
    model = served(bundle, bundle_dir)
    assert model.sim_source == "content"
    content = normalize_rows(np.stack(hybrid_frames(0)[1]["embedding"].to_list()))
    gains = []
    for user in ("u1", "u2", "u3", "u4"):
        plain = ask(model, req(user, 8, diversity=0.0), [])
        diverse = ask(model, req(user, 8, diversity=1.0), [])
        assert ids(plain) != ids(diverse) and ids(plain)[0] == ids(diverse)[0]
        ild = [intra_list_diversity([bundle.item_index[i] for i in ids(b)], content) for b in (plain, diverse)]
        assert diverse["intra_list_diversity"] == pytest.approx(ild[1], rel=1e-5)
        gains.append(ild[1] - ild[0])
    assert min(gains) > 0


def test_mmr_on_hand_made_vectors() -> None:
    vectors = normalize_rows(np.array([[1, 0], [1, 0.01], [1, 0.02], [0, 1]], dtype=np.float32))
    pool, relevance = np.arange(4), np.array([1.0, 0.9, 0.8, 0.1])
    assert mmr(pool, relevance, vectors, 3, 0.0).tolist() == [0, 1, 2]
    assert mmr(pool, relevance, vectors, 3, 0.5).tolist() == [0, 3, 1]
    assert intra_list_diversity([0, 3], vectors) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="diversity"):
        mmr(pool, relevance, vectors, 2, 1.5)


def test_explanations_name_the_most_linked_history_item(bundle: Bundle, bundle_dir: Path) -> None:
    model = served(bundle, bundle_dir)
    weights = bundle.model.anchor.weights
    liked = 0
    for user in ("u1", "u2", "u3"):
        body = ask(model, req(user, 10, explain=True), ["m39"])
        history = np.unique(np.concatenate([bundle.history[user], [bundle.item_index["m39"]]]))
        for item in body["items"]:
            assert item["reason"] and item["reason_kind"] in ("liked", "popular", "profile")
            if item["reason_kind"] == "liked":
                liked += 1
                i = bundle.item_index[item["item_id"]]
                best = history[np.argmax(weights[history, i])]
                assert item["because_item_id"] == bundle.item_ids[best]
                assert item["reason"] == f"because you liked {bundle.titles[best]}"
    assert liked >= 20
    assert ask(model, req("u1", 3), [])["items"][0].get("reason") is None
    cold = ask(model, req("stranger", 3, explain=True, attributes={"age": 25}), [])
    assert {i["reason"] for i in cold["items"]} == {"popular in your segment"}


def test_cold_start_by_segment_then_by_session(bundle: Bundle, bundle_dir: Path) -> None:
    model = served(bundle, bundle_dir, exposure_strength=0.0)  # the plain popularity orders
    profiles = SegmentProfiles.load(bundle_dir, bundle.n_items)
    young = ask(model, req("new-1", 6, attributes={"age": 21}), [])
    old = ask(model, req("new-2", 6, attributes={"age": 66, "gender": "M"}), [])
    assert young["cold_start"] and young["strategy"] == "segment_popularity" and young["segment"] == "young"
    assert old["segment"] == "old" and "age, gender" in old["strategy_detail"]
    for body, label in ((young, "young"), (old, "old")):
        pop = profiles.popularity[profiles.labels.index(label)]
        expected = sorted(range(bundle.n_items), key=lambda i: (-pop[i], i))[:6]
        assert [bundle.item_index[i] for i in ids(body)] == expected
    assert ids(young) != ids(old)
    young_cats = sum(bool({"action", "comedy"} & set(i["categories"])) for i in young["items"])
    assert young_cats >= 4

    plain = ask(model, req("new-3", 6), [])
    assert plain["strategy"] == "global_popularity" and plain["strategy_detail"] == "no demographics or context given"
    unknown_value = ask(model, req("new-3", 6, attributes={"gender": "X"}), [])
    assert unknown_value["strategy"] == "global_popularity" and "gender" in unknown_value["strategy_detail"]

    session = ask(model, req("new-4", 6, attributes={"age": 21}), ["m03", "m07"])
    assert session["strategy"] == "session_content+segment_popularity" and session["cold_start"]
    assert not {"m03", "m07"} & set(ids(session))

    no_segments = served(bundle, None, exposure_strength=0.0)
    fallback = ask(no_segments, req("new-5", 6, attributes={"age": 21}), [])
    assert fallback["strategy"] == "global_popularity"
    assert fallback["strategy_detail"] == "bundle has no segment popularity"
    assert [bundle.item_index[i] for i in ids(fallback)] == sorted(
        range(bundle.n_items), key=lambda i: (-bundle.popularity[i], i)
    )[:6]


def test_nearest_segment_is_the_naive_bayes_map(bundle_dir: Path, bundle: Bundle) -> None:
    profiles = SegmentProfiles.load(bundle_dir, bundle.n_items)
    assert profiles.labels == ["old", "young"] and profiles.sizes.tolist() == [30, 30]
    assert profiles.nearest({"age": 19}) == (profiles.labels.index("young"), ["age"])
    assert profiles.nearest({"age": 55, "gender": "F"})[0] == profiles.labels.index("old")
    assert profiles.nearest({"gender": "nobody"}) is None
    assert profiles.nearest({}) is None


@pytest.fixture(scope="module")
def segmented_dir(tmp_path_factory) -> Path:
    return hybrid_bundle(tmp_path_factory.mktemp("segmented") / "b", segment_models=True)


def test_segment_models_travel_in_the_bundle_and_rank_their_users(segmented_dir: Path) -> None:
    """A known user of a segment with a fine-tuned model gets its neural scores (restricted
    scoring included, float and INT8); other users and unknown ones get the global model's."""
    from training.candidates import NeuralScorer

    bundle = load_bundle(segmented_dir)
    neural = bundle.model.components["neural"]
    assert isinstance(neural, NeuralScorer) and set(neural.segment_models) == {"young"}
    young = sorted(u for u, s in neural.user_segments.items())
    old = sorted(u for u in bundle.history if u not in neural.user_segments)
    assert young and old and all(int(u[1:]) % 2 == 0 for u in young)
    for model in (bundle.model, bundle.model.quantized()):
        scorer = CandidateScorer(model)
        for user, extra in (("u0", []), ("u1", []), ("u0", [3]), (None, [1, 2])):
            row = bundle.row(user, np.array(extra, dtype=np.int32))
            state = scorer.prepare(row, user)
            assert [segment for segment, _, _ in state.parts["neural"].groups] == ["young" if user == "u0" else None]
            assert model.segment_of(user) == ("young" if user == "u0" else None)
            np.testing.assert_allclose(
                scorer.score(state, np.arange(bundle.n_items)), model.score(row, [user])[0], rtol=1e-5, atol=1e-5
            )
    global_only = dataclasses.replace(
        bundle.model, components=bundle.model.components | {"neural": neural.without_segments()}
    )
    row = bundle.row("u0", np.array([], dtype=np.int32))
    assert not np.allclose(bundle.model.score(row, ["u0"])[0], global_only.score(row, ["u0"])[0], atol=1e-4)
    model = served(bundle, segmented_dir)
    assert model.describe()["segment_models"] == 1
    body = ask(model, req("u0", 5), [])
    assert body["segment"] == "young" and "fine-tuned for segment young" in body["strategy_detail"]
    assert ask(model, req("u1", 5), [])["segment"] is None
