"""Edge export end to end: for 1,000 users the onnxruntime scores of `hyperrec export onnx`'s
model equal the repo's own (PyTorch/NumPy) scoring of the same hybrid within 1e-4 and the
top-10 lists are identical; the command finds the published bundle as serving does (CURRENT);
examples/edge_score.py, run as its own process, prints the same top 10 and loads no module of
this repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fixtures_serving import hybrid_bundle
from typer.testing import CliRunner

from core.object_store import ObjectStore
from hyperrec.cli import app
from serving.store import publish
from training.bundle import load_bundle
from training.edge import EdgeScorer, edge_plan, edge_reference, top_k_unseen
from training.hybrid import as_hybrid
from training.models import top_k

ROOT = Path(__file__).resolve().parents[3]
USERS = 1000
REPO_PACKAGES = {"core", "training", "serving", "hyperrec", "pipelines", "feature_store", "monitoring", "dags"}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1,000-user hybrid (EASE, ALS, content, neural with a segment model, popularity)
    published to the object store of a fresh home; returns (config file, bundle directory)."""
    root = tmp_path_factory.mktemp("edge-export")
    bundle_dir = hybrid_bundle(root / "build" / "v7", version="v7", als=True, segment_models=True, n_users=USERS)
    home = root / "home"
    publish(bundle_dir, ObjectStore(str(home / "bundles")), "v7")
    config = root / "settings.yaml"
    config.write_text(f"home: {home}\n")
    return config, bundle_dir


def test_export_onnx_parity_for_1000_users(published: tuple[Path, Path]) -> None:
    config, bundle_dir = published
    result = CliRunner().invoke(app, ["export", "onnx", "--config", str(config)])
    assert result.exit_code == 0, result.output
    home = Path(config.read_text().split(": ", 1)[1].strip())
    edge_dir = home / "edge" / "v7"
    assert f"wrote {edge_dir}" in result.output
    manifest = json.loads((edge_dir / "manifest.json").read_text())
    assert set(manifest["score"]["components"]) == {"ease", "als", "content", "neural", "popularity"}

    bundle = load_bundle(bundle_dir)
    model = as_hybrid(bundle.model)
    plan = edge_plan(model)
    reference = edge_reference(model, plan)
    eager = EdgeScorer(model, plan).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(edge_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    users = sorted(bundle.history)
    assert len(users) == USERS
    worst_served = worst_torch = 0.0
    for user in users:
        history = np.unique(bundle.history[user]).astype(np.int64)
        row = bundle.row(None, history)
        served = reference.score(row, [None])
        got = session.run(["scores"], {"history": history})[0]
        worst_served = max(worst_served, float(np.abs(got - served[0]).max()))
        worst_torch = max(worst_torch, float(np.abs(got - eager.score(history)).max()))
        assert top_k_unseen(got, history).tolist() == top_k(served, row, 10)[0].tolist(), user
    assert worst_served <= 1e-4 and worst_torch <= 1e-4, (worst_served, worst_torch)


def test_edge_score_script_alone(published: tuple[Path, Path], tmp_path: Path) -> None:
    _, bundle_dir = published
    edge_dir = tmp_path / "edge"
    result = CliRunner().invoke(app, ["export", "onnx", "--bundle", str(bundle_dir), "--out", str(edge_dir)])
    assert result.exit_code == 0, result.output
    bundle = load_bundle(bundle_dir)
    history = np.unique(bundle.history[sorted(bundle.history)[3]])
    ids = [str(bundle.item_ids[i]) for i in history]
    # Run the script as __main__, then report which modules it loaded.
    probe = (
        "import json, runpy, sys\n"
        f"sys.argv = ['edge_score.py', {str(edge_dir)!r}, *{ids!r}, 'no-such-item']\n"
        "try:\n"
        f"    runpy.run_path({str(ROOT / 'examples' / 'edge_score.py')!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "print('MODULES ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "no-such-item" in out.stderr
    lines = out.stdout.splitlines()
    modules = set(json.loads(lines[-1].removeprefix("MODULES ")))
    assert not modules & REPO_PACKAGES and "torch" not in modules, modules & (REPO_PACKAGES | {"torch"})
    printed = [line.split()[1] for line in lines[1:-1]]
    model = as_hybrid(bundle.model)
    row = bundle.row(None, history)
    expected = top_k(edge_reference(model, edge_plan(model)).score(row, [None]), row, 10)[0]
    assert printed == [str(bundle.item_ids[i]) for i in expected]
    assert lines[1].endswith(str(bundle.titles[expected[0]]))


def test_export_onnx_errors_name_the_problem(tmp_path: Path) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text(f"home: {tmp_path / 'home'}\n")
    result = CliRunner().invoke(app, ["export", "onnx", "--config", str(config)])
    assert result.exit_code == 1 and "nothing published" in result.output
    result = CliRunner().invoke(app, ["export", "onnx", "--bundle", str(tmp_path), "--config", str(config)])
    assert result.exit_code == 1 and "not a serving bundle" in result.output
    result = CliRunner().invoke(app, ["export", "onnx", "--version", "v404", "--config", str(config)])
    assert result.exit_code == 1 and "version 'v404' not found" in result.output
    result = CliRunner().invoke(app, ["export", "onnx", "--bundle", str(tmp_path), "--version", "v1"])
    assert result.exit_code == 1 and "not both" in result.output
