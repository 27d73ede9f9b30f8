"""Publish the registry's champion to the object store the serving tier reads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from core.run_context import RunContext
from core.settings import ServingSettings, Settings
from serving.store import ObjectStore, current_version, publish
from training import registry

log = logging.getLogger(__name__)


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
    written = []
    for quantized in (False, True):
        served = ServedModel(bundle, bundle_dir, serving.model_copy(update={"quantized": quantized}))
        if served.ann_origin == "built":
            written.append(served.save_ann_index(bundle_dir))
            log.info(
                "stored the %s ANN index (%s) in %s",
                "INT8" if quantized else "float",
                served.index.describe(),
                written[-1],
            )
    return written
