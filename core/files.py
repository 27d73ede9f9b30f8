"""Writing files so that readers see either the old content or the new, never a half.

Every JSON or YAML state file (run records, reports, decision logs, the settings file of
task processes) goes through :func:`write_text_atomic` or :func:`write_json_atomic`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The temporary file is removed if ``write`` raises (``path`` keeps its old content);
    ``path`` is returned.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename), with
    permission bits ``mode`` when given: the file never exists with wider ones."""

    def write(tmp: Path) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)  # the umask may have narrowed it
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return write_atomic(path, write)


def write_json_atomic(path: Path, payload: Any, mode: int | None = None) -> Path:
    """Write ``payload`` as indented, key-sorted JSON (``default=str`` for dates and paths)
    to ``path`` atomically; see :func:`write_text_atomic`. The payload is encoded before
    anything is written, so an unencodable one leaves ``path`` as it was."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str), mode=mode)


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created with its folder; it then names the
    holder: pid and since when), released when the holder exits, even by SIGKILL. With
    ``timeout_s``, raise :class:`TimeoutError` naming the current holder after that many
    seconds of waiting; without, wait as long as it takes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    fh.seek(0)
                    raise TimeoutError(fh.read().strip() or "unknown holder") from None
                time.sleep(0.05)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()} since {datetime.now(UTC).isoformat(timespec='seconds')}")
            fh.flush()
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
