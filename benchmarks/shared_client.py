"""Client-side overhead of overlapping requests: one shared ``AsyncClient`` against one client per request.

A web server shares one client across its concurrent handlers. Each round
sends ``concurrent`` requests at once through one shared ``AsyncClient``, then
the same number through as many clients (connected beforehand), one request
each; the order of the two alternates between rounds. A request's overhead is
the latency its caller saw minus the broker's own figures for it
(``TurnResult.queued_ms + turn_ms``): what the client library, its waiting and
the IPC hops add. Target: the shared client within 2 ms (p50) of one client
per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from benchmarks.harness import workspace
from benchmarks.stats import Results
from clients import AsyncClient

#: Answered at once by the stamped sim.
PROMPT = "ping"

KEY_SHARED = "shared.one_client"
KEY_PER_REQUEST = "shared.client_per_request"


def run(res: Results, rounds: int, warmup: int, concurrent: int, progress: Callable[[str], None]) -> None:
    """Measure both ways for ``warmup + rounds`` rounds of ``concurrent`` requests; record the last ``rounds``."""
    with workspace("shared") as ws:
        ws.start_broker(ws.path("stamps"))
        shared, per_request = asyncio.run(_measure(ws.session, rounds, warmup, concurrent, progress))
    note = "client-observed latency minus the broker's queued_ms + turn_ms"
    res.add_latency(KEY_SHARED, f"{concurrent} concurrent requests on ONE shared AsyncClient: client overhead",
                    shared, floor=None, note=note)
    res.add_latency(KEY_PER_REQUEST, f"{concurrent} concurrent requests, one AsyncClient each: client overhead",
                    per_request, floor=None, note=note)


async def _measure(session: str, rounds: int, warmup: int, n: int,
                   progress: Callable[[str], None]) -> tuple[list[int], list[int]]:
    shared_ns: list[int] = []
    per_request_ns: list[int] = []
    async with AsyncClient(session, "webhook") as shared:
        own = [await AsyncClient(session, "webhook").connect() for _ in range(n)]
        try:
            for r in range(warmup + rounds):
                ways = [(shared_ns, [shared] * n), (per_request_ns, own)]
                if r % 2:
                    ways.reverse()
                for out, clients in ways:
                    got = await asyncio.gather(*(_one(c) for c in clients))
                    if r >= warmup:
                        out += got
                if (r + 1) % 10 == 0:
                    progress(f"shared client: round {r + 1}/{warmup + rounds}")
        finally:
            for c in own:
                await c.close()
    return shared_ns, per_request_ns


async def _one(c: AsyncClient) -> int:
    t0 = time.perf_counter_ns()
    res = await c.prompt(PROMPT).result(timeout_s=60)
    elapsed = time.perf_counter_ns() - t0
    if not res.ok:
        raise RuntimeError(f"shared-client request: {res.status} {res.error_code} {res.error}")
    return elapsed - int((res.queued_ms + res.turn_ms) * 1e6)
