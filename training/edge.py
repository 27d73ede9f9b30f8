"""Edge export: a serving bundle's hybrid as a self-contained directory that scores an
on-device history (item indices) with onnxruntime alone, no server and no user id.

The edge score of a history ``H`` (unique item indices) is the bundle's own
:class:`training.hybrid.WeightedHybrid` score of an *anonymous* user whose row holds the items
of ``H`` at the neutral weight (:meth:`training.bundle.Bundle.row` with no user id): what
``model.score(bundle.row(None, H), [None])`` returns, the score serving's personalised path
computes for such a row. Anonymous means: the neural user tower gets the unknown-user ID row
and zero user features, no segment model, ALS folds the history in. Per component:

- anchor (EASE family): ``Σ_{i∈H} W[i] + b`` (the neutral weight maps to the input 1), times its
  blend factor; a dense ``W`` is stored whole, a sparse one (CSR) as padded rows (ELL:
  ``max_row_nnz`` column indices and values per item); a ``W`` larger than ``max_weights_mb``
  is left out (the manifest says so, and the score then holds the bias only);
- neural: the global model's user tower on the history bag (mean of the history and item
  feature rows), dotted with the precomputed item-tower outputs plus the item bias;
- content: the cosine of the idf-weighted mean of the history's embeddings with every item;
- popularity: a constant row;
- ALS: the fold-in ``u = (YᵀY + αYₕᵀYₕ + reg·|H|·I)⁻¹ (1 + α) Σ_{i∈H} y_i`` solved in float64
  by Gauss-Jordan elimination inside the graph, then ``Y u``.

Each component's row is multiplied by its blend factor ``w_c / σ_c`` and the rows are summed.
:func:`edge_reference` is the same combination built from the repo's own scorers (the
excluded parts zeroed), which the parity test and ``bench/edge_onnx.py`` compare against.

Files (:func:`export_edge`): ``model.onnx`` (input ``history`` int64 ``[n]``, output
``scores`` float32 ``[n_items]``), ``items.json`` (``item_ids`` and ``titles`` in index
order) and ``manifest.json`` (written last; versions, shapes, the components and what the
score is). See docs/models.md, "Edge export".
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from core.files import write_atomic
from training.bundle import Bundle, load_bundle
from training.hybrid import WeightedHybrid, as_hybrid
from training.models import ItemItemModel

__all__ = [
    "EDGE_FORMAT_VERSION",
    "EdgePlan",
    "EdgeScorer",
    "edge_plan",
    "edge_reference",
    "export_edge",
    "top_k_unseen",
]

EDGE_FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
ITEMS_FILE = "items.json"
MANIFEST_FILE = "manifest.json"
OPSET = 17
DEFAULT_MAX_WEIGHTS_MB = 256.0
INPUT_NAME, OUTPUT_NAME = "history", "scores"
SUPPORTED = ("popularity", "content", "neural", "als")


@dataclasses.dataclass
class EdgePlan:
    """What goes into the edge model: the anchor's form (``dense``, ``sparse-ell`` or
    ``bias-only``) and why, the included components (name → kind) and the excluded ones
    (name → reason)."""

    anchor_form: str
    anchor_note: str
    included: dict[str, str]
    excluded: dict[str, str]


def _weights_mb(weights: np.ndarray | sp.csr_matrix | None) -> float:
    if weights is None:
        return 0.0
    if sp.issparse(weights):
        csr = sp.csr_matrix(weights)
        nnz_row = int(np.diff(csr.indptr).max()) if csr.shape[0] else 0
        return csr.shape[0] * nnz_row * 12 / 2**20  # int64 index + float32 value per padded cell
    return weights.size * 4 / 2**20


def edge_plan(model: WeightedHybrid, max_weights_mb: float = DEFAULT_MAX_WEIGHTS_MB) -> EdgePlan:
    """Decide what of ``model`` the edge model holds (see the module docstring)."""
    weights = model.anchor.weights
    if weights is None:
        form, note = "bias-only", "the anchor has no item-item weights"
    else:
        size = _weights_mb(weights)
        kind = "sparse-ell" if sp.issparse(weights) else "dense"
        if size > max_weights_mb:
            form = "bias-only"
            note = f"item-item weights left out: {size:.1f} MiB as {kind} > max_weights_mb {max_weights_mb:g}"
        else:
            form, note = kind, f"{size:.1f} MiB"
    included, excluded = {}, {}
    for name, scorer in model.blended().items():
        if scorer.kind in SUPPORTED:
            included[name] = scorer.kind
        else:
            excluded[name] = f"no edge form for a {scorer.kind!r} component"
    return EdgePlan(form, note, included, excluded)


def edge_reference(model: WeightedHybrid, plan: EdgePlan) -> WeightedHybrid:
    """``model`` restricted to what ``plan`` exports (excluded components at weight 0, the
    anchor's weights dropped when left out): the repo's own scoring of the edge score."""
    weights = dict(model.weights) | {name: 0.0 for name in plan.excluded}
    anchor = model.anchor
    if plan.anchor_form == "bias-only" and anchor.weights is not None:
        anchor = ItemItemModel(anchor.name, bias=anchor.bias, weights=None)
    return dataclasses.replace(model, anchor=anchor, weights=weights)


def top_k_unseen(scores: np.ndarray, history: np.ndarray, k: int = 10) -> np.ndarray:
    """The ``k`` best item indices of one score row, best first, ``history`` excluded, ties
    to the lower index (as :func:`training.models.top_k`)."""
    allowed = np.ones(len(scores), dtype=bool)
    allowed[np.asarray(history, dtype=np.int64)] = False
    items = np.flatnonzero(allowed)
    order = np.lexsort((items, -scores[items]))
    return items[order[:k]]


# --------------------------------------------------------------------------- torch graph
class _Anchor(nn.Module):
    def __init__(self, model: ItemItemModel, form: str, factor: float) -> None:
        super().__init__()
        self.form = form
        self.register_buffer("bias", torch.as_tensor(np.asarray(model.bias, np.float32) * np.float32(factor)))
        if form == "dense":
            dense = np.asarray(model.weights, dtype=np.float32) * np.float32(factor)
            self.register_buffer("weights", torch.as_tensor(dense))
        elif form == "sparse-ell":
            cols, vals = _ell(sp.csr_matrix(model.weights, dtype=np.float32))
            self.register_buffer("cols", torch.as_tensor(cols))
            self.register_buffer("vals", torch.as_tensor(vals * np.float32(factor)))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        if self.form == "dense":
            return self.weights.index_select(0, history).sum(0) + self.bias
        if self.form == "sparse-ell":
            cols = self.cols.index_select(0, history).reshape(-1)
            vals = self.vals.index_select(0, history).reshape(-1)
            return torch.zeros_like(self.bias).scatter_add(0, cols, vals) + self.bias
        return self.bias


def _ell(csr: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Row-padded (ELL) form of ``csr``: per row its column indices and values, padded with
    column 0 and value 0 to the longest row."""
    counts = np.diff(csr.indptr)
    width = max(int(counts.max()) if len(counts) else 0, 1)
    cols = np.zeros((csr.shape[0], width), dtype=np.int64)
    vals = np.zeros((csr.shape[0], width), dtype=np.float32)
    rows = np.repeat(np.arange(csr.shape[0]), counts)
    slot = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], counts)
    cols[rows, slot] = csr.indices
    vals[rows, slot] = csr.data
    return cols, vals


