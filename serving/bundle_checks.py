"""Checks a bundle passes before it serves (:class:`serving.api.state.ServingState`).

- :func:`check_version`: ``metadata.json``'s version is the one ``CURRENT`` names;
- :func:`check_finite`: every float value stored in the bundle (``*.npy`` arrays and the arrays
  of ``*.npz`` archives such as a sparse ``weights.npz``, tensors of
  ``*.pt`` state dicts, float columns of ``*.parquet`` files, numbers in ``*.json`` files) is
  finite; a file that cannot be read fails with its name and the error's type;
- :func:`check_canary`: the canary rankings stored at publish time (:func:`write_canary`,
  ``canary.json``: a few known users and their top-10 with scores, from the bundle itself)
  come out the same from the loaded model. A bundle without ``canary.json`` (published
  before canaries existed) skips this check.

Each failure raises :class:`BundleRefused` with a reason naming the file or user.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from core.files import write_atomic
from core.settings import ServingSettings
from training.bundle import Bundle, load_bundle

log = logging.getLogger(__name__)

CANARY_FILE = "canary.json"
CANARY_USERS = 5
CANARY_K = 10
SCORE_RTOL, SCORE_ATOL = 1e-3, 1e-4
"""Two scores agree when ``|a - b| <= SCORE_ATOL + SCORE_RTOL * |b|`` (float32 models scored
on another machine may differ in the last bits)."""
_CHUNK = 1 << 22


class BundleRefused(ValueError):
    """A bundle failed a check; the message says which file, value or user."""


def describe_error(exc: BaseException) -> str:
    """``<type>: <message>``, never empty (some loaders raise errors without a message)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else f"{type(exc).__name__} (no message)"


def check_version(bundle_dir: Path, version: str) -> None:
    """Refuse a bundle whose ``metadata.json`` names another version than ``version``."""
    path = Path(bundle_dir) / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleRefused(f"metadata.json: unreadable ({describe_error(exc)})") from exc
    found = meta.get("version") if isinstance(meta, dict) else None
    if found != version:
        raise BundleRefused(f"metadata.json says version {found!r}, but CURRENT names {version!r}")


def _bad_floats(array: np.ndarray) -> int:
    """How many values of ``array`` are NaN or infinite (0 for non-float arrays), chunk by chunk."""
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.complexfloating):
        return 0
    flat = array.reshape(-1)
    return sum(int((~np.isfinite(flat[i : i + _CHUNK])).sum()) for i in range(0, flat.size, _CHUNK))


def _json_numbers(value: Any) -> Iterator[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _json_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _json_numbers(item)


def _tensors(value: Any) -> Iterator[tuple[str, Any]]:
    import torch

    if isinstance(value, torch.Tensor):
        yield "", value
    elif isinstance(value, dict):
        for key, item in value.items():
            for name, tensor in _tensors(item):
                yield f"{key}.{name}".rstrip("."), tensor
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            for name, tensor in _tensors(item):
                yield f"{i}.{name}".rstrip("."), tensor


def _check_file(path: Path, name: str) -> None:
    suffix = path.suffix
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        bad = _bad_floats(np.asarray(array))
        if bad:
            raise BundleRefused(f"{name}: {bad} of {array.size} values are not finite (NaN or ±Inf)")
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            for key in archive.files:
                bad = _bad_floats(archive[key])
                if bad:
                    raise BundleRefused(f"{name}: array {key!r} has {bad} values not finite (NaN or ±Inf)")
    elif suffix == ".pt":
        import torch

        state = torch.load(path, map_location="cpu", weights_only=True)
        for key, tensor in _tensors(state):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise BundleRefused(f"{name}: tensor {key!r} has {bad} of {tensor.numel()} values not finite")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for column_name, column in zip(table.column_names, table.columns, strict=True):
            kind = column.type
            while pa.types.is_list(kind) or pa.types.is_large_list(kind):
                column, kind = pc.list_flatten(column), kind.value_type
            if pa.types.is_floating(kind):
                values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)
                bad = _bad_floats(values) - column.null_count  # nulls come back as NaN
                if bad > 0:
                    raise BundleRefused(f"{name}: column {column_name!r} has {bad} values not finite")
    elif suffix == ".json":
        text = path.read_text()
        if any(not math.isfinite(x) for x in _json_numbers(json.loads(text))):
            raise BundleRefused(f"{name}: holds a NaN or infinite number")


