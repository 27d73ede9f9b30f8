"""Register and publish what serving answers with: the ``register`` stage logs the best
model as :class:`ServedPyfunc` (the API's own :class:`serving.recommender.ServedModel` over
the bundle, so the registered model ranks exactly as the API), and ``publish_champion``
copies the registry's champion to the object store the serving tier reads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from core.run_context import RunContext
from core.settings import ServingSettings, Settings
from serving.store import ObjectStore, current_version, publish
from training import registry
from training.pyfunc import Recommend, RecommenderPyfunc

log = logging.getLogger(__name__)

ANSWER_SETTINGS = ("candidates", "mmr_pool", "cold_popularity_weight", "quantized")
"""The serving settings that shape an answer; the registered model keeps their values."""


class ServedPyfunc(RecommenderPyfunc):
    """The registered pyfunc: :meth:`ServedModel.recommend` for ``(user_id, k)`` with no live
    events, built from the logged bundle with the serving settings given at registration
    (only :data:`ANSWER_SETTINGS`; no secret travels with the model)."""

    def __init__(self, serving: ServingSettings) -> None:
        self.serving: dict[str, Any] = {name: getattr(serving, name) for name in ANSWER_SETTINGS}

    def open(self, bundle_dir: Path) -> Recommend:
        from serving.recommender import RecommendationRequest, ServedModel
        from training.bundle import load_bundle

        served = ServedModel(load_bundle(bundle_dir), Path(bundle_dir), ServingSettings(**self.serving))

        def recommend(user_id: str, k: int) -> list[dict[str, Any]]:
            body = served.recommend(RecommendationRequest(user_id, k), [])
            return [{"item_id": it.item_id, "rank": it.rank, "score": it.score} for it in body.items]

        return recommend


def register(settings: Settings, run: RunContext) -> dict:
    """The ``register`` stage: the best candidate's bundle gets its serving files
    (:func:`add_serving_extras`, so the registered artifact is the one served) and is
    registered as :class:`ServedPyfunc` (:func:`training.stage.register`)."""
    from training.stage import register as register_run

    best = run.read_json("evaluation.json")["best"]
    try:
        add_serving_extras(run.models_dir / best, run, settings.serving)
    except Exception as exc:  # the served model then builds its index at load, as publishing would
        log.warning("no serving extras for the registered %s bundle: %s", best, exc)
    return register_run(settings, run, python_model=ServedPyfunc(settings.serving))


def object_store(settings: Settings) -> ObjectStore:
    return ObjectStore(settings.object_store_uri, settings.object_store.s3_endpoint_url)


def publish_champion(settings: Settings, run: RunContext) -> dict:
    """Copy the champion's bundle from MLflow to ``<store>/v<N>/`` and move ``CURRENT`` to it.

    Publishing is idempotent: re-running re-uploads the same version.
    """
    version = registry.champion_version(settings)
    if version is None:
        raise LookupError("the registry has no champion to publish")
    workdir = run.path("publish")
    if workdir.exists():
        shutil.rmtree(workdir)
    source = registry.bundle_dir_of(settings, version, workdir / "download")
    staged = shutil.copytree(source, workdir / "bundle")
    meta_path = staged / "metadata.json"
    metadata = json.loads(meta_path.read_text())
    metadata.update(
        {"version": f"v{version}", "registered_model": settings.mlflow.registered_model, "registered_version": version}
    )
    meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    extras: dict = {}
    try:
        extras["files"] = add_serving_extras(staged, run, settings.serving)
    except Exception as exc:  # serving then falls back to global popularity, and says so
        log.warning("no serving extras for v%s: %s", version, exc)
        extras = {"files": [], "error": f"{type(exc).__name__}: {exc}"}
    store = object_store(settings)
    published = publish(staged, store, f"v{version}")
    result = {"version": published, "store": str(store), "current": current_version(store), "serving_extras": extras}
    run.write_json("publish.json", result)
    return result


def add_serving_extras(bundle_dir: Path, run: RunContext, serving: ServingSettings | None = None) -> list[str]:
    """Write the serving-only files of ``bundle_dir``; returns them relative to ``bundle_dir``.

    - segment popularity and profiles (:func:`serving.segments.write_segment_profiles`) when
      ``run`` has a segmentation (without one serving falls back to global popularity);
    - with ``serving``, the ANN indexes serving would otherwise build at load
      (:func:`write_ann_indexes`).
    """
    bundle_dir = Path(bundle_dir)

    def snapshot() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for p in bundle_dir.rglob("*") if p.is_file()}

    before = snapshot()
    _write_segment_extras(bundle_dir, run)
    if serving is not None:
        write_ann_indexes(bundle_dir, serving)
    return sorted(p.relative_to(bundle_dir).as_posix() for p, t in snapshot().items() if before.get(p) != t)


def _write_segment_extras(bundle_dir: Path, run: RunContext) -> None:
    from feature_store.stage import read_segment_labels
    from pipelines.split import load_split
    from serving.segments import write_segment_profiles

    segments = read_segment_labels(run)
    if not segments:
        log.info("run %s has no segmentation: the bundle gets no segment popularity", run.run_id)
        return
    items = pd.read_parquet(bundle_dir / "items.parquet", columns=["item_id"])
    train, _ = load_split(run.split_dir)
    users = pd.read_parquet(run.clean_dir / "users") if (run.clean_dir / "users").exists() else None
    events = None
    if (run.clean_dir / "interactions").exists():
        events = pd.read_parquet(run.clean_dir / "interactions", columns=["user_id", "device"])
    write_segment_profiles(bundle_dir, items["item_id"].to_numpy(dtype=object), train, segments, users, events)


def write_ann_indexes(bundle_dir: Path, serving: ServingSettings) -> list[Path]:
    """Build and store in ``bundle_dir`` the ANN index of the float model and of the INT8 one
    (when quantizing changes the item vectors), calibrated for ``serving.candidates``, so that
    loading the bundle with either setting reads the index instead of building it."""
    from serving.recommender import ServedModel
    from training.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    written: list[Path] = []
    for quantized in (False, True):
        served = ServedModel(bundle, bundle_dir, serving.model_copy(update={"quantized": quantized}))
        path = served.save_ann_index(bundle_dir) if served.ann_origin == "built" else None
        if path is not None and served.index is not None:
            written.append(path)
            log.info(
                "stored the %s ANN index (%s) in %s", "INT8" if quantized else "float", served.index.describe(), path
            )
    return written