class _Neural(nn.Module):
    """The neural component's global model for an unknown user: user tower on the history
    bag, then ``V u + b``."""

    def __init__(self, rec: Any, factor: float) -> None:
        super().__init__()
        net = rec.net
        with torch.no_grad():
            self.register_buffer("user_row", net.user_id.weight[net.n_users].detach().clone())
            self.register_buffer("user_dense", net.user_dense[net.n_users].detach().clone())
            self.register_buffer("history_table", net.history.detach().clone())
            self.register_buffer("item_dense", net.item_dense.detach().clone())
            vectors, bias = rec.item_side()
            # Items as columns: onnxruntime's row-vector × matrix is far faster than matrix × vector.
            self.register_buffer("vectors_t", torch.as_tensor(np.ascontiguousarray(np.asarray(vectors, np.float32).T)))
            self.register_buffer("item_bias", torch.as_tensor(np.array(bias, dtype=np.float32)))
        self.tower = copy.deepcopy(net.user_tower).eval()
        self.has_item_dense = bool(net.item_dense.shape[1])
        self.factor = float(factor)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(history, dtype=torch.float32)  # the count stays dynamic in the exported graph
        weight = ones / torch.clamp(ones.sum(), min=1.0)
        parts = [self.user_row, (self.history_table.index_select(0, history) * weight[:, None]).sum(0), self.user_dense]
        if self.has_item_dense:
            parts.append((self.item_dense.index_select(0, history) * weight[:, None]).sum(0))
        user = self.tower(torch.cat(parts)[None, :])[0]
        return ((user[None, :] @ self.vectors_t)[0] + self.item_bias) * self.factor