def check_finite(bundle_dir: Path) -> None:
    """Refuse a bundle holding a non-finite float, or a file that cannot be read (see the
    module docstring); the reason names the file relative to ``bundle_dir``."""
    bundle_dir = Path(bundle_dir)
    for path in sorted(bundle_dir.rglob("*")):
        if not path.is_file() or path.suffix not in (".npy", ".npz", ".pt", ".parquet", ".json"):
            continue
        name = path.relative_to(bundle_dir).as_posix()
        try:
            _check_file(path, name)
        except BundleRefused:
            raise
        except Exception as exc:  # a corrupt file: name it and the error's type
            raise BundleRefused(f"{name}: unreadable ({describe_error(exc)})") from exc


def canary_users(bundle: Bundle, count: int = CANARY_USERS) -> list[str]:
    """Up to ``count`` known users with a history, evenly spaced in sorted id order."""
    users = sorted(u for u, items in bundle.history.items() if len(items))
    if len(users) <= count:
        return users
    return [users[i] for i in np.linspace(0, len(users) - 1, count).round().astype(int)]


def _exact_model(bundle: Bundle, settings: ServingSettings | None) -> Any:
    from serving.recommender import ServedModel

    base = settings or ServingSettings()
    exact = base.model_copy(update={"quantized": False, "candidates": max(bundle.n_items, 1)})
    return ServedModel(bundle, None, exact)


def canary_rankings(bundle: Bundle, users: list[str], settings: ServingSettings | None = None) -> dict[str, Any]:
    """Each user's top-:data:`CANARY_K` (item ids and scores) from the float model scored
    exactly (no ANN), with no live events: what :func:`write_canary` stores."""
    from serving.recommender import RecommendationRequest

    served = _exact_model(bundle, settings)
    out: dict[str, Any] = {}
    for user in users:
        body = served.recommend(RecommendationRequest(user, CANARY_K), [])
        out[user] = {"items": [i.item_id for i in body.items], "scores": [i.score for i in body.items]}
    return out


def write_canary(bundle_dir: Path, settings: ServingSettings | None = None) -> Path | None:
    """Store ``canary.json`` in ``bundle_dir``: :data:`CANARY_USERS` known users and their
    rankings (:func:`canary_rankings`). None (nothing written) when the bundle has no users."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)
    users = canary_users(bundle)
    if not users:
        return None
    spec = {"version": bundle.version, "k": CANARY_K, "users": canary_rankings(bundle, users, settings)}
    text = json.dumps(spec, indent=1, sort_keys=True)
    path = bundle_dir / CANARY_FILE
    write_atomic(path, lambda tmp: tmp.write_text(text))
    return path


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= SCORE_ATOL + SCORE_RTOL * abs(b)


def check_canary(bundle: Bundle, bundle_dir: Path, settings: ServingSettings | None = None) -> bool:
    """Refuse ``bundle`` unless every canary user's ranking reproduces: the same items with
    the same scores rank by rank (items may swap only where their scores tie). Returns False
    when the bundle has no ``canary.json`` (the check is skipped), True when it passed."""
    path = Path(bundle_dir) / CANARY_FILE
    if not path.is_file():
        log.info("bundle %s has no %s: canary check skipped", bundle.version, CANARY_FILE)
        return False
    try:
        spec = json.loads(path.read_text())
        expected: dict[str, Any] = dict(spec["users"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleRefused(f"{CANARY_FILE}: unreadable ({describe_error(exc)})") from exc
    unknown = sorted(u for u in expected if u not in bundle.history)
    if unknown:
        raise BundleRefused(f"{CANARY_FILE}: canary users {unknown[:5]} are not in the bundle")
    got = canary_rankings(bundle, list(expected), settings)
    for user, want in expected.items():
        items, scores = got[user]["items"], got[user]["scores"]
        w_items, w_scores = list(want["items"]), [float(s) for s in want["scores"]]
        if len(items) != len(w_items):
            raise BundleRefused(f"canary user {user!r}: {len(items)} items, expected {len(w_items)}")
        for rank, (item, score, w_item, w_score) in enumerate(zip(items, scores, w_items, w_scores, strict=True)):
            tied = item != w_item and w_item in items and _close(scores[items.index(w_item)], w_score)
            if not _close(score, w_score) or (item != w_item and not tied):
                raise BundleRefused(
                    f"canary user {user!r} does not reproduce: rank {rank + 1} is {item!r} (score {score:.6g}), "
                    f"expected {w_item!r} (score {w_score:.6g})"
                )
    return True
