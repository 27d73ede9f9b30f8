import numpy as np
import pytest
import scipy.sparse as sp

from training.models import fit_segment_popularity, popularity, segment_popularity_model


def _two_tastes():
    """Segment 0 (4 users) loves item 0, segment 1 (2 users) loves item 2; item 0 is the
    global favourite. Segment 7 has one user with an empty row."""
    x = sp.csr_matrix(
        np.array(
            [
                [1, 1, 0, 0],
                [1, 0, 0, 0],
                [1, 0, 0, 1],
                [1, 1, 0, 0],
                [0, 0, 1, 1],
                [0, 0, 1, 0],
                [0, 0, 0, 0],
            ],
            dtype=np.float32,
        )
    )
    return x, np.array([0, 0, 0, 0, 1, 1, 7])


def test_segment_popularity_differs_from_global_and_is_scaled():
    x, segments = _two_tastes()
    per = fit_segment_popularity(x, segments)
    assert set(per) == {0, 1, 7}
    np.testing.assert_allclose(per[0], [1.0, 0.5, 0.0, 0.25])
    np.testing.assert_allclose(per[1], [0.0, 0.0, 1.0, 0.5])
    glob = popularity(x)
    assert int(np.argmax(glob)) == 0 and int(np.argmax(per[1])) == 2
    assert all(p.min() >= 0 and p.max() == 1.0 for p in per.values())


def test_empty_and_unknown_segments_fall_back_to_global():
    x, segments = _two_tastes()
    per = fit_segment_popularity(x, segments)
    glob = popularity(x)
    np.testing.assert_allclose(per[7], glob)
    model = segment_popularity_model(per, 3, fallback=glob)
    np.testing.assert_allclose(model.score(x[:1])[0], glob)
    top = segment_popularity_model(per, 1, fallback=glob).recommend(x[5:6], k=1)
    assert list(top[0]) == [3]  # item 2 is seen; then the segment's next favourite


def test_segment_labels_must_match_rows():
    x, segments = _two_tastes()
    with pytest.raises(ValueError, match="one label per row"):
        fit_segment_popularity(x, segments[:-1])
