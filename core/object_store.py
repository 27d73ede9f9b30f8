"""Object stores: keys in a local directory or under ``s3://bucket/prefix`` (boto3)."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.files import write_atomic


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
