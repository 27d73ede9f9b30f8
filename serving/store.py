"""Object stores holding published bundles, and atomic publishing.

An object store (a local directory or ``s3://bucket/prefix``) holds one folder per version
and a ``CURRENT`` pointer whose content is the served version. :func:`publish` writes the
pointer last, so a reader following ``CURRENT`` never sees half a bundle.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

from core.files import write_atomic
from training.bundle import REQUIRED_FILES, validate_version

CURRENT = "CURRENT"


class ObjectStore:
    """Keys (``/``-separated) in a local directory or under ``s3://bucket/prefix`` (boto3).

    Each single-object write is atomic: local writes go to a temporary file renamed into
    place, and S3 PUTs are atomic per object.
    """

    def __init__(self, uri: str, s3_endpoint_url: str | None = None) -> None:
        self.uri = str(uri)
        if self.uri.startswith("s3://"):
            bucket, _, prefix = self.uri[len("s3://") :].partition("/")
            if not bucket:
                raise ValueError(f"object store URI {self.uri!r} names no bucket")
            self.bucket: str | None = bucket
            self.prefix = prefix.strip("/")
            self.root: Path | None = None
            import boto3

            self._s3 = boto3.client("s3", endpoint_url=s3_endpoint_url)
        else:
            local = self.uri[len("file://") :] if self.uri.startswith("file://") else self.uri
            self.bucket, self.prefix, self.root = None, "", Path(local)

    def __repr__(self) -> str:
        return f"ObjectStore({self.uri!r})"

    @property
    def is_local(self) -> bool:
        return self.root is not None

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def local_path(self, key: str) -> Path:
        """The file of ``key`` in a local store."""
        if self.root is None:
            raise ValueError(f"{self} is not a local store")
        return self.root.joinpath(*key.split("/"))

    def put_file(self, key: str, source: Path) -> None:
        if self.root is None:
            self._s3.upload_file(str(source), self.bucket, self._key(key))
            return
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.root is None:
            self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
            return
        target = self.local_path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, lambda tmp: tmp.write_bytes(data))

    def get_bytes(self, key: str) -> bytes | None:
        """The content of ``key``, or None when it does not exist."""
        if self.root is not None:
            path = self.local_path(key)
            return path.read_bytes() if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def list(self, prefix: str) -> list[str]:
        """Keys directly or indirectly under ``prefix/``, relative to the store, sorted."""
        prefix = prefix.strip("/")
        if self.root is not None:
            base = self.local_path(prefix)
            if not base.is_dir():
                return []
            return sorted(
                f"{prefix}/{p.relative_to(base).as_posix()}"
                for p in base.rglob("*")
                if p.is_file() and not p.name.startswith(".")
            )
        full = self._key(prefix) + "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        if self.root is None:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))
        else:
            self.local_path(key).unlink(missing_ok=True)

    def download(self, key: str, dest: Path) -> None:
        if self.root is not None:
            shutil.copyfile(self.local_path(key), dest)
        else:
            self._s3.download_file(self.bucket, self._key(key), str(dest))


def bundle_files(bundle_dir: Path) -> list[str]:
    """Every file under ``bundle_dir`` as a ``/``-separated relative path (the training files,
    ``blend/`` components and serving extras), sorted; hidden and temporary files are skipped."""
    bundle_dir = Path(bundle_dir)
    return sorted(
        p.relative_to(bundle_dir).as_posix()
        for p in bundle_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(bundle_dir).parts)
    )


def publish(bundle_dir: Path, store: ObjectStore, version: str) -> str:
    """Upload every file of the bundle in ``bundle_dir`` (sub-folders included) to
    ``<store>/<version>/`` and then point ``CURRENT`` at it; return ``version``.

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
