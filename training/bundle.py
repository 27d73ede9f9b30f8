"""The serving bundle: the on-disk form of a trained model (model, item metadata, user
histories) that registration logs and serving loads; :func:`write_bundle` names its files.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from core.files import write_atomic, write_text_atomic
from training.hybrid import InputWeighting, WeightedHybrid
from training.models import ItemItemModel

FORMAT_VERSION = 2
BUNDLE_FILES: tuple[str, ...] = (
    "metadata.json",
    "bias.npy",
    "weights.npy",
    "popularity.npy",
    "items.parquet",
    "user_history.parquet",
)
SPARSE_WEIGHTS_FILE = "weights.npz"
"""A sparse W (large-catalogue EASE) is stored here, as scipy CSR, instead of ``weights.npy``."""
OPTIONAL_FILES: frozenset[str] = frozenset({"weights.npy"})
REQUIRED_FILES: tuple[str, ...] = tuple(f for f in BUNDLE_FILES if f not in OPTIONAL_FILES)
REQUIRED_METADATA: tuple[str, ...] = ("version", "k", "metrics")
_VERSION_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")

_ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("categories", pa.list_(pa.string())),
    ]
)
_HISTORY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_idx", pa.list_(pa.int32())),
        pa.field("weight", pa.list_(pa.float32())),
    ]
)
BLEND_DIR = "blend"


def validate_version(version: str) -> str:
    """Return ``version`` if it is a safe path component: 1-128 chars of ``[A-Za-z0-9_.-]``,
    not starting with ``.`` or ``-``; raise ``ValueError`` otherwise."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ValueError(
            f"invalid bundle version {version!r}: use 1-128 characters of [A-Za-z0-9_.-], "
            "starting with a letter, digit or underscore"
        )
    return version


# --------------------------------------------------------------------------- bundle


@dataclass
class Bundle:
    """A loaded serving bundle: the model, item metadata and each known user's history.
    Serving (:class:`serving.recommender.ServedModel`) ranks with it; so does the registered
    MLflow model, which builds the same served model."""

    version: str
    metadata: dict
    model: ItemItemModel | WeightedHybrid
    popularity: np.ndarray
    item_ids: np.ndarray
    titles: np.ndarray
    categories: list[list[str]]
    history: dict[str, np.ndarray]
    history_weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    item_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_index = {str(item): i for i, item in enumerate(self.item_ids)}

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def has_item(self, item_id: str) -> bool:
        return item_id in self.item_index

    def row(self, user_id: str | None, extra: np.ndarray) -> sp.csr_matrix:
        """One user's interaction row: the training history of ``user_id`` (None: none) with
        its stored weights, plus the live items ``extra`` (item indices) at the neutral weight
        (the mean training weight for a blend with input weighting, else 1)."""
        weighting = self.model.weighting if isinstance(self.model, WeightedHybrid) else None
        neutral = weighting.mean if weighting is not None else 1.0
        weights: dict[int, float] = {}
        if user_id is not None:
            stored = self.history_weights.get(user_id)
            for j, i in enumerate(self.history[user_id]):
                weights[int(i)] = float(stored[j]) if stored is not None else 1.0
        for i in extra:
            weights.setdefault(int(i), neutral)
        indices = np.array(sorted(weights), dtype=np.int32)
        data = np.array([weights[i] for i in indices], dtype=np.float32)
        return sp.csr_matrix((data, indices, [0, len(indices)]), shape=(1, self.n_items))


def _as_str(values: Sequence[Any]) -> np.ndarray:
    return np.array(["" if v is None else str(v) for v in values], dtype=object)


def _check_1d(name: str, array: np.ndarray, n: int) -> None:
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"{name}: expected shape ({n},) to match {n} items, got {array.shape}")


def _check_model(model: ItemItemModel, n: int, where: str = "model") -> None:
    _check_1d(f"{where} bias", np.asarray(model.bias), n)
    if model.weights is not None and model.weights.shape != (n, n):
        raise ValueError(f"{where} weights: expected shape ({n}, {n}), got {model.weights.shape}")


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)

    write_atomic(path, write)


