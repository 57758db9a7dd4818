"""Another local user against a LIVE session: refused everywhere, and unable to plant names for it.

`test_ipc_security.py` checks the IPC objects one by one; here a real broker
serves a real client while a process running as ``nobody`` tries to reach
them, with raw system calls and with the ``turnstile`` command itself, and
``turnstile serve`` meets names squatted by ``nobody`` and queue limits.

Dropping to another uid needs root: without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import posix_ipc
import pytest

from broker.exits import RET_IPC
from ipc import names, shm
from tests import ipc_helpers as h
from tests.support import home_of, rec, running, session_objects, sim_stats, wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not h.is_root(), reason="dropping a child process to another uid (nobody) needs root"),
]


def squat_child(conn: Any, session: str, what: str) -> str:
    """As ``nobody``, create one of the session's names with mode 0666 (umask 0); return it."""
    h.drop_to(*h.nobody())
    os.umask(0)
    if what == "request_queue":
        name = names.request_queue(session)
        posix_ipc.MessageQueue(name, posix_ipc.O_CREX, mode=0o666, max_messages=1, max_message_size=64).close()
    else:
        name = names.state_block(session)
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o666, size=4096).close_fd()
    return name


@pytest.fixture
def scrub(session_name: str) -> Iterator[None]:
    """Remove the session's names whoever owns them (a squatter's too), even when the test fails."""
    yield
    shm.unlink(names.state_block(session_name))
    try:
        posix_ipc.unlink_message_queue(names.request_queue(session_name))
    except posix_ipc.ExistentialError:
        pass


def cli_as_nobody_child(conn: Any, argvs: list[list[str]]) -> list[tuple[int, str]]:
    """Run ``turnstile`` commands in-process as ``nobody``: (exit code, output) of each.

    In-process because the interpreter itself may live where ``nobody`` cannot
    read (a home directory of mode 0700): everything the commands import is
    imported before the uid drop.
    """
    import importlib

    from click.testing import CliRunner

    from broker import cli

    # Imported while still root (see above): `turnstile prompt` and `cancel` load these lazily.
    for module in ("clients.client", "clients.core", "ipc.state", "ipc.reach"):
        importlib.import_module(module)

    h.drop_to(*h.nobody())
    out = []
    for argv in argvs:
        r = CliRunner().invoke(cli.main, argv)
        out.append((r.exit_code, r.output))
    return out


