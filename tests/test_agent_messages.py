"""Agent stdout lines decoded into typed messages (a pure part: unit tests)."""

from __future__ import annotations

import json

import pytest

from broker import agent_messages as am


def line(**obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_result_keeps_the_raw_line_and_lifts_the_routing_fields():
    raw = line(subtype="success", is_error=False, result="hi", session_id="s-1", type="result",
               user_message_uuids=["u-1", 7, "u-2"], terminal_reason="completed")
    msg = am.decode(raw)
    assert msg == am.Result(raw=raw, uuids=("u-1", "u-2"), session_id="s-1", is_error=False, subtype="success",
                            terminal_reason="completed", text="hi")


def test_result_without_uuids_is_told_apart_from_an_empty_list():
    bare, empty = am.decode(line(type="result")), am.decode(line(type="result", user_message_uuids=[]))
    assert isinstance(bare, am.Result) and bare.uuids is None  # route to the one turn in flight
    assert isinstance(empty, am.Result) and empty.uuids == ()  # names no turn: unrouted
    odd = am.decode(line(type="result", result=3, terminal_reason=4, session_id=5))
    assert isinstance(odd, am.Result) and odd.text == "" and odd.terminal_reason is None and odd.session_id is None


def test_system_init_and_other_system_lines():
    init = am.decode(line(type="system", subtype="init", session_id="s-2"))
    assert init == am.Init(raw=init.raw, session_id="s-2", is_replay=False)
    status = am.decode(line(type="system", subtype="status", isReplay=True))
    assert isinstance(status, am.System) and status.subtype == "status" and status.is_replay


def test_control_lines():
    resp = am.decode(line(type="control_response", response={"subtype": "success", "request_id": "r-1",
                                                             "response": {"model": "m"}}))
    assert isinstance(resp, am.ControlResponse)
    assert resp.reply.request_id == "r-1" and resp.reply.ok and resp.reply.response == {"model": "m"}
    req = am.decode(line(type="control_request", request_id="r-2", request={"subtype": "can_use_tool", "x": 1}))
    assert req == am.ControlRequest(req.raw, "r-2", "can_use_tool", {"subtype": "can_use_tool", "x": 1})
    for bad in (line(type="control_request", request_id=3, request={}), line(type="control_request", request_id="r")):
        assert am.decode(bad) == am.BadControlRequest(bad)
    cancel = am.decode(line(type="control_cancel_request", request_id="r-2"))
    assert cancel == am.ControlCancelRequest(cancel.raw, "r-2")


def test_lifecycle_and_anything_else():
    lc = am.decode(line(type="command_lifecycle", command_uuid="u-1", subtype="completed"))
    assert lc == am.CommandLifecycle(lc.raw, "u-1", "completed", False)
    other = am.decode(line(type="assistant", message={}))
    assert other == am.Other(other.raw, "assistant", None, False)
    untyped = am.decode(line(hello=1))
    assert isinstance(untyped, am.Other) and untyped.type is None


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b'"a string"'])
def test_a_line_that_is_not_one_object_is_a_bad_line(raw):
    with pytest.raises(am.BadLine):
        am.decode(raw)
