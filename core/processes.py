"""Processes on this host: liveness checks, and child processes that never outlive their
parent.

A server child (Valkey, a uvicorn worker, an Airflow component, a Spark JVM) must stop when
the process that started it stops, however that ends, ``kill -9`` included:

- :func:`die_with_parent` (Linux ``PR_SET_PDEATHSIG``): the kernel sends the child SIGTERM
  when its parent ends; the ``preexec_fn`` of a :class:`subprocess.Popen`.
- :func:`watch_parent`: a thread in a Python child that ends it when it has been reparented
  (its parent died), for sandboxes where the death signal is not delivered.
- :func:`exit_on_signals`: SIGTERM/SIGHUP become ``SystemExit``, so that ``with`` blocks and
  ``finally`` clauses (which stop the children in order) run on ``kill`` too.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Seconds between two checks of :func:`watch_parent`, and how long it lets the process stop
# cleanly (SIGTERM to itself) before it exits hard.
PARENT_POLL_S = 0.5
PARENT_GONE_GRACE_S = 8.0


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` (a positive int) is a running process on this host; a zombie is not."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


def die_with_parent(parent: int | None = None) -> Callable[[], None]:
    """A function that makes the process calling it get SIGTERM when its parent ends,
    however it ends, ``kill -9`` included (Linux ``PR_SET_PDEATHSIG``; elsewhere a no-op).

    Pass it as ``preexec_fn`` when starting a server child (``parent``: this process), with
    ``process_group=0`` too, so a terminal's Ctrl-C reaches only the parent, which then stops
    the child in order. The signal comes when the *thread* that started the child ends, so
    start it from a thread that lives as long as the child should (the main one, or a
    watchdog thread that lives as long as what it watches). A process started otherwise
    (e.g. a multiprocessing worker) calls it itself with its parent's pid.
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


def watch_parent(
    parent: int, *, poll_s: float = PARENT_POLL_S, grace_s: float = PARENT_GONE_GRACE_S
) -> threading.Thread:
    """Start a daemon thread that stops this process once ``parent`` is no longer its parent
    (it died and this process was reparented): SIGTERM to itself (a clean stop), then
    ``os._exit(1)`` after ``grace_s`` if it is still running. The fallback of
    :func:`die_with_parent` where the kernel's death signal does not arrive."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.warning("parent process %d is gone: stopping (pid %d)", parent, os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name=f"watch-parent-{parent}", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def exit_on_signals(*signals: int) -> Iterator[None]:
    """Within the block, each of ``signals`` (default SIGTERM and SIGHUP) raises
    ``SystemExit(128 + signal)`` in the main thread, so cleanup (``with`` exits, ``finally``)
    runs as on Ctrl-C; the previous handlers come back afterwards. A library that installs
    handlers of its own meanwhile (uvicorn) and re-raises the signal when it is done reaches
    these handlers then."""
    chosen = signals or (signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    before = {sig: signal.signal(sig, handler) for sig in chosen}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)