class _Content(nn.Module):
    def __init__(self, content: Any, factor: float) -> None:
        super().__init__()
        embeddings = np.asarray(content.item_embeddings, dtype=np.float32)
        self.register_buffer("embeddings_t", torch.as_tensor(np.ascontiguousarray(embeddings.T)))  # items as columns
        self.register_buffer("idf", torch.as_tensor(np.asarray(content.item_weights, dtype=np.float32)))
        self.factor = float(factor)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        w = self.idf.index_select(0, history)
        profile = (self.embeddings_t.index_select(1, history) * w[None, :]).sum(1)
        norm = torch.sqrt((profile * profile).sum())
        profile = profile / torch.clamp(norm, min=1e-30)
        return (profile[None, :] @ self.embeddings_t)[0] * self.factor


class _Constant(nn.Module):
    def __init__(self, values: np.ndarray, factor: float) -> None:
        super().__init__()
        self.register_buffer("values", torch.as_tensor(np.asarray(values, dtype=np.float32) * np.float32(factor)))

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        return self.values


class _ALS(nn.Module):
    """Spark's implicit-ALS fold-in of the history (binary: ``c = 1 + α``) in float64, by
    Gauss-Jordan elimination unrolled over the rank (the system is symmetric positive definite)."""

    def __init__(self, factors: Any, factor: float) -> None:
        super().__init__()
        y = np.asarray(factors.item_factors, dtype=np.float32)
        y64 = y.astype(np.float64)
        self.rank = y.shape[1]
        self.register_buffer("items_t", torch.as_tensor(np.ascontiguousarray(y.T)))  # items as columns
        self.register_buffer("items64", torch.as_tensor(y64))
        self.register_buffer("yty", torch.as_tensor(y64.T @ y64))
        self.register_buffer("eye", torch.eye(self.rank, dtype=torch.float64))
        self.alpha, self.reg, self.factor = float(factors.alpha), float(factors.reg), float(factor)

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        yi = self.items64.index_select(0, history)
        n = torch.ones_like(history, dtype=torch.float64).sum()
        a = self.yty + self.alpha * (yi.T @ yi) + self.reg * n * self.eye
        b = (1.0 + self.alpha) * yi.sum(0)
        m = torch.cat([a, b[:, None]], dim=1)
        for k in range(self.rank):
            row = m[k] / m[k, k]
            m = m - m[:, k : k + 1] * row[None, :] + self.eye[:, k : k + 1] * row[None, :]
        u = torch.where(n > 0, m[:, self.rank], torch.zeros_like(b)).to(torch.float32)
        return (u[None, :] @ self.items_t)[0] * self.factor


class EdgeScorer(nn.Module):
    """The edge score as a torch module: ``forward(history)`` (unique item indices, int64)
    returns the float32 scores of every item. Exported to ONNX by :func:`export_edge`."""

    def __init__(self, model: WeightedHybrid, plan: EdgePlan) -> None:
        super().__init__()
        self.anchor = _Anchor(model.anchor, plan.anchor_form, model.weights.get("ease", 1.0) / model.scales["ease"])
        parts: dict[str, nn.Module] = {}
        for name in plan.included:
            scorer = model.components[name]
            factor = model.weights[name] / model.scales[name]
            if scorer.kind == "neural":
                parts[name] = _Neural(scorer.model, factor)
            elif scorer.kind == "content":
                parts[name] = _Content(scorer.model, factor)
            elif scorer.kind == "popularity":
                parts[name] = _Constant(scorer.values, factor)
            elif scorer.kind == "als":
                parts[name] = _ALS(scorer.model, factor)
        self.parts = nn.ModuleDict(parts)
        self.n_items = len(model.anchor.bias)
        self.constant = plan.anchor_form == "bias-only" and all(isinstance(p, _Constant) for p in parts.values())

    def forward(self, history: torch.Tensor) -> torch.Tensor:
        total = self.anchor(history)
        for part in self.parts.values():
            total = total + part(history)
        if self.constant:  # a score that ignores the history: keep the input in the graph (adds exactly 0)
            total = total + torch.zeros_like(history, dtype=torch.float32).sum()
        return total

    @torch.no_grad()
    def score(self, history: np.ndarray) -> np.ndarray:
        """Eager PyTorch scores of one history (unique item indices)."""
        return self(torch.as_tensor(np.asarray(history, dtype=np.int64))).numpy()


