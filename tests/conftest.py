"""Shared fixtures: unique names per test, cleanup that runs even when a test fails."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from ipc import sweep


@pytest.fixture
def session_name() -> Iterator[str]:
    """A session name unique to this test; every IPC object under it is removed afterwards."""
    name = f"t{os.getpid()}-{secrets.token_hex(4)}"
    yield name
    sweep.sweep(session=name, force=True)
