import numpy as np
from fixtures_serving import tiny_bundle

from training.bundle import copy_bundle, load_bundle


def test_a_copied_bundle_names_its_new_version_and_scores_as_the_source(tmp_path):
    source = tiny_bundle(tmp_path / "v1", version="v1")
    (tmp_path / "v7").mkdir()
    (tmp_path / "v7" / "stale.txt").write_text("replaced")
    copied = copy_bundle(source, tmp_path / "v7", "v7")
    original, copy = load_bundle(source), load_bundle(copied)
    assert (original.version, copy.version) == ("v1", "v7")
    assert not (copied / "stale.txt").exists()
    assert np.array_equal(original.model.weights, copy.model.weights)
    assert list(copy.item_ids) == list(original.item_ids)
