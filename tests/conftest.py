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


# ---------------------------------------------------------------- brokers

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from broker.testing.launcher import BrokerProcess  # noqa: E402


@pytest.fixture
def broker_factory(session_name: str, tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start real broker processes (sim agent by default) on this test's session.

    Every broker started is stopped (SIGTERM, then SIGKILL) and the session's
    IPC objects removed at teardown, even when the test fails. The agent's
    HOME and the broker's state dir live under the test's tmp_path.
    """
    started: list[BrokerProcess] = []
    home = tmp_path / "home"
    home.mkdir()

    def start(
        *,
        agent: str = "sim",
        agent_args: tuple[str, ...] = (),
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        wait: bool = True,
        timeout_s: float = 30.0,
    ) -> BrokerProcess:
        b = BrokerProcess(
            session_name,
            tmp_path / "state",
            agent=agent,
            agent_args=agent_args,
            extra_args=extra_args,
            env={"HOME": str(home), **(env or {})},
            log_path=tmp_path / f"broker{len(started)}.log",
            cwd=str(home),
        )
        started.append(b)
        b.start(wait=wait, timeout_s=timeout_s)
        return b

    yield start
    for b in started:
        b.stop(timeout_s=15)


@pytest.fixture
def spawn_client(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Run a client script as a separate process (python -c CODE); killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(tmp_path),
            **kw,
        )
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait()
        for f in (p.stdout, p.stderr):
            if f is not None:
                f.close()