def _save_npz(path: Path, matrix: sp.spmatrix) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: save_npz would append ".npz" to a name
            sp.save_npz(fh, sp.csr_matrix(matrix, dtype=np.float32), compressed=False)

    write_atomic(path, write)


def write_bundle(
    out_dir: Path,
    *,
    model: ItemItemModel | WeightedHybrid,
    item_ids: Sequence[Any],
    titles: Sequence[Any],
    categories: Sequence[Sequence[str] | None],
    history: dict[str, Sequence[int]],
    popularity: np.ndarray,
    metadata: dict,
    history_weights: dict[str, Sequence[float]] | None = None,
) -> Path:
    """Write a bundle to ``out_dir`` (created; a re-run overwrites it) and return ``out_dir``.

    Files (:data:`BUNDLE_FILES`): ``metadata.json`` (``version``, ``model_name``,
    ``registered_model_version``, ``created_at``, ``metrics``, ``k``, ``n_items``, ``n_users``,
    ``has_weights``, ``sparse_weights``, ``has_blend``, ``format_version``; written last, so its
    presence marks a complete bundle); ``bias.npy`` and optionally ``weights.npy`` (float32: the
    :class:`training.models.ItemItemModel` ``x·W + b``; for a blend, its anchor with the
    anchor's blend weight and scale folded in), or :data:`SPARSE_WEIGHTS_FILE` instead for a
    sparse W (scipy CSR, float32); ``popularity.npy`` (the cold-start ranking);
    ``items.parquet`` (``item_id``, ``title``, ``categories`` in item-index order);
    ``user_history.parquet`` (``user_id``, ``item_idx`` and ``weight`` lists); for a
    :class:`training.hybrid.WeightedHybrid`, ``blend/`` (``blend.json`` with the input
    weighting, blend weights and scales, and one directory per component,
    :func:`training.candidates.save_scorer`). Serving adds folders this module ignores:
    ``serving/`` (segment popularity) and ``ann/`` (stored ANN indexes).

    ``metadata`` must hold ``version``, ``k`` and ``metrics``; ``model_name`` (default
    ``model.name``), ``created_at`` (default now, UTC ISO-8601) and
    ``registered_model_version`` (default None) are filled in. Item arrays are in the model's
    item-index order; ``history`` maps user id → item indices seen in training.
    """
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise ValueError(f"bundle metadata is missing keys {missing}")
    validate_version(str(metadata["version"]))
    if not isinstance(metadata["metrics"], dict):
        raise ValueError(f"bundle metadata 'metrics' must be a dict, got {type(metadata['metrics']).__name__}")
    ids = _as_str(item_ids)
    n = len(ids)
    if len(set(ids)) != n:
        dupes = sorted(i for i, c in Counter(ids).items() if c > 1)[:5]
        raise ValueError(f"item_ids must be unique; duplicated: {dupes}")
    hybrid = model if isinstance(model, WeightedHybrid) else None
    if hybrid is not None:
        factor = hybrid.weights.get("ease", 1.0) / hybrid.scales["ease"]
        model = ItemItemModel(
            hybrid.name,
            bias=hybrid.anchor.bias * factor,
            weights=None if hybrid.anchor.weights is None else hybrid.anchor.weights * factor,
        )
    _check_model(model, n)
    _check_1d("titles", np.asarray(list(titles), dtype=object), n)
    _check_1d("popularity", np.asarray(popularity), n)
    if len(categories) != n:
        raise ValueError(f"categories: expected {n} entries to match item_ids, got {len(categories)}")
    cats = [[str(c) for c in (row if row is not None else [])] for row in categories]

    users, rows, row_weights = [], [], []
    for user, indices in history.items():
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise ValueError(f"history of user {user!r}: item index out of range [0, {n}): {bad}")
        w = np.ones(len(idx), dtype=np.float32)
        if history_weights is not None and user in history_weights:
            w = np.asarray(history_weights[user], dtype=np.float32)
            if w.shape != idx.shape:
                raise ValueError(f"history weights of user {user!r}: {w.shape[0]} weights for {len(idx)} items")
        idx, first = np.unique(idx, return_index=True)
        users.append(str(user))
        rows.append(idx.astype(np.int32).tolist())
        row_weights.append(w[first].tolist())

    meta = {
        "format_version": FORMAT_VERSION,
        "model_name": model.name,
        "registered_model_version": None,
        "created_at": datetime.now(UTC).isoformat(),
        **metadata,
        "version": str(metadata["version"]),
        "n_items": n,
        "n_users": len(users),
        "has_weights": model.weights is not None,
        "sparse_weights": sp.issparse(model.weights),
        "has_blend": hybrid is not None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(out_dir / "bias.npy", model.bias)
    dense_file, sparse_file = out_dir / "weights.npy", out_dir / SPARSE_WEIGHTS_FILE
    if sp.issparse(model.weights):
        _save_npz(sparse_file, model.weights)
    elif model.weights is not None:
        _save_npy(dense_file, model.weights)
    kept = None if model.weights is None else sparse_file if sp.issparse(model.weights) else dense_file
    for stale in {dense_file, sparse_file} - {kept}:  # a re-run may change W's form, or drop it
        stale.unlink(missing_ok=True)
    _save_npy(out_dir / "popularity.npy", popularity)
    items = pa.table({"item_id": list(ids), "title": list(_as_str(titles)), "categories": cats}, schema=_ITEMS_SCHEMA)
    write_atomic(out_dir / "items.parquet", lambda tmp: pq.write_table(items, tmp))
    hist = pa.table({"user_id": users, "item_idx": rows, "weight": row_weights}, schema=_HISTORY_SCHEMA)
    write_atomic(out_dir / "user_history.parquet", lambda tmp: pq.write_table(hist, tmp))
    _write_blend(out_dir / BLEND_DIR, hybrid)
    # metadata.json last: its presence marks a complete bundle directory.
    text = json.dumps(meta, indent=2, sort_keys=True, default=str)
    write_atomic(out_dir / "metadata.json", lambda tmp: tmp.write_text(text))
    return out_dir


def copy_bundle(source: Path, dest: Path, version: str) -> Path:
    """A copy of the bundle in ``source`` at ``dest`` (replaced if present) whose
    ``metadata.json`` names ``version``: the same model published under another name."""
    import shutil

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    meta = json.loads((dest / "metadata.json").read_text())
    meta["version"] = version
    write_text_atomic(dest / "metadata.json", json.dumps(meta, indent=2, sort_keys=True))
    return dest


def _write_blend(directory: Path, hybrid: WeightedHybrid | None) -> None:
    """The blend's components and ``blend.json``; removes a stale ``blend/`` when not a hybrid."""
    import shutil

    from training.candidates import save_scorer

    if directory.exists():
        shutil.rmtree(directory)
    if hybrid is None:
        return
    directory.mkdir(parents=True)
    for name, scorer in hybrid.components.items():
        save_scorer(scorer, directory / name)
    spec = {
        "weighting": asdict(hybrid.weighting) if hybrid.weighting is not None else None,
        "weights": hybrid.weights,
        "scales": hybrid.scales,
        "components": sorted(hybrid.components),
    }
    (directory / "blend.json").write_text(json.dumps(spec, indent=2, sort_keys=True))


def _load_blend(directory: Path, anchor: ItemItemModel) -> WeightedHybrid:
    from training.candidates import load_scorer

    path = directory / "blend.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable blend spec ({exc})") from exc
    components = {name: load_scorer(directory / name) for name in spec["components"]}
    # The anchor's weight and scale are folded into weights.npy/bias.npy at write time.
    weights = dict(spec["weights"]) | {"ease": 1.0}
    scales = dict(spec["scales"]) | {"ease": 1.0}
    weighting = InputWeighting(**spec["weighting"]) if spec["weighting"] is not None else None
    return WeightedHybrid(anchor, weighting, components, weights, scales, name=anchor.name)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a valid .npy array ({exc})") from exc


