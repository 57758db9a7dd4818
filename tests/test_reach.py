"""A broker that runs out of a client's reach: another IPC namespace, another /dev/shm, another user.

The client must not be told "no broker: start one" (starting one there fails:
the lock is held, the names are taken) but what is wrong and what to do. A
real broker serves the session; the client runs in an ``unshare --ipc`` child,
in a child with its own IPC namespace and /dev/shm, or as ``nobody``.
Changing namespaces or uid needs root: without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import ipc_helpers as h

#: Connects once with a short timeout; prints what it got as one JSON line.
CLIENT = r"""
import json, sys
from clients import BrokerUnavailable, Client
try:
    with Client(sys.argv[1], "worker", connect_timeout_s=1) as c:
        print(json.dumps({"type": "connected"}))
except BrokerUnavailable as exc:
    print(json.dumps({"type": type(exc).__name__, "reason": getattr(exc, "reason", None),
                      "owner_uid": getattr(exc, "owner_uid", None), "message": str(exc), "exit_code": exc.exit_code}))
"""

needs_root = pytest.mark.skipif(not h.is_root(), reason="unshare and dropping to another uid need root")


def run_client(session: str, *, wrap: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    argv = [sys.executable, "-c", CLIENT, session]
    if wrap:
        argv = [*wrap, *argv]
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})
    assert cp.returncode == 0, cp.stderr[-2000:]
    out: dict[str, Any] = json.loads(cp.stdout.strip().splitlines()[-1])
    return out


def test_no_broker_at_all_still_says_start_one(session_name: str, tmp_path: Path) -> None:
    """The diagnosis adds nothing when no broker runs: the plain advice stands."""
    out = run_client(session_name, env={"TURNSTILE_STATE_DIR": str(tmp_path / "state")})
    assert out["type"] == "BrokerUnavailable" and "Start one with: turnstile serve" in out["message"], out


@needs_root
@pytest.mark.root
def test_client_in_another_ipc_namespace_is_told_why(broker_factory: Any, session_name: str) -> None:
    broker_factory()
    out = run_client(session_name, wrap=["unshare", "--ipc"])
    assert (out["type"], out["reason"], out["exit_code"]) == ("BrokerUnreachable", "other_ipc_namespace", 5), out
    msg = out["message"]
    assert "request queue is not visible here" in msg and "another IPC namespace" in msg
    assert "--ipc=container:" in msg and "turnstile gateway" in msg
    assert "Start one with" not in msg
    # `turnstile status` there sees the live broker (shared memory is not per IPC namespace), and says it is
    # out of reach instead of leaving the reader to start another.
    cp = subprocess.run(["unshare", "--ipc", sys.executable, "-m", "broker.cli", "status", "--session", session_name],
                        capture_output=True, text=True, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "request queue is not visible here" in cp.stderr


@needs_root
@pytest.mark.root
def test_client_with_its_own_dev_shm_finds_the_held_lock(broker_factory: Any, session_name: str) -> None:
    """A container with its own IPC namespace and /dev/shm but the broker's state directory (a shared volume)."""
    b = broker_factory()
    script = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
    out = run_client(session_name, wrap=["unshare", "--ipc", "--mount", "--propagation", "private", "sh", "-c",
                                          script, "sh"],
                     env={"TURNSTILE_STATE_DIR": str(b.state_dir)})
    assert (out["type"], out["reason"]) == ("BrokerUnreachable", "lock_held"), out
    assert "broker.lock" in out["message"] and "--ipc=container:" in out["message"]
    assert "Start one with" not in out["message"]


def _client_as_nobody(conn: Any, session: str) -> dict[str, Any]:
    from clients import BrokerUnavailable, Client

    h.drop_to(*h.nobody())
    try:
        with Client(session, "worker", connect_timeout_s=1):
            return {"type": "connected"}
    except BrokerUnavailable as exc:
        return {"type": type(exc).__name__, "reason": getattr(exc, "reason", None),
                "owner_uid": getattr(exc, "owner_uid", None), "message": str(exc)}


@needs_root
@pytest.mark.root
def test_client_of_another_user_is_told_whose_session_it_is(broker_factory: Any, session_name: str) -> None:
    broker_factory()
    with h.child(_client_as_nobody, session_name) as (_p, conn):
        out = h.result(conn, 30.0, "the client as nobody")
    assert (out["type"], out["reason"], out["owner_uid"]) == ("BrokerUnreachable", "other_user", os.geteuid()), out
    assert "root (uid 0)" in out["message"] and "turnstile gateway" in out["message"]
    assert "Start one with" not in out["message"]
