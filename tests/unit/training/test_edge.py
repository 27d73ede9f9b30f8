"""The edge export (training/edge.py): the ONNX model's scores under onnxruntime equal the
repo's own scoring of the same combination (edge_reference) for every form of the anchor,
with components left out, and for an empty history; the manifest says what the score is;
examples/edge_score.py imports only onnxruntime, numpy and the standard library."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import scipy.sparse as sp
from fixtures_serving import hybrid_bundle, tiny_bundle

from training.bundle import load_bundle
from training.candidates import ItemItemScorer
from training.edge import EdgeScorer, edge_plan, edge_reference, export_edge, top_k_unseen
from training.hybrid import InputWeighting, as_hybrid
from training.models import ItemItemModel, top_k

ROOT = Path(__file__).resolve().parents[3]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Segment models (the edge score uses the global one) are covered by the integration test.
    return hybrid_bundle(tmp_path_factory.mktemp("edge") / "v1", als=True, segments=False)


def _session(edge_dir: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(edge_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _check_parity(bundle, edge_dir: Path, model, max_weights_mb: float = 256.0) -> float:
    """Every user's ONNX scores against the reference; returns the largest difference."""
    plan = edge_plan(model, max_weights_mb)
    reference = edge_reference(model, plan)
    session = _session(edge_dir)
    worst = 0.0
    for user in sorted(bundle.history):
        history = np.unique(bundle.history[user]).astype(np.int64)
        row = bundle.row(None, history)
        expected = reference.score(row, [None])
        got = session.run(["scores"], {"history": history})[0]
        worst = max(worst, float(np.abs(got - expected[0]).max()))
        unseen = [i for i in top_k(expected, row, 10)[0].tolist() if i not in set(history.tolist())]
        assert top_k_unseen(got, history).tolist() == unseen, user
    assert worst <= TOLERANCE
    return worst


