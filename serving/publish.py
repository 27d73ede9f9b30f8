"""Publish the registry's champion to the object store the serving tier reads."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from hyperrec.run_context import RunContext
from hyperrec.settings import Settings
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
    metadata.update({"version": f"v{version}", "registered_model": settings.mlflow.registered_model, "registered_version": version})
    meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
    extras: dict = {}
    try:
        extras["files"] = add_serving_extras(staged, run)
    except Exception as exc:  # serving then falls back to global popularity, and says so
        log.warning("no serving extras for v%s: %s", version, exc)
        extras = {"files": [], "error": f"{type(exc).__name__}: {exc}"}
    store = object_store(settings)
    published = publish(staged, store, f"v{version}")
    result = {"version": published, "store": str(store), "current": current_version(store), "serving_extras": extras}
    run.write_json("publish.json", result)
    return result


def add_serving_extras(bundle_dir: Path, run: RunContext) -> list[str]:
    """Write the serving-only files of ``bundle_dir`` from ``run``: segment popularity and
    segment profiles (:func:`serving.segments.write_segment_profiles`) when the run has a
    segmentation. Returns the files written (relative to ``bundle_dir``); an absent
    segmentation writes nothing and serving falls back to global popularity."""
    from serving.segments import write_segment_profiles
    from training.evaluation import load_split
    from training.stage import segment_of

    segments = segment_of(run)
    if not segments:
        log.info("run %s has no segmentation: the bundle gets no segment popularity", run.run_id)
        return []
    items = pd.read_parquet(Path(bundle_dir) / "items.parquet", columns=["item_id"])
    train, _ = load_split(run.split_dir)
    users = pd.read_parquet(run.clean_dir / "users") if (run.clean_dir / "users").exists() else None
    events = None
    if (run.clean_dir / "interactions").exists():
        events = pd.read_parquet(run.clean_dir / "interactions", columns=["user_id", "device"])
    out = write_segment_profiles(bundle_dir, items["item_id"].to_numpy(dtype=object), train, segments, users, events)
    return sorted(p.relative_to(bundle_dir).as_posix() for p in out.rglob("*") if p.is_file())
