"""The champion watcher (``hyperrec publisher``): every ``serving.champion_poll_s`` seconds
it compares the registry's ``champion`` alias with the version ``CURRENT`` names and, when
they differ, publishes the champion (:func:`serving.publish.follow_champion`), recording who
moved the alias and why in ``<home>/publish/decisions.jsonl``. So a champion change from any
source (the promotion gate, ``hyperrec model promote/rollback``, the MLflow UI or API) reaches
the serving tier, which hot-reloads ``CURRENT``, without a retrain.

Polling compares states rather than relaying events: a change made while the watcher was
down, or a publication that failed, is caught by the next poll. Errors (the registry or the
store unreachable) are logged and retried at the next poll; SIGTERM/SIGINT stop the loop
after the current poll. Each poll rewrites ``<home>/publish/publisher.json``
(:func:`publisher_status`), the watcher's heartbeat.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.files import write_text_atomic
from core.settings import Settings
from serving.publish import follow_champion, publish_dir

log = logging.getLogger(__name__)

STATUS = "publisher.json"
# urllib3 retries of one MLflow request (MLflow's default, 7, spends about 4 minutes on an
# unreachable server): fewer keep a poll short and a SIGTERM answered within seconds.
MLFLOW_RETRIES = "2"


def status_path(settings: Settings) -> Path:
    return publish_dir(settings) / STATUS


class ChampionWatcher:
    """Publishes the registry's champion whenever ``CURRENT`` names another version.

    :meth:`check` is one poll; :meth:`run` polls until a stop event is set;
    :meth:`run_until_signalled` until SIGTERM or SIGINT.
    """

    def __init__(self, settings: Settings, publisher: str | None = None) -> None:
        self.settings = settings
        self.interval_s = settings.serving.champion_poll_s
        self.publisher = publisher or f"hyperrec publisher (pid {os.getpid()})"
        self.workdir = publish_dir(settings) / "work"
        self._trouble: str | None = None  # what was last logged: a problem's kind, None when fine

    def check(self) -> dict | None:
        """One poll: publish the champion if ``CURRENT`` names another version. Returns the
        decision record, or None when nothing moved (also when there is no champion)."""
        try:
            result = follow_champion(self.settings, workdir=self.workdir, publisher=self.publisher)
        except LookupError as exc:  # no champion yet: what is served stays
            self._status(ok=True, problem=str(exc), kind=str(exc))
            return None
        self._status(ok=True, problem=None, kind=None, champion=result["version"], current=result["current"])
        return result["decision"]

    def run(self, stop: threading.Event) -> None:
        """Poll every ``interval_s`` seconds until ``stop`` is set; a failed poll is logged
        (once per kind of error in a row) and retried at the next."""
        log.info("watching the champion of %s every %.1f s", self.settings.mlflow.registered_model, self.interval_s)
        while not stop.is_set():
            try:
                self.check()
            except Exception as exc:
                self._status(ok=False, problem=f"{type(exc).__name__}: {exc}", kind=type(exc).__name__)
            stop.wait(self.interval_s)

    def run_until_signalled(self) -> None:
        """:meth:`run` until SIGTERM or SIGINT (the previous handlers come back afterwards)."""
        stop = threading.Event()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            signal.signal(sig, lambda *_: stop.set())
        try:
            self.run(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        log.info("champion watcher stopped")

    def _status(self, *, ok: bool, problem: str | None, kind: str | None, **fields: Any) -> None:
        """Log ``problem`` when its ``kind`` differs from the last one logged; rewrite the
        status file."""
        if kind != self._trouble:
            if problem is None:
                log.info("champion watcher: polling without trouble")
            else:
                (log.info if ok else log.error)("champion watcher: %s", problem)
            self._trouble = kind
        status = {
            "pid": os.getpid(),
            "checked_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "checked_unix": time.time(),
            "interval_s": self.interval_s,
            "ok": ok,
            "problem": problem,
            **fields,
        }
        try:
            status_path(self.settings).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(status_path(self.settings), json.dumps(status, indent=2, sort_keys=True))
        except OSError as exc:
            log.warning("cannot write %s: %s", status_path(self.settings), exc)


def publisher_status(settings: Settings) -> dict | None:
    """The last poll of the watcher of this home (pid, checked_at, checked_unix, interval_s,
    ok, problem, champion, current), with ``fresh``: it polled within three intervals (at
    least 30 s). None when no watcher ever ran here."""
    try:
        status = json.loads(status_path(settings).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    age = time.time() - float(status.get("checked_unix", 0))
    status["fresh"] = age <= max(3 * float(status.get("interval_s", 0)), 30.0)
    return status


def run_publisher(settings: Settings) -> None:
    """``hyperrec publisher``: the watcher until SIGTERM/SIGINT, logging to stderr."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_RETRIES)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each retry; the poll's error is logged
    ChampionWatcher(settings).run_until_signalled()