def test_full_hybrid_parity_and_manifest(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    manifest = export_edge(bundle_dir, tmp_path / "edge")
    _check_parity(bundle, tmp_path / "edge", as_hybrid(bundle.model))
    score = manifest["score"]
    assert set(score["components"]) == {"ease", "als", "content", "neural", "popularity"}
    assert score["components"]["ease"]["form"] == "dense"
    assert score["excluded_components"] == {}
    assert manifest["model"]["outputs"][0]["shape"] == [bundle.n_items]
    assert manifest["source_bundle"]["version"] == "v1"
    assert manifest["versions"]["onnxruntime"] and manifest["versions"]["onnx_opset"] >= 16
    import onnx

    onnx.checker.check_model(onnx.load(str(tmp_path / "edge" / "model.onnx")), full_check=True)
    on_disk = json.loads((tmp_path / "edge" / "manifest.json").read_text())
    assert on_disk["size_bytes"] == sum((tmp_path / "edge" / f).stat().st_size for f in on_disk["files"])
    items = json.loads((tmp_path / "edge" / "items.json").read_text())
    assert items["item_ids"] == [str(i) for i in bundle.item_ids] and items["titles"] == list(bundle.titles)


def test_empty_history_and_torch_module_agree(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    export_edge(bundle, tmp_path / "edge")
    empty = np.zeros(0, dtype=np.int64)
    got = _session(tmp_path / "edge").run(["scores"], {"history": empty})[0]
    expected = edge_reference(model, edge_plan(model)).score(bundle.row(None, empty), [None])[0]
    assert np.isfinite(got).all() and np.abs(got - expected).max() <= TOLERANCE
    eager = EdgeScorer(model, edge_plan(model)).eval()
    history = np.unique(bundle.history[sorted(bundle.history)[0]]).astype(np.int64)
    onnx_scores = _session(tmp_path / "edge").run(["scores"], {"history": history})[0]
    assert np.abs(eager.score(history) - onnx_scores).max() <= TOLERANCE


def test_sparse_anchor_is_exported_as_padded_rows(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    dense = np.asarray(model.anchor.weights)
    kept = np.where(np.abs(dense) >= np.quantile(np.abs(dense), 0.8), dense, 0.0)  # a sparse W, uneven rows
    anchor = ItemItemModel(model.anchor.name, bias=model.anchor.bias, weights=sp.csr_matrix(kept, dtype=np.float32))
    sparse_bundle = dataclasses.replace(bundle, model=dataclasses.replace(model, anchor=anchor))
    manifest = export_edge(sparse_bundle, tmp_path / "edge")
    assert manifest["score"]["components"]["ease"]["form"] == "sparse-ell"
    _check_parity(bundle, tmp_path / "edge", sparse_bundle.model)


def test_weights_over_the_limit_are_left_out_and_said_so(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    manifest = export_edge(bundle, tmp_path / "edge", max_weights_mb=0.0)
    ease = manifest["score"]["components"]["ease"]
    assert ease["form"] == "bias-only" and "left out" in ease["note"]
    _check_parity(bundle, tmp_path / "edge", as_hybrid(bundle.model), max_weights_mb=0.0)


def test_a_component_without_edge_form_is_excluded_and_named(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    knn = ItemItemScorer(
        ItemItemModel("knn", bias=np.zeros(bundle.n_items, np.float32), weights=np.eye(bundle.n_items))
    )
    extended = dataclasses.replace(
        model,
        components={**model.components, "knn": knn},
        weights={**model.weights, "knn": 0.7},
        scales={**model.scales, "knn": 1.0},
    )
    manifest = export_edge(dataclasses.replace(bundle, model=extended), tmp_path / "edge")
    assert "knn" in manifest["score"]["excluded_components"]
    assert "knn" not in manifest["score"]["components"]
    _check_parity(bundle, tmp_path / "edge", extended)  # against the blend with knn at weight 0


def test_example_script_imports_only_onnxruntime_numpy_and_stdlib(bundle_dir: Path, tmp_path: Path) -> None:
    path = ROOT / "examples" / "edge_score.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "__future__"}
    assert third_party == {"numpy", "onnxruntime"}

    export_edge(bundle_dir, tmp_path / "edge")
    spec = importlib.util.spec_from_file_location("edge_score", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, item_ids, titles, session = script.load(tmp_path / "edge")
    bundle = load_bundle(bundle_dir)
    history = np.unique(bundle.history[sorted(bundle.history)[1]]).astype(np.int64)
    top, _ = script.recommend(session, history)
    model = as_hybrid(bundle.model)
    row = bundle.row(None, history)
    expected = top_k(edge_reference(model, edge_plan(model)).score(row, [None]), row, 10)[0]
    assert top.tolist() == expected.tolist()
    assert not set(top.tolist()) & set(history.tolist())


def test_weighted_input_scores_the_history_at_the_neutral_weight(bundle_dir: Path, tmp_path: Path) -> None:
    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    weighted = dataclasses.replace(model, weighting=InputWeighting(alpha=0.7, mean=3.3, std=1.1))
    export_edge(dataclasses.replace(bundle, model=weighted), tmp_path / "edge")
    _check_parity(dataclasses.replace(bundle, model=weighted), tmp_path / "edge", weighted)


@pytest.mark.parametrize("kind", ["ease", "popularity"])
def test_an_item_item_bundle_exports_its_anchor(kind: str, tmp_path: Path) -> None:
    bundle_dir = tiny_bundle(tmp_path / "bundle", model_kind=kind)
    bundle = load_bundle(bundle_dir)
    manifest = export_edge(bundle_dir, tmp_path / "edge")
    assert manifest["score"]["components"]["ease"]["form"] == ("dense" if kind == "ease" else "bias-only")
    assert list(manifest["score"]["components"]) == ["ease"]
    _check_parity(bundle, tmp_path / "edge", as_hybrid(bundle.model))
