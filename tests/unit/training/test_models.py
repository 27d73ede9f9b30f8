import numpy as np
import pandas as pd
import scipy.sparse as sp

from training.models import InteractionMatrix, fit_ease, fit_item_knn, fit_popularity


def _blocks(seed=0):
    """Two user groups, each interacting only within its own half of 20 items."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(60):
        half = 0 if u < 30 else 10
        for i in rng.choice(10, size=5, replace=False):
            rows.append((f"u{u}", f"i{half + i:02d}"))
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def test_interaction_matrix_maps_ids_and_sums_repeats():
    frame = pd.DataFrame({"user_id": ["b", "a", "a"], "item_id": ["x", "y", "y"]})
    m = InteractionMatrix.from_frame(frame, item_ids=np.array(["x", "y", "z"], dtype=object))
    assert list(m.user_ids) == ["a", "b"] and m.matrix.shape == (2, 3)
    assert m.matrix[m.user_index["a"], 1] == 2.0


def test_item_models_recommend_within_the_users_group_and_never_seen_items():
    m = InteractionMatrix.from_frame(_blocks())
    for model in (fit_ease(m.matrix, lam=10.0), fit_item_knn(m.matrix, neighbours=5)):
        top = model.recommend(m.matrix, k=3)
        for u, items in enumerate(top):
            seen = set(m.matrix[u].indices)
            assert not seen & set(items), model.name
            group = 0 if int(m.user_ids[u][1:]) < 30 else 1
            assert all((i >= 10) == bool(group) for i in items), model.name


def test_ease_has_zero_diagonal_and_popularity_is_user_independent():
    x = sp.csr_matrix(np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=np.float32))
    ease = fit_ease(x, lam=1.0)
    assert np.allclose(np.diag(ease.weights), 0)
    pop = fit_popularity(x)
    assert np.allclose(pop.score(x)[0], pop.score(x)[1])
