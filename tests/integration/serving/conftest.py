"""Serving-test fixtures: one real Valkey server (embedded, :func:`feature_store.online.open_redis`)
for the session; each test's app gets its own key namespace on it."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def valkey_url():
    from feature_store.online import open_redis

    with open_redis(None) as server:
        yield server.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
