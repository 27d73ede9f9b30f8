import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from training.content import fit_content, item_embeddings_for


def _catalogue():
    """Items 0-3 are category A, 4-7 category B (orthogonal directions plus small noise);
    item 8 has no content."""
    rng = np.random.default_rng(0)
    emb = np.zeros((9, 6))
    emb[:4, 0] = 1.0
    emb[4:8, 1] = 1.0
    emb[:8, 2:] = rng.normal(scale=0.1, size=(8, 4))
    return emb


def test_content_model_ranks_the_favoured_category_first():
    emb = _catalogue()
    # user 0: three A items and one B item; user 1: B only; user 2 weighs B 5x over A.
    x = sp.csr_matrix(
        np.array(
            [
                [1, 1, 1, 0, 1, 0, 0, 0, 0],
                [0, 0, 0, 0, 1, 1, 0, 0, 0],
                [1, 0, 0, 0, 5, 0, 0, 0, 0],
            ],
            dtype=np.float32,
        )
    )
    model = fit_content(x, emb, weighting="none")
    top = model.recommend(x, k=3)
    assert top[0][0] == 3  # the only unseen A item
    assert set(top[1][:2]) == {6, 7}
    assert set(top[2][:3]) == {5, 6, 7}
    scores = model.score(x)
    assert np.all(scores[:, 8] == 0) and np.all(np.abs(scores) <= 1 + 1e-6)


def test_cold_user_from_session_events_and_empty_history():
    emb = _catalogue()
    train = sp.csr_matrix(np.eye(9, dtype=np.float32))
    model = fit_content(train, emb)
    session = sp.csr_matrix(np.array([[0, 0, 0, 0, 0, 1, 0, 0, 0], [0] * 9], dtype=np.float32))
    scores = model.score(session)
    assert set(np.argsort(-scores[0])[:4]) == {4, 5, 6, 7}
    assert np.all(scores[1] == 0)


def test_idf_weighting_discounts_items_everyone_has():
    emb = _catalogue()
    # item 0 (A) is in every history; item 4 (B) only in user 0's.
    x = sp.csr_matrix(np.array([[1, 0, 0, 0, 1, 0, 0, 0, 0]] + [[1, 0, 0, 0, 0, 0, 0, 0, 0]] * 5, dtype=np.float32))
    plain, idf = fit_content(x, emb, weighting="none"), fit_content(x, emb, weighting="idf")
    assert idf.item_weights[4] > idf.item_weights[0]

    def b_over_a(m):
        return m.score(x[:1])[0, 5] - m.score(x[:1])[0, 1]

    assert abs(b_over_a(plain)) < 0.1  # equal weights: A and B pull the profile alike
    assert b_over_a(idf) > b_over_a(plain) + 0.2


def test_embeddings_are_aligned_by_id_and_shapes_checked():
    items = pd.DataFrame({"item_id": ["10", "20", "30"]})
    emb = np.arange(6, dtype=np.float32).reshape(3, 2)
    aligned = item_embeddings_for(np.array([30, 10, 99], dtype=object), items, emb)
    np.testing.assert_array_equal(aligned, [[4, 5], [0, 1], [0, 0]])
    with pytest.raises(ValueError, match="does not match 3 item columns"):
        fit_content(sp.csr_matrix((1, 3)), emb[:2])
    with pytest.raises(ValueError, match="unknown weighting"):
        fit_content(sp.csr_matrix((1, 3)), emb, weighting="bm25")
