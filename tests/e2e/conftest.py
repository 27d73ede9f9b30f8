"""Fixtures of the end-to-end tests."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture(scope="module")
def owner():
    """A stand-in for the operator's shell (one per test module): ``up --owner-pid`` follows it."""
    proc = subprocess.Popen(["sleep", "3600"])
    yield proc
    proc.kill()
    proc.wait()
