"""The fleet registry against a real nats-server: claims and heartbeats by compare-and-set."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import nats
import pytest

from broker.fleet.registry import GatewayConflict, Registry, open_bucket
from clients import fleet_wire as wire

pytestmark = [pytest.mark.timeout(60)]


def _reg(session: str, gateway: str) -> wire.Registration:
    return wire.Registration(session=session, gateway=gateway, host=socket.gethostname(), pid=os.getpid(),
                             heartbeat_unix=time.time(), stale_after_s=30.0)


def test_a_heartbeat_whose_reply_was_lost_does_not_end_the_gateway(nats_factory, session_name):
    """In a failover a heartbeat can be stored while its reply is lost; the next one must not see a rival."""
    n = nats_factory()

    async def scenario() -> None:
        nc = await nats.connect(n.url)
        try:
            kv = await open_bucket(nc.jetstream(), create=True)
            assert kv is not None
            mine = Registry(kv, "gw-mine")
            await mine.claim(_reg(session_name, "gw-mine"))
            # The stored-but-unanswered heartbeat: our own entry, one revision on, that
            # the registry never heard back about.
            await kv.put(session_name, wire.encode_registration(_reg(session_name, "gw-mine")))
            await mine.heartbeat(_reg(session_name, "gw-mine"))
            # A real rival still ends it.
            await kv.put(session_name, wire.encode_registration(_reg(session_name, "gw-rival")))
            with pytest.raises(GatewayConflict):
                await mine.heartbeat(_reg(session_name, "gw-mine"))
        finally:
            await nc.close()

    asyncio.run(scenario())