def _load_npz(path: Path, n: int) -> sp.csr_matrix:
    """The float32 n × n CSR matrix in ``path`` (indices checked)."""
    try:
        matrix = sp.csr_matrix(sp.load_npz(path), dtype=np.float32)
        matrix.check_format(full_check=True)
    except (ValueError, OSError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a valid sparse matrix ({exc})") from exc
    if matrix.shape != (n, n):
        raise ValueError(f"{path}: expected shape ({n}, {n}) to match items.parquet, got {matrix.shape}")
    return matrix


def _load_parquet(path: Path, schema: pa.Schema, optional: tuple[str, ...] = ()) -> pa.Table:
    """``path`` with the columns of ``schema``; absent ``optional`` columns come back all null."""
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a valid Parquet file ({exc})") from exc
    missing = [name for name in schema.names if name not in table.column_names and name not in optional]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    for name in optional:
        if name not in table.column_names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names)


def load_bundle(path: Path) -> Bundle:
    """Load the bundle in directory ``path``; ``FileNotFoundError``/``ValueError`` name the
    missing or malformed file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"bundle directory not found: {path}")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"bundle {path} is missing {name}")
    meta_path = path / "metadata.json"
    try:
        metadata = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{meta_path}: invalid JSON ({exc})") from exc
    if not isinstance(metadata, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    missing = [key for key in (*REQUIRED_METADATA, "model_name") if key not in metadata]
    if missing:
        raise ValueError(f"{meta_path}: missing keys {missing}")

    items = _load_parquet(path / "items.parquet", _ITEMS_SCHEMA)
    n = items.num_rows
    item_ids = np.array(items.column("item_id").to_pylist(), dtype=object)
    titles = np.array(items.column("title").to_pylist(), dtype=object)
    categories = [list(c or []) for c in items.column("categories").to_pylist()]
    bias = _load_npy(path / "bias.npy").astype(np.float32, copy=False)
    popularity = _load_npy(path / "popularity.npy").astype(np.float32, copy=False)
    weights: np.ndarray | sp.csr_matrix | None = None
    if metadata.get("sparse_weights"):
        if not (path / SPARSE_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"bundle {path} is missing {SPARSE_WEIGHTS_FILE} (metadata.json: sparse_weights)")
        weights = _load_npz(path / SPARSE_WEIGHTS_FILE, n)
    elif (path / "weights.npy").is_file():
        weights = _load_npy(path / "weights.npy").astype(np.float32, copy=False)
    elif metadata.get("has_weights"):
        raise FileNotFoundError(f"bundle {path} is missing weights.npy (metadata.json says has_weights)")
    model = ItemItemModel(str(metadata["model_name"]), bias=bias, weights=weights)
    for name, array in (("bias.npy", bias), ("popularity.npy", popularity)):
        if array.ndim != 1 or array.shape[0] != n:
            raise ValueError(f"{path / name}: expected shape ({n},) to match items.parquet, got {array.shape}")
    if weights is not None and weights.shape != (n, n):
        raise ValueError(
            f"{path / 'weights.npy'}: expected shape ({n}, {n}) to match items.parquet, got {weights.shape}"
        )

    if metadata.get("has_blend"):
        if not (path / BLEND_DIR).is_dir():
            raise FileNotFoundError(f"bundle {path} is missing {BLEND_DIR}/ (metadata.json says has_blend)")
        model = _load_blend(path / BLEND_DIR, model)
    hist = _load_parquet(path / "user_history.parquet", _HISTORY_SCHEMA, optional=("weight",))
    history: dict[str, np.ndarray] = {}
    history_weights: dict[str, np.ndarray] = {}
    for user, indices, weights in zip(
        hist.column("user_id").to_pylist(), hist.column("item_idx").to_pylist(), hist.column("weight").to_pylist()
    ):
        idx = np.asarray(indices or [], dtype=np.int32)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{path / 'user_history.parquet'}: user {user!r} has item indices outside [0, {n})")
        history[str(user)] = idx
        w = np.asarray(weights if weights is not None else np.ones(len(idx)), dtype=np.float32)
        if w.shape != idx.shape:
            raise ValueError(
                f"{path / 'user_history.parquet'}: user {user!r} has {len(w)} weights for {len(idx)} items"
            )
        history_weights[str(user)] = w
    return Bundle(
        version=str(metadata["version"]),
        metadata=metadata,
        model=model,
        popularity=popularity,
        item_ids=item_ids,
        titles=titles,
        categories=categories,
        history=history,
        history_weights=history_weights,
    )
