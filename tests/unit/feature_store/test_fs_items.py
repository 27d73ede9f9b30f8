"""Item features: content embeddings (TF-IDF and MiniLM), behavioural features, snapshots."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store import items as items_mod
from feature_store.items import (
    build_item_features,
    content_embeddings,
    item_texts,
    read_item_snapshot,
    tfidf_embeddings,
    write_item_snapshot,
)

AS_OF = pd.Timestamp("2024-03-31 12:00", tz="UTC")
HAS_MINILM = importlib.util.find_spec(items_mod.MINILM_PACKAGE) is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason=f"{items_mod.MINILM_PACKAGE} is not installed")

CORPUS = [
    ("Derby", "The football team won the league match with a late goal in the final minute."),
    ("Cup final", "The football team scored a late goal to win the cup match in the final minute."),
    ("Markets", "Stock prices fell sharply as investors sold shares amid inflation fears."),
    ("Rates", "The central bank raised interest rates to fight inflation and bond yields rose."),
    ("Recipe", "Bake the bread dough in a hot oven with flour, yeast and butter."),
    ("Garden", "Plant tomato seeds in spring and water the garden soil every morning."),
    ("Space", "The rocket launched a satellite into orbit around the planet Mars."),
    ("Music", "The orchestra played a symphony by Beethoven with violins and piano."),
]


def _items(rows=CORPUS) -> pd.DataFrame:
    return pd.DataFrame(
        {"item_id": [f"i{k}" for k in range(len(rows))], "title": [t for t, _ in rows], "text": [x for _, x in rows]}
    )


def _cos(m: np.ndarray, a: int, b: int) -> float:
    return float(m[a] @ m[b])


# --------------------------------------------------------------------------- texts and TF-IDF


def test_item_texts_joins_title_and_text_without_repeating_the_title():
    items = pd.DataFrame(
        {
            "title": ["Alpha", "Beta", "Toy Story (1995)"],
            "text": ["About a.", None, "Toy Story (1995). Genres: Animation"],
        }
    )
    assert item_texts(items) == ["Alpha. About a.", "Beta", "Toy Story (1995). Genres: Animation"]


def test_tfidf_shape_normalization_and_similarity():
    emb, method = content_embeddings(_items(), method="tfidf")
    assert method == "tfidf"
    assert emb.dtype == np.float32
    # n_components = min(64, n_features - 1, n_items - 1) = n_items - 1 here.
    assert emb.shape == (len(CORPUS), len(CORPUS) - 1)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert _cos(emb, 0, 1) > _cos(emb, 0, 2) + 0.3
    assert _cos(emb, 2, 3) > _cos(emb, 2, 4)


def test_tfidf_is_deterministic_and_caps_dimensions_at_64():
    rng = np.random.default_rng(0)
    vocab = [f"word{k}" for k in range(400)]
    texts = [" ".join(rng.choice(vocab, 12)) for _ in range(120)]
    a, b = tfidf_embeddings(texts), tfidf_embeddings(texts)
    assert a.shape == (120, 64)
    np.testing.assert_array_equal(a, b)


def test_tfidf_with_a_single_item_skips_svd():
    emb = tfidf_embeddings(["only one football story"])
    assert emb.shape[0] == 1 and emb.shape[1] >= 1
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-6)


def test_unknown_method_and_empty_items_are_rejected():
    with pytest.raises(ValueError, match="unknown embedding method"):
        content_embeddings(_items(), method="bert")
    with pytest.raises(ValueError, match="no items"):
        content_embeddings(_items([]), method="tfidf")


# --------------------------------------------------------------------------- MiniLM and fallback


@needs_minilm
def test_minilm_dimensions_normalization_and_semantics():
    items = _items([("football match result", ""), ("soccer game score", ""), ("stock market crash", "")])
    emb, method = content_embeddings(items, method="minilm")
    assert method == "minilm"
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert _cos(emb, 0, 1) > _cos(emb, 0, 2) + 0.2
    again, _ = content_embeddings(items, method="minilm", batch_size=2)
    np.testing.assert_allclose(emb, again, atol=1e-5)


@needs_minilm
def test_auto_uses_minilm_when_available():
    emb, method = content_embeddings(_items(CORPUS[:3]), method="auto")
    assert method == "minilm" and emb.shape == (3, 384)


def test_auto_falls_back_to_tfidf_and_says_why(monkeypatch, caplog):
    def broken():
        raise OSError("model files missing")

    monkeypatch.setattr(items_mod, "load_minilm", broken)
    with caplog.at_level(logging.WARNING, logger="feature_store.items"):
        emb, method = content_embeddings(_items(), method="auto")
    assert method == "tfidf"
    np.testing.assert_array_equal(emb, content_embeddings(_items(), method="tfidf")[0])
    assert "falling back to TF-IDF" in caplog.text and "OSError: model files missing" in caplog.text
    with pytest.raises(OSError, match="model files missing"):  # an explicit minilm never falls back
        content_embeddings(_items(), method="minilm")


def test_auto_falls_back_when_the_package_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(items_mod, "MINILM_PACKAGE", "no_such_minilm_package")
    items_mod.load_minilm.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="feature_store.items"):
            _, method = content_embeddings(_items(), method="auto")
    finally:
        items_mod.load_minilm.cache_clear()
    assert method == "tfidf"
    assert "ModuleNotFoundError" in caplog.text and "no_such_minilm_package" in caplog.text


# --------------------------------------------------------------------------- behavioural features


def _event(user, item, days_ago):
    return dict(user_id=user, item_id=item, event_type="view", timestamp=AS_OF - pd.Timedelta(days=days_ago))


def _frames():
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "title": ["A", "B", "C"],
            "categories": [["Drama", "Comedy"], None, ["News"]],
            "published_at": [AS_OF - pd.Timedelta(days=100), pd.NaT, AS_OF - pd.Timedelta(days=2.5)],
        }
    )
    events = pd.DataFrame(
        [
            _event("u1", "a", 1),
            _event("u1", "a", 2),
            _event("u2", "a", 3),  # last week: 3 events, 2 users
            _event("u3", "a", 10),  # week before: 1 event
            _event("u4", "a", 40),  # outside the 30-day window
            _event("u1", "b", 8),
            _event("u2", "b", 9),
            _event("u3", "b", 12),  # week before only
            _event("u9", "c", -1),
            _event("u9", "a", -5),  # after as_of: ignored
            _event("u5", "zz", 1),  # unknown item: ignored
        ]
    )
    return events, items


def test_item_features_values_on_a_crafted_frame():
    events, items = _frames()
    f = build_item_features(events, items, as_of=AS_OF, half_life_days=7.0).set_index("item_id")
    assert list(f.index) == ["a", "b", "c"]
    assert f.loc["a", "categories"] == ["Drama", "Comedy"] and f.loc["b", "categories"] == []
    assert f["n_categories"].tolist() == [2, 0, 1]
    assert f["popularity"].tolist() == [3, 3, 0]  # a: u1, u2, u3 (u4 is 40 days old)
    assert f.loc["a", "trend"] == pytest.approx((3 + 1) / (1 + 1))
    assert f.loc["b", "trend"] == pytest.approx((0 + 1) / (3 + 1))
    assert f.loc["c", "trend"] == pytest.approx(1.0)
    expected_a = sum(0.5 ** (d / 7.0) for d in (1, 2, 3, 10, 40))
    assert f.loc["a", "decayed_popularity"] == pytest.approx(expected_a)
    assert f.loc["c", "decayed_popularity"] == 0.0
    assert f.loc["a", "recency_days"] == pytest.approx(100.0)
    assert np.isnan(f.loc["b", "recency_days"])
    assert f.loc["c", "recency_days"] == pytest.approx(2.5)
    assert f.loc["a", "last_interaction_days"] == pytest.approx(1.0)
    assert f.loc["b", "last_interaction_days"] == pytest.approx(8.0)
    assert np.isnan(f.loc["c", "last_interaction_days"])


def test_item_features_are_point_in_time():
    events, items = _frames()
    base = build_item_features(events, items, as_of=AS_OF, half_life_days=7.0)
    future = pd.DataFrame([_event("u7", "b", -0.5), _event("u8", "c", -3), _event("u1", "a", -0.01)])
    with_future = build_item_features(
        pd.concat([events, future], ignore_index=True), items, as_of=AS_OF, half_life_days=7.0
    )
    pd.testing.assert_frame_equal(base, with_future)
    # An earlier as_of drops the later events: at as_of - 5 days item a's events at 1-3 days ago vanish.
    earlier = build_item_features(events, items, as_of=AS_OF - pd.Timedelta(days=5), half_life_days=7.0).set_index(
        "item_id"
    )
    assert earlier.loc["a", "popularity"] == 1  # only u3 (now 5 days old); u4 is 35 days old
    assert earlier.loc["a", "last_interaction_days"] == pytest.approx(5.0)


def test_item_features_reject_duplicate_items_and_missing_columns():
    events, items = _frames()
    with pytest.raises(ValueError, match="not unique"):
        build_item_features(events, pd.concat([items, items.iloc[:1]]), as_of=AS_OF, half_life_days=7.0)
    with pytest.raises(ValueError, match="missing columns"):
        build_item_features(events.drop(columns="user_id"), items, as_of=AS_OF, half_life_days=7.0)


# --------------------------------------------------------------------------- snapshots


def test_item_snapshot_round_trip(tmp_path):
    events, items = _frames()
    feats = build_item_features(events, items, as_of=AS_OF, half_life_days=7.0)
    emb = np.arange(9, dtype=np.float32).reshape(3, 3)
    path = write_item_snapshot(feats, emb, tmp_path, AS_OF)
    assert path == tmp_path / "date=2024-03-31" / "items.parquet"
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32())
    assert schema.field("categories").type == pa.list_(pa.string())
    assert schema.field("as_of").type == pa.timestamp("us", tz="UTC")
    back, back_emb = read_item_snapshot(tmp_path)
    np.testing.assert_array_equal(back_emb, emb)
    assert back["item_id"].tolist() == ["a", "b", "c"]
    assert (back["as_of"] == AS_OF).all()
    assert [list(c) for c in back["categories"]] == [["Drama", "Comedy"], [], ["News"]]
    with pytest.raises(ValueError, match="does not match"):
        write_item_snapshot(feats, emb[:2], tmp_path, AS_OF)
    with pytest.raises(FileNotFoundError):
        read_item_snapshot(tmp_path, as_of=AS_OF - pd.Timedelta(days=1))
