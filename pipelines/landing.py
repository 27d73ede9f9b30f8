"""The landing zone: new interaction batches, each immutable and named by its landing time.

Layout under ``settings.landing_uri`` (a local directory or ``s3://bucket/prefix``)::

    batches/<name>/interactions/part-*.parquet   INTERACTIONS columns (``event_id`` kept)
    batches/<name>/users.parquet                 USERS rows the batch brings (may be empty)
    batches/<name>/items.parquet                 ITEMS rows the batch brings (may be empty)
    batches/<name>/_BATCH.json                   written last: a batch without it has not landed
    incoming/<file or directory>                 dropped by hand; :meth:`LandingZone.claim_dropped`
                                                 lands each entry as a batch and removes it

A batch name is ``<UTC landing time, %Y%m%dT%H%M%S.%fZ>-<source>-<6 hex>``, so names sort by
landing time. Files are landed byte for byte (malformed rows are quarantined later, by
preprocessing); only the presence of the required INTERACTIONS columns is checked here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.datasets import RawDataset
from core.errors import UserError
from core.files import write_text_atomic
from core.object_store import ObjectStore
from core.schemas import INTERACTIONS, ITEMS, USERS
from core.settings import Settings

BATCHES = "batches"
INCOMING = "incoming"
MANIFEST = "_BATCH.json"
NAME_TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"
SOURCES = ("land", "consumer", "dropped")


class LandingError(UserError, ValueError):
    """A batch that cannot land; the message names the file and the reason."""


@dataclass(frozen=True)
class Batch:
    """One landed batch (its manifest)."""

    name: str
    landed_at: datetime
    source: str
    rows: int
    origin: str

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "landed_at": self.landed_at.isoformat(),
            "source": self.source,
            "rows": self.rows,
            "origin": self.origin,
        }


def batch_name(source: str, landed_at: datetime) -> str:
    """``<landing time>-<source>-<6 hex>``; names sort by landing time."""
    if source not in SOURCES:
        raise ValueError(f"unknown batch source {source!r} (known: {', '.join(SOURCES)})")
    return f"{landed_at.astimezone(UTC).strftime(NAME_TIME_FORMAT)}-{source}-{secrets.token_hex(3)}"


def landed_at_of(name: str) -> datetime:
    """The landing time a batch name carries."""
    try:
        return datetime.strptime(name.split("-", 1)[0], NAME_TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError as exc:
        raise ValueError(f"{name!r} is not a batch name ({NAME_TIME_FORMAT}-<source>-<hex>)") from exc


def _parquet_files(path: Path) -> list[Path]:
    """The Parquet files of ``path`` (a file, or a directory searched recursively)."""
    if path.is_file():
        if path.suffix.lower() != ".parquet":
            raise LandingError(f"{path}: only Parquet files land (got {path.suffix or 'no extension'})")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if p.is_file() and not p.name.startswith("."))
        if files:
            return files
        raise LandingError(f"{path}: no .parquet file in this directory")
    raise LandingError(f"{path}: no such file or directory")


def _check_columns(path: Path, required: list[str]) -> int:
    """Rows of the Parquet file ``path``; raises when a required column is missing."""
    try:
        meta = pq.ParquetFile(path)
    except Exception as exc:
        raise LandingError(f"{path}: not a readable Parquet file ({exc})") from exc
    missing = [c for c in required if c not in meta.schema_arrow.names]
    if missing:
        raise LandingError(f"{path}: missing required interaction columns {missing}")
    return meta.metadata.num_rows


def _source_tables(path: Path) -> tuple[list[Path], Path | None, Path | None]:
    """(interaction files, users file, items file) of what ``hyperrec land`` was given: a raw
    dataset directory (``interactions/``, ``users.parquet``, ``items.parquet``) or Parquet
    files of events."""
    path = Path(path)
    if path.is_dir() and (path / "interactions").is_dir():
        dataset = RawDataset(path)
        users = dataset.users if dataset.users.exists() else None
        items = dataset.items if dataset.items.exists() else None
        return _parquet_files(dataset.interactions), users, items
    return _parquet_files(path), None, None


class LandingZone:
    """Batches under one landing URI (see the module docstring)."""

    def __init__(self, uri: str, s3_endpoint_url: str | None = None) -> None:
        self.store = ObjectStore(uri, s3_endpoint_url)

    @classmethod
    def of(cls, settings: Settings) -> LandingZone:
        return cls(settings.landing_uri, settings.object_store.s3_endpoint_url)

    @property
    def uri(self) -> str:
        return self.store.uri

    # ------------------------------------------------------------------ writing

    def land(self, path: Path, *, source: str = "land", now: datetime | None = None) -> Batch:
        """Land the events at ``path`` (a raw dataset directory, a Parquet file, or a directory
        of them) as one new batch; nothing is visible until the whole batch is written."""
        files, users, items = _source_tables(Path(path))
        rows = sum(_check_columns(f, INTERACTIONS.required) for f in files)
        with tempfile.TemporaryDirectory(prefix="landing-") as tmp:
            staged = Path(tmp)
            (staged / "interactions").mkdir()
            for i, source_file in enumerate(files):
                shutil.copyfile(source_file, staged / "interactions" / f"part-{i:05d}.parquet")
            for schema, given, name in ((USERS, users, "users.parquet"), (ITEMS, items, "items.parquet")):
                if given is not None:
                    _check_columns(given, schema.required)
                    shutil.copyfile(given, staged / name)
                else:
                    pq.write_table(schema.arrow().empty_table(), staged / name)
            return self._commit(staged, source=source, rows=rows, origin=str(Path(path).resolve()), now=now)

    def land_events(self, events: pa.Table, *, source: str = "consumer", origin: str = "") -> Batch:
        """Land an in-memory table of events (conformed to INTERACTIONS) as one new batch."""
        table = INTERACTIONS.conform(events)
        with tempfile.TemporaryDirectory(prefix="landing-") as tmp:
            staged = Path(tmp)
            (staged / "interactions").mkdir()
            pq.write_table(table, staged / "interactions" / "part-00000.parquet")
            pq.write_table(USERS.arrow().empty_table(), staged / "users.parquet")
            pq.write_table(ITEMS.arrow().empty_table(), staged / "items.parquet")
            return self._commit(staged, source=source, rows=table.num_rows, origin=origin)

    def _commit(self, staged: Path, *, source: str, rows: int, origin: str, now: datetime | None = None) -> Batch:
        """Move the staged batch into ``batches/<name>`` with its manifest, atomically: a local
        store renames a complete directory into place; S3 gets the manifest last and
        fsync-free readers only list batches that have one."""
        landed_at = (now or datetime.now(UTC)).astimezone(UTC)
        name = batch_name(source, landed_at)
        batch = Batch(name, landed_at, source, rows, origin)
        files = sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file())
        manifest = json.dumps({**batch.to_json(), "files": files}, indent=2)
        if self.store.is_local:
            root = self.store.local_path(BATCHES)
            root.mkdir(parents=True, exist_ok=True)
            partial = root / f".{name}.partial"
            shutil.copytree(staged, partial)
            write_text_atomic(partial / MANIFEST, manifest)
            _fsync_tree(partial)
            os.rename(partial, root / name)
            _fsync_dir(root)
        else:
            for rel in files:
                self.store.put_file(f"{BATCHES}/{name}/{rel}", staged / rel)
            self.store.put_bytes(f"{BATCHES}/{name}/{MANIFEST}", manifest.encode())
        return batch

    def claim_dropped(self) -> list[Batch]:
        """Land every entry dropped under ``incoming/`` (a Parquet file or a directory of them)
        as its own batch, then remove it from ``incoming/``. An entry that cannot land is left
        in place and reported in the raised :class:`LandingError` after the others landed."""
        landed, errors = [], []
        for entry, local in self._incoming():
            try:
                landed.append(self.land(local, source="dropped"))
            except LandingError as exc:
                errors.append(str(exc))
                continue
            self._remove_incoming(entry)
        if errors:
            raise LandingError(
                f"{len(errors)} dropped entr{'y' if len(errors) == 1 else 'ies'} not landed: " + "; ".join(errors)
            )
        return landed

    def _incoming(self) -> Iterator[tuple[str, Path]]:
        if self.store.is_local:
            root = self.store.local_path(INCOMING)
            if root.is_dir():
                for entry in sorted(root.iterdir()):
                    if not entry.name.startswith("."):
                        yield entry.name, entry
            return
        entries = sorted({key.split("/")[1] for key in self.store.list(INCOMING)})
        for entry in entries:
            with tempfile.TemporaryDirectory(prefix="incoming-") as tmp:
                keys = self.store.list(f"{INCOMING}/{entry}")
                for key in keys:
                    target = Path(tmp).joinpath(*key.split("/"))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    self.store.download(key, target)
                yield entry, Path(tmp).joinpath(INCOMING, entry)

    def _remove_incoming(self, entry: str) -> None:
        if self.store.is_local:
            path = self.store.local_path(f"{INCOMING}/{entry}")
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        else:
            for key in self.store.list(f"{INCOMING}/{entry}"):
                self.store.delete(key)

    # ------------------------------------------------------------------ reading

    def batches(self, *, window_days: float | None = None, now: datetime | None = None) -> list[Batch]:
        """Landed batches (with a manifest), oldest first; with ``window_days``, only those
        landed within that many days before ``now``."""
        names = sorted(
            {key.split("/")[1] for key in self.store.list(BATCHES) if key.endswith(f"/{MANIFEST}")}
            if not self.store.is_local
            else {p.parent.name for p in self.store.local_path(BATCHES).glob(f"*/{MANIFEST}")}
        )
        since = None
        if window_days is not None:
            since = (now or datetime.now(UTC)) - timedelta(days=window_days)
        out = []
        for name in names:
            if name.startswith("."):
                continue
            manifest = json.loads(self.store.get_bytes(f"{BATCHES}/{name}/{MANIFEST}") or b"{}")
            batch = Batch(
                name=name,
                landed_at=datetime.fromisoformat(manifest["landed_at"]),
                source=manifest["source"],
                rows=int(manifest["rows"]),
                origin=manifest.get("origin", ""),
            )
            if since is None or batch.landed_at > since:
                out.append(batch)
        return out

    def batch(self, name: str) -> Batch:
        """The landed batch called ``name``; raises :class:`LookupError` when there is none."""
        for batch in self.batches():
            if batch.name == name:
                return batch
        raise LookupError(f"no landed batch {name!r} in {self.uri}")

    def raw_dataset(self, batch: Batch | str, dest: Path) -> RawDataset:
        """The batch as a local raw dataset: a local store's own directory, or a download
        into ``dest/<name>``."""
        name = batch if isinstance(batch, str) else batch.name
        if self.store.is_local:
            return RawDataset(self.store.local_path(f"{BATCHES}/{name}")).check()
        root = Path(dest) / name
        for key in self.store.list(f"{BATCHES}/{name}"):
            target = root.joinpath(*key.split("/")[2:])
            target.parent.mkdir(parents=True, exist_ok=True)
            self.store.download(key, target)
        return RawDataset(root).check()


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
