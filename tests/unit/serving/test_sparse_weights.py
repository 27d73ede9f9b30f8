"""A bundle whose item-item W is sparse (large-catalogue EASE) serves, explains and passes
the bundle checks like its dense form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from serving.bundle_checks import BundleRefused, canary_rankings, check_canary, check_finite, write_canary
from serving.explain import Explainer
from training.bundle import load_bundle, write_bundle
from training.models import ItemItemModel, fit_ease


def _bundle(out_dir: Path, dense: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((40, 30)) < 0.2).astype(np.float32))
    model = fit_ease(x, 2.0, dense_max_items=0, neighbours=6)
    if dense:
        model = ItemItemModel(model.name, model.bias, model.weights.toarray())
    items = np.array([f"i{i}" for i in range(30)], dtype=object)
    return write_bundle(
        out_dir,
        model=model,
        item_ids=items,
        titles=[f"Title {i}" for i in items],
        categories=[["drama"]] * 30,
        history={f"u{u}": x[u].indices.tolist() for u in range(40)},
        popularity=np.asarray(x.sum(axis=0)).ravel() / 40,
        metadata={"version": "v1", "k": 10, "metrics": {}},
    )


def test_sparse_bundle_ranks_like_its_dense_form_and_passes_the_checks(tmp_path: Path) -> None:
    sparse_dir, dense_dir = _bundle(tmp_path / "s"), _bundle(tmp_path / "d", dense=True)
    assert (sparse_dir / "weights.npz").is_file() and not (sparse_dir / "weights.npy").exists()
    sparse, dense = load_bundle(sparse_dir), load_bundle(dense_dir)
    users = ["u0", "u5", "u17"]
    got, want = canary_rankings(sparse, users), canary_rankings(dense, users)
    for user in users:
        assert got[user]["items"] == want[user]["items"]
        np.testing.assert_allclose(got[user]["scores"], want[user]["scores"], rtol=1e-5, atol=1e-6)
    check_finite(sparse_dir)
    write_canary(sparse_dir)
    assert check_canary(load_bundle(sparse_dir), sparse_dir)


def test_a_non_finite_sparse_weight_is_refused(tmp_path: Path) -> None:
    bundle_dir = _bundle(tmp_path / "s")
    weights = sp.load_npz(bundle_dir / "weights.npz")
    weights.data[3] = np.nan
    sp.save_npz(bundle_dir / "weights.npz", weights)
    with pytest.raises(BundleRefused, match="weights.npz: array 'data' has 1 values not finite"):
        check_finite(bundle_dir)


def test_explanations_with_sparse_weights_match_the_dense_ones(tmp_path: Path) -> None:
    bundle = load_bundle(_bundle(tmp_path / "s"))
    weights = bundle.model.weights
    assert sp.issparse(weights)
    args = (bundle.titles, bundle.item_ids, bundle.popularity)
    sparse, dense = Explainer(*args, weights, None), Explainer(*args, weights.toarray(), None)
    history = np.array([4, 1, 22])
    linked = np.flatnonzero(weights[history].toarray().max(axis=0) > 0)  # a "liked" reason each
    items = np.concatenate([linked[:3], [22, 29, 13]])
    np.testing.assert_array_equal(sparse.links(history, items), dense.links(history, items))
    reasons = sparse.reasons(history, items, None)
    assert reasons == dense.reasons(history, items, None)
    assert any(r["reason_kind"] == "liked" for r in reasons)
