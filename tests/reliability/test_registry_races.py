"""Concurrent champion changes against a real MLflow registry (the session's sqlite store):
promotions at the same instant are applied one after the other, each reports the champion
it really replaced, and the history keeps every one, so rollback reaches each of them."""

from __future__ import annotations

import threading
import uuid

import pytest

from core.settings import Settings
from training.registry import champion_history, promote_version, rollback

PROMOTIONS = 4


@pytest.fixture(scope="module")
def registered(settings, tmp_path_factory) -> tuple[Settings, list[int]]:
    """A registered model of its own with PROMOTIONS + 1 versions (created straight in the
    registry: what is served does not matter here); the first is champion."""
    from core.tracking import configure

    mlflow = settings.mlflow.model_copy(update={"registered_model": f"test-races-{uuid.uuid4().hex[:10]}"})
    own = settings.model_copy(update={"mlflow": mlflow})
    client, name = configure(own), own.mlflow.registered_model
    client.create_registered_model(name)
    source = tmp_path_factory.mktemp("race-model")
    versions = [int(client.create_model_version(name, str(source)).version) for _ in range(PROMOTIONS + 1)]
    promote_version(own, versions[0], "first")
    return own, versions


def test_concurrent_promotions_are_serialized_and_all_kept(registered):
    settings, versions = registered
    first, contenders = versions[0], versions[1:]
    barrier = threading.Barrier(len(contenders))
    records: dict[int, dict] = {}
    errors: list[BaseException] = []

    def promote(version: int) -> None:
        try:
            barrier.wait()
            records[version] = promote_version(settings, version, "race", user="racer")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(v,)) for v in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors

    from core.tracking import configure

    history = champion_history(configure(settings), settings.mlflow.registered_model)
    assert history[0] == first and sorted(history[1:]) == sorted(contenders), history
    assert len(history) == PROMOTIONS + 1
    # Each promotion replaced exactly the champion before it in the serial order.
    previous = {r["version"]: r["previous_champion"] for r in records.values()}
    assert [previous[v] for v in history[1:]] == history[:-1], (history, previous)
    assert len(set(previous.values())) == PROMOTIONS  # no two saw the same champion

    # Rollback reaches every one of them, newest first.
    for expected in reversed(history[:-1]):
        assert rollback(settings, reason="walk back", user="racer")["version"] == expected


def test_a_held_lock_makes_a_promotion_wait(registered):
    from training.registry import registry_lock

    settings, versions = registered
    done = threading.Event()

    def promote() -> None:
        promote_version(settings, versions[-1], "after the lock")
        done.set()

    with registry_lock(settings):
        worker = threading.Thread(target=promote)
        worker.start()
        assert not done.wait(1.0)  # blocked while the lock is held
    worker.join(timeout=60)
    assert done.is_set()
