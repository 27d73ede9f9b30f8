"""The champion watcher (``hyperrec publisher``) against real components: an ``mlflow server``
process over a sqlite store, a local object store, a ``hyperrec serve`` process hot-reloading
``CURRENT`` and the publisher process. Two tiny bundles are registered (v1: EASE, v2:
popularity) and promoted by hand, v2 last.

- A rollback (:func:`training.registry.rollback`) and an alias moved through
  ``MlflowClient.set_registered_model_alias`` (what the MLflow UI does) each change the
  ``model_version`` that ``GET /v1/recommendations/{user}`` reports within 60 s, while a
  steady load (one client thread, ~100 requests/s) sees no failed request; the decision
  records in ``<home>/publish/decisions.jsonl`` say who moved the alias and why, or that it
  was moved outside hyperrec.
- Publishers racing for one change (the DAG's ``publish`` stage, a watcher poll and the
  publisher process) leave one decision record.
- An unreachable registry makes polls fail, not the loop; the stop event ends it.

The intervals are ``champion_poll_s`` 2 s and ``reload_interval_s`` 0.5 s unless
``HYPERREC_SERVING__CHAMPION_POLL_S`` / ``HYPERREC_SERVING__RELOAD_INTERVAL_S`` say otherwise
(they reach every process); each swap's latency is printed (``-s``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fixtures_serving import tiny_bundle
from mlflow import MlflowClient
from typer.testing import CliRunner

from core.net import free_port
from core.run_context import RunContext
from core.settings import Settings, load_settings
from hyperrec.cli import app
from serving.champion_watch import ChampionWatcher, publisher_status
from serving.publish import (
    DECISIONS,
    OUTSIDE,
    ServedPyfunc,
    champion_change,
    follow_champion,
    object_store,
    publish_champion,
    publish_dir,
)
from serving.store import current_version
from training.registry import CHAMPION, champion_version, log_and_register, promote_version, rollback

SWAP_DEADLINE_S = 60.0
USERS = ["u1", "u2", "u3", "u4", "u5", "new-1", "new-2"]


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited ({proc.returncode}); log:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; log:\n{_tail(log)}")
        time.sleep(0.1)


def _tail(log: Path | None) -> str:
    return "" if log is None or not log.exists() else log.read_text()[-3000:]


def _answers(url: str) -> bool:
    """Whether GET ``url`` answers 200."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def _process(argv: list[str], log: Path, grace_s: float = 30):
    """``argv`` in a session of its own, output to ``log``; at exit SIGTERM to its process
    group, SIGKILL to what is left of it after ``grace_s`` seconds (or once the leader ended)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _decisions(settings: Settings) -> list[dict]:
    path = publish_dir(settings) / DECISIONS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass
class Stack:
    settings: Settings
    serving_url: str
    versions: tuple[int, int]
    publisher: subprocess.Popen
    config: str

    def decisions(self) -> list[dict]:
        return _decisions(self.settings)

    def served(self) -> str:
        answer = httpx.get(f"{self.serving_url}/v1/recommendations/u1", timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.json()["model_version"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, valkey_url: str):
    root = tmp_path_factory.mktemp("champion-watch")
    mlflow_port, serving_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    config = root / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "home": str(root / "home"),
                "object_store": {"uri": str(root / "store")},
                "online_store": {"url": valkey_url},
                "mlflow": {"tracking_uri": mlflow_url, "registered_model": "champion-watch", "experiment": "watch"},
                "serving": {
                    "port": serving_port,
                    "reload_interval_s": 0.5,
                    "champion_poll_s": 2.0,
                    "namespace": f"t{uuid.uuid4().hex[:12]}",
                },
            }
        )
    )
    settings = load_settings(config)
    logs = root / "logs"
    logs.mkdir()
    python = sys.executable
    argv = {
        "mlflow": [
            str(Path(python).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            (root / "artifacts").as_uri(),
            "--no-serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        "serving": [python, "-m", "hyperrec.cli", "serve", "--config", str(config)],
        "publisher": [python, "-m", "hyperrec.cli", "publisher", "--config", str(config)],
    }
    serving_url = f"http://127.0.0.1:{serving_port}"
    with contextlib.ExitStack() as stop_all:
        # All start at once: serving answers 503 and the publisher retries until there is a champion.
        procs = {
            name: stop_all.enter_context(_process(args, logs / f"{name}.log", grace_s=5 if name == "mlflow" else 30))
            for name, args in argv.items()
        }
        _wait(lambda: _answers(f"{mlflow_url}/health"), 180, "mlflow healthy", procs["mlflow"], logs / "mlflow.log")
        versions = []
        for n, kind in enumerate(("ease", "popularity"), start=1):
            reg = log_and_register(
                settings,
                run_name=f"watch-{kind}",
                params={"model": kind},
                metrics={},
                bundle_dir=tiny_bundle(root / "bundles" / kind, f"v{n}", model_kind=kind),
                artifact_dirs={},
                tags={"hyperrec.model": kind},
                python_model=ServedPyfunc(settings.serving),
            )
            versions.append(reg.version)
        v1, v2 = versions
        promote_version(settings, v1, "first model", user="alice")
        promote_version(settings, v2, "better offline NDCG", user="bob")
        publisher = procs["publisher"]
        store = object_store(settings)
        _wait(lambda: current_version(store) == f"v{v2}", 120, "v2 published", publisher, logs / "publisher.log")
        # The decision record is written after CURRENT moves.
        _wait(lambda: f"v{v2}" in (r["version"] for r in _decisions(settings)), 30, "v2's record", publisher)
        _wait(lambda: _answers(f"{serving_url}/readyz"), 120, "serving ready", procs["serving"], logs / "serving.log")
        yield Stack(settings, serving_url, (v1, v2), publisher, str(config))
        # SIGTERM stops the publisher, cleanly and promptly.
        publisher.send_signal(signal.SIGTERM)
        assert publisher.wait(timeout=20) == 0, _tail(logs / "publisher.log")


class Load:
    """One client thread issuing recommendation requests (~5 ms apart) until stopped;
    ``seen`` holds ``(monotonic time, status or error, model_version)`` per request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[tuple[float, str, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            n = 0
            while not self._stop.is_set():
                user = USERS[n % len(USERS)]
                n += 1
                try:
                    answer = client.get(f"{self.url}/v1/recommendations/{user}", params={"k": 3})
                    version = answer.json().get("model_version") if answer.status_code == 200 else None
                    self.seen.append((time.monotonic(), str(answer.status_code), version))
                except Exception as exc:  # a dropped connection, a timeout, a bad body
                    self.seen.append((time.monotonic(), f"{type(exc).__name__}: {exc}", None))
                time.sleep(0.005)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def first(self, version: str, since: float, timeout: float) -> float:
        """Monotonic time of the first answer from ``version`` after ``since``."""

        def found():
            return next((t for t, status, v in list(self.seen) if t >= since and v == version), None)

        return _wait(found, timeout, f"an answer from {version}")

    @property
    def failures(self) -> list[tuple[float, str, str | None]]:
        return [s for s in self.seen if s[1] != "200"]


def _swap(stack: Stack, move, expected: str) -> tuple[float, Load]:
    """Move the alias with ``move()`` under steady load; returns (seconds from the move to the
    first answer from ``expected``, the load), after 1 s more of load."""
    with Load(stack.serving_url) as load:
        time.sleep(1.0)
        moved_at = time.monotonic()
        move()
        served_at = load.first(expected, moved_at, SWAP_DEADLINE_S)
        time.sleep(1.0)
    latency = served_at - moved_at
    print(f"\nswap to {expected}: {latency:.2f} s from the alias move to the first answer; {len(load.seen)} requests")
    return latency, load


def _assert_clean_swap(load: Load, old: str, new: str, latency: float) -> None:
    assert load.failures == [], load.failures[:5]
    versions = [v for _, _, v in load.seen]
    switch = versions.index(new)
    assert switch > 50 and len(versions) - switch > 50  # a steady load before and after the swap
    assert set(versions[:switch]) == {old} and set(versions[switch:]) == {new}  # one swap, no flapping
    assert latency < SWAP_DEADLINE_S


def _other(stack: Stack, version: int) -> int:
    return stack.versions[0] if version == stack.versions[1] else stack.versions[1]


@pytest.mark.slow
def test_publications_record_the_manual_promotions(stack: Stack) -> None:
    """The publisher started before MLflow answered; it published v2 (and v1, had it polled
    between the two promotions), each with the promotion's who and why."""
    v1, v2 = stack.versions
    records = stack.decisions()
    assert records[0]["previous"] is None and [r["version"] for r in records] in ([f"v{v2}"], [f"v{v1}", f"v{v2}"])
    why = {f"v{v1}": ("manual", "alice", "first model", None), f"v{v2}": ("manual", "bob", "better offline NDCG", v1)}
    for record in records:
        assert (record["source"], record["user"], record["reason"], record["previous_champion"]) == why[
            record["version"]
        ]
        assert record["publisher"] == f"hyperrec publisher (pid {stack.publisher.pid})"
    status = publisher_status(stack.settings)
    assert status is not None and status["fresh"] and status["ok"] and status["pid"] == stack.publisher.pid
    if len(records) == 1:  # v1 was not published: what its record would say, read after bob's promotion
        change = champion_change(stack.settings, v1)
        assert (change["source"], change["user"], change["reason"]) == ("manual", "alice", "first model")


@pytest.mark.slow
def test_rollback_is_served_within_a_minute_without_a_failed_request(stack: Stack) -> None:
    # Start from serving on the champion: on a busy machine the last promotion may still be
    # on its way (the rollback's target is the champion's predecessor, not the served one's).
    champion = f"v{champion_version(stack.settings)}"
    old = _wait(lambda: stack.served() == champion and champion, SWAP_DEADLINE_S, "serving on the champion")
    before = len(stack.decisions())
    box: dict = {}

    def move() -> None:
        box["record"] = rollback(stack.settings, reason="CTR fell after the launch", user="carol")

    expected = f"v{_other(stack, int(old[1:]))}"
    latency, load = _swap(stack, move, expected)
    assert f"v{box['record']['version']}" == expected
    _assert_clean_swap(load, old, expected, latency)

    records = _wait(lambda: stack.decisions()[before:], 10, "the decision record")
    assert len(records) == 1
    record = records[0]
    assert (record["version"], record["previous"]) == (expected, old)
    assert (record["source"], record["user"], record["reason"]) == ("rollback", "carol", "CTR fell after the launch")
    assert record["previous_champion"] == int(old[1:]) and record["decided_at"] == box["record"]["at"]
    name = stack.settings.mlflow.registered_model

    def published_tags() -> dict[str, str]:  # set after the record, published_at last
        found = MlflowClient().get_model_version(name, expected[1:]).tags
        return found if found.get("hyperrec.published_at") == record["at"] else {}

    tags = _wait(published_tags, 10, "the version's publication tags")
    assert tags["hyperrec.published_by"] == record["publisher"] and tags["hyperrec.published_previous"] == old
    assert tags["hyperrec.published_event"] == f"rollback@{record['decided_at']}"


@pytest.mark.slow
def test_alias_moved_in_the_mlflow_ui_is_served_and_recorded_as_outside(stack: Stack) -> None:
    old = stack.served()
    before = len(stack.decisions())
    target = _other(stack, int(old[1:]))
    name = stack.settings.mlflow.registered_model

    def move() -> None:  # what the MLflow UI's alias editor does, through the REST API
        MlflowClient(tracking_uri=stack.settings.mlflow_tracking_uri).set_registered_model_alias(
            name, CHAMPION, str(target)
        )

    latency, load = _swap(stack, move, f"v{target}")
    _assert_clean_swap(load, old, f"v{target}", latency)

    records = _wait(lambda: stack.decisions()[before:], 10, "the decision record")
    assert len(records) == 1
    record = records[0]
    assert (record["version"], record["previous"]) == (f"v{target}", old)
    assert (record["source"], record["user"], record["reason"]) == ("outside", None, OUTSIDE)
    # The version's own tags tell what hyperrec knew of it.
    assert record["version_tags"]["promotion.user"] in ("alice", "bob")
    assert record["version_tags"]["gate.decision"] == "manual"


@pytest.mark.slow
def test_racing_publishers_record_one_decision(stack: Stack, tmp_path: Path) -> None:
    """``hyperrec model promote`` (which says the running publisher will publish), then the
    DAG's ``publish`` stage and a watcher's poll at once (and the publisher process):
    ``CURRENT`` ends on the champion, one record explains it, and the stage still re-publishes
    and writes ``publish.json``."""
    old = stack.served()
    target = _other(stack, int(old[1:]))
    before = len(stack.decisions())
    promoted = CliRunner().invoke(
        app, ["model", "promote", str(target), "--by", "dana", "--reason", "A/B test winner", "--config", stack.config]
    )
    assert promoted.exit_code == 0, promoted.output
    assert f"serving follows within ~{stack.settings.serving.champion_poll_s:g} s" in promoted.output
    assert f"the publisher (pid {stack.publisher.pid})" in promoted.output
    run = RunContext(run_id="dag", root=tmp_path / "dag")
    publishers = {
        "dag": lambda: publish_champion(stack.settings, run),
        "watcher": lambda: follow_champion(stack.settings, workdir=tmp_path / "watcher", publisher="watcher"),
    }
    results: dict[str, dict] = {}
    threads = [threading.Thread(target=lambda n=n: results.update({n: publishers[n]()})) for n in publishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(results) == set(publishers)
    assert champion_version(stack.settings) == target
    assert current_version(object_store(stack.settings)) == f"v{target}"
    assert run.read_json("publish.json")["current"] == f"v{target}"
    time.sleep(2 * stack.settings.serving.champion_poll_s + 1)  # the publisher process had its turn too
    records = stack.decisions()[before:]
    assert len(records) == 1, records
    assert (records[0]["version"], records[0]["source"], records[0]["user"]) == (f"v{target}", "manual", "dana")
    assert sum(r["changed"] for r in results.values()) <= 1
    _wait(lambda: stack.served() == f"v{target}", SWAP_DEADLINE_S, "serving the promoted version")


def test_unreachable_registry_fails_polls_not_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = load_settings(
        home=str(tmp_path / "home"),
        object_store={"uri": str(tmp_path / "store")},
        mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"},
        serving={"champion_poll_s": 0.2},
    )
    watcher, stop = ChampionWatcher(settings), threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        first = _wait(lambda: publisher_status(settings), 30, "a first poll")
        assert not first["ok"] and "MlflowException" in first["problem"]
        _wait(lambda: publisher_status(settings)["checked_unix"] > first["checked_unix"], 30, "a second poll")
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert current_version(object_store(settings)) is None