def turnstile(*args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli", *args]


# ---------------------------------------------------------------- reaching into a live session


def test_nobody_cannot_open_send_read_or_cancel_in_a_live_session(broker_factory, session_name, tmp_path):
    from clients import Client

    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",))
    with Client(session_name, "worker") as c:
        turn = c.prompt("[sim:turn_ms=1500] OWNER-turn")
        next(iter(turn.events(timeout_s=10)))
        wait_until(running(b, "worker"), what="the owner's turn running")
        before = rec(b)
        # Raw system calls on every object: request queue, state block, the client's mailbox and doorbell.
        with h.child(h.as_nobody_child, session_name, c.client_id, "intrude") as (_p, conn):
            got = h.result(conn, 30.0, "the child as nobody")
        assert len(got) == 8
        assert [what for what, outcome in got.items() if outcome == "OK"] == [], got
        for what in ("open_request_queue", "open_state_block", "open_mailbox_writer"):
            assert got[what].startswith("NameSquatted"), got[what]
        # The command line, as nobody: no status, no cancel of the running turn, no prompt.
        argvs = [
            ["status", "--session", session_name, "--json"],
            ["cancel", "--session", session_name, "--holder"],
            ["prompt", "--session", session_name, "--connect-timeout-s", "1", "INTRUDER-prompt"],
        ]
        with h.child(cli_as_nobody_child, argvs) as (_p, conn):
            outcomes = h.result(conn, 60.0, "the command line as nobody")
        for argv, (code, output) in zip(argvs, outcomes, strict=True):
            print(argv[0], code, output.strip().splitlines()[-1:])
            assert code == 5, (argv, code, output)
            assert "INTRUDER" not in output
        status_json = next(ln for ln in outcomes[0][1].splitlines() if ln.startswith("{"))
        assert json.loads(status_json)["broker_alive"] is False
        # Each says whose session it is, not "start one" (starting one would fail: the names are taken).
        for _code, output in outcomes[::2]:
            assert "belongs to user root (uid 0)" in output and "Start one" not in output, output
        res = turn.result(timeout_s=20)
        assert res.ok and "OWNER-turn" in res.text, "the owner's turn was disturbed"
        assert c.prompt("OWNER-after").result(timeout_s=10).ok
    after = rec(b)
    assert after.counters["rejected_frames"] == before.counters["rejected_frames"]
    assert after.counters["cancels"] == after.counters["stale_cancels"] == 0
    assert after.counters["requests"] == 2
    assert sim_stats(st)["user_messages"] == 2
    assert not any("INTRUDER" in p.read_text() for p in (home_of(b) / ".sim-claude").glob("*.jsonl"))


# ---------------------------------------------------------------- squatted names


@pytest.mark.parametrize("what", ["request_queue", "state_block"])
def test_serve_refuses_a_name_squatted_by_another_user(session_name, tmp_path, scrub, what):
    with h.child(squat_child, session_name, what) as (_p, conn):
        name = h.result(conn, 30.0, "the squatter")
    cp = subprocess.run(
        turnstile("serve", "--session", session_name, "--agent", "sim", "--state-dir", str(tmp_path / "state"),
                  "--log-format", "json"),
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
    )
    print(cp.stderr.strip().splitlines()[-1])
    assert cp.returncode == RET_IPC, (cp.returncode, cp.stderr[-2000:])
    assert name in cp.stderr and f"owned by uid {h.nobody()[0]}" in cp.stderr
    assert "Traceback" not in cp.stderr
    # The squatter's name is left as it was (not used, not taken over), and nothing of ours is left.
    if what == "state_block":
        st = os.stat(h.shm_path(name))
    else:
        # fstat on the queue descriptor: works whether or not the mqueue file system is mounted.
        mq = posix_ipc.MessageQueue(name)
        try:
            st = os.fstat(mq.mqd)
        finally:
            mq.close()
    assert (st.st_uid, st.st_mode & 0o777) == (h.nobody()[0], 0o666)
    ours = [n for n in session_objects(session_name) if n != name.lstrip("/")]
    assert ours == [], "serve left objects of its own behind"
    if what == "state_block":
        with pytest.raises(posix_ipc.ExistentialError):  # serve removed the request queue it had made
            posix_ipc.MessageQueue(names.request_queue(session_name))


# ---------------------------------------------------------------- queue limits


def _lower_msgqueue_limit(limit: int) -> None:  # pragma: no cover - runs in the child before exec
    resource.setrlimit(resource.RLIMIT_MSGQUEUE, (limit, resource.getrlimit(resource.RLIMIT_MSGQUEUE)[1]))


def test_serve_and_a_client_over_the_queue_limit_say_which_limit(broker_factory, session_name, tmp_path):
    """Queue creation refused by RLIMIT_MSGQUEUE: a clear error naming the limit, exit 11; nothing left."""
    cp = subprocess.run(
        turnstile("serve", "--session", session_name, "--agent", "sim", "--state-dir", str(tmp_path / "state"),
                  "--log-format", "json"),
        capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
        preexec_fn=lambda: _lower_msgqueue_limit(1024),
    )
    last = cp.stderr.strip().splitlines()[-1]
    print(last)
    assert cp.returncode == RET_IPC, (cp.returncode, cp.stderr[-2000:])
    assert "RLIMIT_MSGQUEUE=1024" in last and "queues_max=" in last and "ulimit -q" in last
    assert session_objects(session_name) == []
    # A client whose doorbell queue cannot be created: the same kind of message, no traceback.
    b = broker_factory()
    cp = subprocess.run(
        turnstile("prompt", "--session", session_name, "HELLO"), capture_output=True, text=True, timeout=60,
        preexec_fn=lambda: _lower_msgqueue_limit(0),
    )
    print(cp.stderr.strip())
    assert cp.returncode == RET_IPC and "RLIMIT_MSGQUEUE=0" in cp.stderr and "doorbell" in cp.stderr
    assert "Traceback" not in cp.stderr
    assert [n for n in session_objects(session_name) if ".mb." in n or ".db." in n] == [], "a half-made mailbox left"
    assert rec(b).counters["requests"] == 0
