"""A remote lease ends promptly when its client dies, not only by the broker's idle timeout.

The remote client beats while it holds a lease; the gateway ends the lease
after ``MISSED_BEATS`` beats did not come. A real nats-server, broker (sim
agent), gateway and remote client process per test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.fleet import relay
from clients import remote
from tests.support import ClientProc, rec, wait_until

pytestmark = [pytest.mark.timeout(60)]

FLEET_CLIENT = str(Path(__file__).with_name("fleet_client.py"))
TURNSTILE = [sys.executable, "-m", "broker.cli"]
#: Far beyond the test: if the lease ended, it was not by the broker's idle timeout.
IDLE_TIMEOUT_S = 300.0
#: How long a dead holder's lease may outlive it: the missed beats, one check, and a loaded machine.
BOUND_S = remote.LEASE_BEAT_S * relay.MISSED_BEATS + 4.0


@pytest.fixture
def procs() -> Iterator[list[ClientProc]]:
    """Processes a test started; killed and reaped at teardown, even when it fails."""
    started: list[ClientProc] = []
    yield started
    for c in started:
        c.close()


def _start(procs: list[ClientProc], argv: list[str]) -> ClientProc:
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    c = ClientProc(p)
    procs.append(c)
    return c


@pytest.mark.parametrize("waiter", ["local", "remote"])
def test_a_sigkilled_remote_lease_holder_frees_the_session_within_the_bound(
    nats_factory, broker_factory, gateway_factory, session_name, procs, waiter
):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    spec = {"url": n.url, "session": session_name, "kind": "worker", "prompts": [],
            "hold_lease": {"idle_timeout_s": IDLE_TIMEOUT_S}}
    holder = _start(procs, [sys.executable, FLEET_CLIENT, json.dumps(spec)])
    holder.ev("leased", 30)
    wait_until(lambda: rec(b).lease_client != "", what="the broker to record the remote lease")
    nats_args = ["--nats", n.url] if waiter == "remote" else []
    worker = _start(procs, [*TURNSTILE, "prompt", *nats_args, "--session", session_name, "--kind", "worker",
                            "--json", "after the lease"])
    wait_until(lambda: rec(b).workers_queued == 1, what="the worker queued behind the lease")
    # A live holder keeps its lease past the time its beats would be missed in.
    held_since = time.monotonic()
    wait_until(lambda: time.monotonic() - held_since > 1.5 * remote.LEASE_BEAT_S * relay.MISSED_BEATS,
               timeout_s=30, what="one and a half beat timeouts to pass")
    assert rec(b).lease_client != "" and rec(b).workers_queued == 1, "a live holder's lease ended"
    holder.proc.kill()
    killed_at = time.monotonic()
    res = worker.wait_for(lambda o: o.get("event") == "result", BOUND_S + 20)
    outlived_s = time.monotonic() - killed_at
    print(f"the {waiter} worker got the session {outlived_s:.2f} s after the lease holder was killed")
    assert outlived_s < BOUND_S, f"the lease outlived its holder by {outlived_s:.1f} s"
    assert res["status"] == "ok" and res["text"] == "sim: after the lease"
    assert worker.finish() == 0, worker.stderr