# --------------------------------------------------------------------------- export
def _onnx_bytes(scorer: EdgeScorer, opset: int) -> bytes:
    buffer = io.BytesIO()
    example = torch.tensor([0, min(1, scorer.n_items - 1)], dtype=torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(
            scorer,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "n_history"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    return buffer.getvalue()


def _file_info(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _versions(opset: int) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"onnx_opset": opset}
    for package in ("hyperrec", "torch", "onnx", "onnxruntime", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _describe(model: WeightedHybrid, plan: EdgePlan) -> dict[str, Any]:
    factor = model.weights.get("ease", 1.0) / model.scales["ease"]
    components: dict[str, Any] = {
        "ease": {
            "kind": "item_item anchor",
            "form": plan.anchor_form,
            "note": plan.anchor_note,
            "blend_factor": factor,
            "term": "Σ_{i∈H} W[i] + b (W left out when form is bias-only)",
        }
    }
    terms = {
        "neural": "global model's user tower (unknown-user ID row, zero user features, mean history bag) · item "
        "vectors + item bias",
        "content": "cosine(idf-weighted mean of the history's embeddings, item embedding)",
        "popularity": "constant popularity row",
        "als": "implicit-ALS fold-in of the history (float64 solve) · item factors",
    }
    for name, kind in plan.included.items():
        components[name] = {
            "kind": kind,
            "blend_factor": model.weights[name] / model.scales[name],
            "weight": model.weights[name],
            "scale": model.scales[name],
            "term": terms[kind],
        }
    return {
        "what": "the bundle's weighted-hybrid score of an anonymous user whose history is the given items at the "
        "neutral interaction weight: Σ_c blend_factor_c · s_c(H) over the included components; higher is better; "
        "scores are comparable within one history only",
        "same_as": "training.hybrid.WeightedHybrid.score(bundle.row(None, H), [None]) of training.edge.edge_reference "
        "(the served model's scoring of that row, with the excluded components at weight 0)",
        "not_included": [
            "user id embedding and user/demographic features (the edge user is anonymous)",
            "stored per-interaction weights (every history item counts at the neutral weight)",
            "per-segment fine-tuned neural models (the global model scores)",
            "INT8 quantization (the float32 model is exported)",
            "serving's candidate retrieval, category filters, diversity re-ranking and explanations",
        ],
        "components": components,
        "excluded_components": plan.excluded,
        "seen_items": "not masked by the model: exclude the history from the ranking (examples/edge_score.py does)",
    }


def export_edge(
    bundle_or_dir: Bundle | Path,
    out_dir: Path,
    *,
    max_weights_mb: float = DEFAULT_MAX_WEIGHTS_MB,
    opset: int = OPSET,
) -> dict[str, Any]:
    """Write the edge bundle of a serving bundle (a directory or a loaded :class:`Bundle`)
    to ``out_dir`` (created; a re-run overwrites its files) and return its manifest."""
    bundle = bundle_or_dir if isinstance(bundle_or_dir, Bundle) else load_bundle(Path(bundle_or_dir))
    model = as_hybrid(bundle.model)
    if model.is_quantized():
        raise ValueError("export_edge: the bundle's model is INT8-quantized; export the float model")
    plan = edge_plan(model, max_weights_mb)
    scorer = EdgeScorer(model, plan).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_bytes = _onnx_bytes(scorer, opset)
    write_atomic(out_dir / MODEL_FILE, lambda tmp: tmp.write_bytes(onnx_bytes))
    items = {"item_ids": [str(i) for i in bundle.item_ids], "titles": [str(t) for t in bundle.titles]}
    items_text = json.dumps(items, ensure_ascii=False)
    write_atomic(out_dir / ITEMS_FILE, lambda tmp: tmp.write_text(items_text, encoding="utf-8"))
    files = {name: _file_info(out_dir / name) for name in (MODEL_FILE, ITEMS_FILE)}
    manifest = {
        "format_version": EDGE_FORMAT_VERSION,
        "kind": "hyperrec-edge-bundle",
        "exported_at": datetime.now(UTC).isoformat(),
        "source_bundle": {
            "version": bundle.version,
            "model_name": bundle.metadata.get("model_name"),
            "registered_model_version": bundle.metadata.get("registered_model_version"),
            "created_at": bundle.metadata.get("created_at"),
        },
        "versions": _versions(opset),
        "model": {
            "file": MODEL_FILE,
            "inputs": [
                {
                    "name": INPUT_NAME,
                    "dtype": "int64",
                    "shape": ["n_history"],
                    "meaning": "unique item indices (positions in items.json) of the user's history; may be empty",
                }
            ],
            "outputs": [
                {"name": OUTPUT_NAME, "dtype": "float32", "shape": [len(bundle.item_ids)], "meaning": "score per item"}
            ],
        },
        "items": {"file": ITEMS_FILE, "count": len(bundle.item_ids), "keys": ["item_ids", "titles"]},
        "score": _describe(model, plan),
        "files": files,
        "size_bytes": sum(f["bytes"] for f in files.values()),
    }
    text = json.dumps(manifest, indent=2, ensure_ascii=False)
    write_atomic(out_dir / MANIFEST_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return manifest
