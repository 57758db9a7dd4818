"""The gateway skips the results lookup only where no result can exist (``SessionRelay.may_be_stored``).

A request another gateway already answered (its result stored, its message not
acknowledged) reaches the next gateway through fresh consumers, as a first
delivery, carrying a fresh id: it must still be looked up and not run again.
A real nats-server, broker (sim agent) and gateways per test.
"""

from __future__ import annotations

import asyncio

import nats
import pytest

from broker.fleet.relay import result_dict
from clients import Client
from clients import fleet_wire as wire
from clients.core import TurnResult
from tests.support import rec, wait_until

pytestmark = [pytest.mark.timeout(60)]


def test_a_fresh_request_answered_by_an_earlier_gateway_is_not_run_again(
    nats_factory, broker_factory, gateway_factory, session_name
):
    n = nats_factory()
    b = broker_factory()
    first = gateway_factory(n.url)  # makes the stream and the results bucket
    first.stop()
    req = "answered-1"

    async def as_if_answered_and_not_acknowledged() -> None:
        nc = await nats.connect(n.url)
        js = nc.jetstream()
        request = wire.RemoteRequest(op="prompt", client="0" * 16, req=req, kind="webhook", content="never run",
                                     fresh=True)
        await js.publish(wire.request_subject(session_name, "webhook"), wire.encode(request),
                         headers={"Nats-Msg-Id": req})
        kv = await js.key_value(wire.results_bucket(session_name))
        await kv.create(wire.escape(req), wire.encode(result_dict(TurnResult(status="ok", text="stored before",
                                                                             request_id=req))))
        await nc.close()

    async def left_in_stream() -> int:
        nc = await nats.connect(n.url)
        info = await nc.jetstream().stream_info(wire.stream_name(session_name))
        await nc.close()
        return int(info.state.messages)

    asyncio.run(as_if_answered_and_not_acknowledged())
    gateway_factory(n.url)
    wait_until(lambda: asyncio.run(left_in_stream()) == 0, what="the answered request to be acknowledged")
    with Client(session_name, "webhook", nats=n.url) as c:
        assert c.prompt("a new one").result(timeout_s=20).ok
        again = c.prompt("never run", request_id=req).result(timeout_s=20)
    assert again.text == "stored before"
    assert rec(b).counters["requests"] == 1, "only the new request reached the broker"
