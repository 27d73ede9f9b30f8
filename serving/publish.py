"""Publish the registry's champion to the object store the serving tier reads."""

from __future__ import annotations

import json
import shutil

from hyperrec.run_context import RunContext
from hyperrec.settings import Settings
from serving.store import ObjectStore, current_version, publish
from training import registry


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
    store = object_store(settings)
    published = publish(staged, store, f"v{version}")
    result = {"version": published, "store": str(store), "current": current_version(store)}
    run.write_json("publish.json", result)
    return result
