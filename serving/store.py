"""Object stores holding published bundles, and atomic publishing.

An object store (a local directory or ``s3://bucket/prefix``) holds one folder per version
and a ``CURRENT`` pointer whose content is the served version. :func:`publish` writes the
pointer last, so a reader following ``CURRENT`` never sees half a bundle.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from core.files import write_atomic
from core.object_store import ObjectStore
from training.bundle import REQUIRED_FILES, validate_version

CURRENT = "CURRENT"


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every file under ``bundle_dir`` as a ``/``-separated relative path (the training files,
    ``blend/`` components and serving extras), sorted; hidden and temporary files are skipped."""
    bundle_dir = Path(bundle_dir)
    return sorted(
        p.relative_to(bundle_dir).as_posix()
        for p in bundle_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(bundle_dir).parts)
    )


def publish(bundle_dir: Path, store: ObjectStore, version: str, *, move_current: bool = True) -> str:
    """Upload every file of the bundle in ``bundle_dir`` (sub-folders included) to
    ``<store>/<version>/`` and then point ``CURRENT`` at it (unless ``move_current`` is
    false: an experiment's challenger is published beside the champion); return ``version``.

    Everything is checked before the first upload (required files present, metadata version
    equal to ``version``), and ``CURRENT`` is written last, so a failure leaves the previous
    version served. Re-publishing a version overwrites it and removes files it no longer has.
    """
    validate_version(version)
    bundle_dir = Path(bundle_dir)
    missing = [name for name in REQUIRED_FILES if not (bundle_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot publish {bundle_dir}: missing {missing}")
    try:
        meta_version = json.loads((bundle_dir / "metadata.json").read_text()).get("version")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"cannot publish {bundle_dir}: metadata.json is not a JSON object ({exc})") from exc
    if meta_version != version:
        raise ValueError(f"cannot publish {bundle_dir} as {version!r}: metadata.json says version {meta_version!r}")
    present = bundle_files(bundle_dir)
    # metadata.json goes last within the version too, marking the folder complete.
    for name in sorted(present, key=lambda n: n == "metadata.json"):
        store.put_file(f"{version}/{name}", bundle_dir / name)
    for key in store.list(version):
        if key.split("/", 1)[1] not in present:
            store.delete(key)
    if move_current:
        store.put_bytes(CURRENT, version.encode())
    return version


def current_version(store: ObjectStore) -> str | None:
    """The version ``CURRENT`` points at, or None when nothing was published."""
    raw = store.get_bytes(CURRENT)
    if raw is None:
        return None
    version = raw.decode("utf-8", errors="replace").strip()
    try:
        return validate_version(version)
    except ValueError as exc:
        raise ValueError(f"{store}/{CURRENT} holds an invalid version: {exc}") from exc


def fetch(store: ObjectStore, version: str, dest: Path) -> Path:
    """A local directory holding ``version``'s bundle files. A local store returns its own
    folder; otherwise the files are downloaded into ``dest`` (created; stale bundle files
    there are removed)."""
    validate_version(version)
    if store.is_local:
        folder = store.local_path(version)
        if not (folder / "metadata.json").is_file():
            raise FileNotFoundError(f"version {version!r} not found in {store} (no {folder / 'metadata.json'})")
        return folder
    names = {key.split("/", 1)[1] for key in store.list(version)}
    if "metadata.json" not in names:
        raise FileNotFoundError(f"version {version!r} not found in {store} (no {version}/metadata.json)")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in bundle_files(dest):
        if name not in names:
            (dest / name).unlink()
    # metadata.json last, so an interrupted fetch never looks complete.
    for name in sorted(names, key=lambda n: n == "metadata.json"):
        target = dest.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, partial(store.download, f"{version}/{name}"))
    return dest
