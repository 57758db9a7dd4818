"""A first end-to-end slice: real broker process, sim agent, this process as the client."""

from __future__ import annotations

from clients import Client


def test_prompt_roundtrip(broker_factory, session_name):
    broker_factory()
    with Client(session_name, "webhook") as c:
        turn = c.prompt("hello")
        events = list(turn)
        res = turn.result()
    assert res.status == "ok"
    assert res.text == "sim: hello"
    types = [e["type"] for e in events]
    assert "system" in types and types[-1] == "result"
