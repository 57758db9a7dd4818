"""A remote client's failing ``on_permission``/``on_hook`` handler: the agent is denied and ``result()``
raises :class:`HandlerError`, as on a local client (tests/test_client_sharing.py has the local cases).

A real nats-server, broker (sim agent) and gateway per test; the remote client runs in the test process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from clients import AsyncClient, Client, HandlerError, TurnstileError
from tests.support import rec

pytestmark = [pytest.mark.timeout(60)]


def _raises(req: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("handler bug")


def test_failing_remote_permission_handler_raises_handler_error(
    nats_factory, broker_factory, gateway_factory, session_name
):
    n = nats_factory()
    b = broker_factory()
    gateway_factory(n.url)
    with Client(session_name, "webhook", nats=n.url, on_permission=_raises) as c:
        t = c.prompt("[sim:permission] may I")
        events = list(t.events(timeout_s=20))
        with pytest.raises(HandlerError) as info:
            t.result(timeout_s=20)
        after = c.prompt("next").result(timeout_s=20)  # the session goes on
    err = info.value
    assert isinstance(err, TurnstileError) and err.subtype == "can_use_tool" and err.handler == "on_permission"
    assert "handler bug" in err.reason and "handler bug" in str(err)
    assert err.result.ok and "[permission: denied (turnstile: the on_permission handler failed" in err.result.text
    assert [e["handler"] for e in events if e.get("subtype") == "handler_error"] == ["on_permission"]
    assert after.ok
    assert rec(b).counters["results_ok"] == 2


def test_failing_remote_async_handler_raises_handler_error_and_a_good_one_does_not(
    nats_factory, broker_factory, gateway_factory, session_name
):
    n = nats_factory()
    broker_factory()
    gateway_factory(n.url)

    async def bad_answer(req: dict[str, Any]) -> dict[str, Any]:
        return {"behavior": "maybe"}

    async def main() -> tuple[HandlerError, str]:
        async with AsyncClient(session_name, "webhook", nats=n.url, on_permission=bad_answer) as c:
            with pytest.raises(HandlerError) as info:
                await c.prompt("[sim:permission] may I").result(timeout_s=20)
        allow = {"behavior": "allow"}
        async with AsyncClient(session_name, "webhook", nats=n.url, on_permission=lambda req: allow) as ok:
            res = await ok.prompt("[sim:permission] may I").result(timeout_s=20)
        return info.value, res.text

    err, text = asyncio.run(main())
    assert "'maybe'" in err.reason and err.result.ok
    assert text.endswith("[permission: allowed]"), text
