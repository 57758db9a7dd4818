"""An agent that cannot be started does not hang the session (issue 13, item 1).

Real broker, real agent processes: ``serve --agent claude --claude-bin WRAPPER``
where WRAPPER is a shell script that runs the simulated CLI. Each test breaks
the agent's start, kills the running agent, checks that the state block says
``unavailable`` and that a prompt ends with a typed ``agent_unavailable``
error within the bound (not at its timeout), then repairs the start and checks
that service resumes.
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from broker.agents import make_agent
from broker.testing.launcher import BrokerProcess
from clients import Client
from tests.support import rec, wait_until

#: How long requests may wait for an agent that cannot start (the serve option under test).
UNAVAILABLE_S = 2.0
#: How long a started agent has to print its first turn's system/init.
START_S = 2.0
#: Waits below stay well under the client's own timeouts: a hang fails the test, it does not pass it.
PROMPT_TIMEOUT_S = 20.0

pytestmark = pytest.mark.timeout(90)


def write_wrapper(path: Path, body: str) -> None:
    """An executable shell script at ``path`` running ``body``."""
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def sim_command() -> str:
    """The simulated CLI's command (what ``--agent sim`` runs), for a wrapper to exec."""
    argv = make_agent("sim").launch(session_id="0" * 32, resume=False, model=None).argv
    head = argv[: argv.index("-m") + 2] if "-m" in argv else argv[:1]
    return shlex.join(head)


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    """A ``--claude-bin`` wrapper script that starts the simulated CLI with the real CLI's argv."""
    path = tmp_path / "bin" / "claude-wrapper"
    path.parent.mkdir()
    write_wrapper(path, f'exec {sim_command()} "$@"')
    return path


def start_broker(broker_factory: Callable[..., BrokerProcess], wrapper: Path) -> BrokerProcess:
    return broker_factory(agent="claude", extra_args=(
        "--claude-bin", str(wrapper),
        "--agent-unavailable-timeout-s", str(UNAVAILABLE_S),
        "--agent-start-timeout-s", str(START_S),
    ))


def kill_agent(b: BrokerProcess) -> int:
    """SIGKILL the broker's agent; return its pid."""
    pid = rec(b).agent_pid
    assert pid
    os.kill(pid, signal.SIGKILL)
    return pid


def agent_state(b: BrokerProcess, want: str) -> Callable[[], bool]:
    return lambda: rec(b).agent_state == want


def assert_unavailable_then_resumes(b: BrokerProcess, c: Client, repair: Callable[[], None]) -> None:
    """While the agent cannot start, a prompt fails typed and fast; after ``repair``, service resumes."""
    wait_until(agent_state(b, "unavailable"), 15, "the state block to say the agent is unavailable")
    res = c.prompt("hello while broken").result(timeout_s=PROMPT_TIMEOUT_S)
    assert (res.status, res.error_code) == ("error", "agent_unavailable"), res
    assert res.error  # names the last start error
    repair()
    wait_until(agent_state(b, "up"), 20, "the agent to start again after the repair")
    res = c.prompt("hello again").result(timeout_s=PROMPT_TIMEOUT_S)
    assert res.status == "ok", res


def test_binary_moved_away_then_back(broker_factory: Callable[..., BrokerProcess], wrapper: Path) -> None:
    b = start_broker(broker_factory, wrapper)
    with Client(b.session, "webhook") as c:
        assert c.prompt("warm up").result(timeout_s=PROMPT_TIMEOUT_S).status == "ok"
        away = wrapper.with_name("claude-wrapper.off")
        wrapper.rename(away)  # a package upgrade removed the CLI binary
        kill_agent(b)
        assert_unavailable_then_resumes(b, c, lambda: away.rename(wrapper))
    log = b.log_path.read_text()
    assert "agent.spawn_failed" in log and "No such file" in log


def test_binary_not_executable_then_fixed(broker_factory: Callable[..., BrokerProcess], wrapper: Path) -> None:
    b = start_broker(broker_factory, wrapper)
    with Client(b.session, "worker") as c:
        mode = wrapper.stat().st_mode
        wrapper.chmod(mode & ~(stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        kill_agent(b)
        assert_unavailable_then_resumes(b, c, lambda: wrapper.chmod(mode))


def test_out_of_file_descriptors_then_freed(broker_factory: Callable[..., BrokerProcess], wrapper: Path) -> None:
    """EMFILE: the broker's RLIMIT_NOFILE lowered (prlimit) to what it holds, so the agent's pipes cannot be made."""
    b = start_broker(broker_factory, wrapper)
    with Client(b.session, "webhook") as c:
        assert c.prompt("warm up").result(timeout_s=PROMPT_TIMEOUT_S).status == "ok"
        old = resource.prlimit(b.pid, resource.RLIMIT_NOFILE)
        held = len(os.listdir(f"/proc/{b.pid}/fd"))
        # The dead agent's pipe ends (3) are freed; new pipes need 6 descriptors at once.
        resource.prlimit(b.pid, resource.RLIMIT_NOFILE, (held, old[1]))
        kill_agent(b)
        assert_unavailable_then_resumes(b, c, lambda: resource.prlimit(b.pid, resource.RLIMIT_NOFILE, old))
    assert "agent.spawn_failed" in b.log_path.read_text()


def test_agent_that_starts_and_never_answers(broker_factory: Callable[..., BrokerProcess], wrapper: Path) -> None:
    """A start that succeeds but prints nothing (a hung wrapper, a full disk): caught by the start deadline."""
    b = start_broker(broker_factory, wrapper)
    with Client(b.session, "webhook") as c:
        assert c.prompt("warm up").result(timeout_s=PROMPT_TIMEOUT_S).status == "ok"
        good = wrapper.read_text()
        write_wrapper(wrapper, "exec sleep 600")
        old = kill_agent(b)
        wait_until(lambda: rec(b).agent_pid not in (0, old) and rec(b).agent_state == "up", 20,
                   "the mute agent to be started")
        # The mute agent starts ("up"): the prompt goes to it, and it never answers.
        res = c.prompt("hello to a mute agent").result(timeout_s=PROMPT_TIMEOUT_S)
        assert (res.status, res.error_code) == ("error", "agent_unavailable"), res
        wrapper.write_text(good)
        wait_until(lambda: c.prompt("hello again").result(timeout_s=PROMPT_TIMEOUT_S).status == "ok", 30,
                   "service to resume once the agent answers again")
    assert "no output within" in b.log_path.read_text()
