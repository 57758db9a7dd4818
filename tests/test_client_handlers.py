"""Answering the agent's requests: what a handler's return value turns into (pure), and ``on_hook`` end to end
through a real broker, the sim and a client process."""

from __future__ import annotations

import asyncio
import pickle
from typing import Any

import pytest

from clients import HandlerError, TurnResult, TurnstileError, handlers
from tests.support import ClientProc


def test_a_good_permission_answer_goes_through_unchanged():
    ans = handlers.check("can_use_tool", {"behavior": "allow", "updatedInput": {"a": 1}})
    assert ans == handlers.Answer(response={"behavior": "allow", "updatedInput": {"a": 1}})


def test_unusable_permission_answers_become_a_deny_that_names_the_handler():
    for value, why in [
        (["allow"], "not a dict"),
        ({"behavior": "allow", "updatedInput": {"x": object()}}, "cannot be encoded"),
        ({"behavior": "maybe"}, "not 'allow' or 'deny'"),
    ]:
        ans = handlers.check("can_use_tool", value)
        assert ans.response is not None and ans.response["behavior"] == "deny", value
        assert ans.response["message"].startswith("turnstile: the on_permission handler failed: ")
        assert ans.failure is not None and why in ans.failure.reason and ans.error is None


def test_a_failing_hook_handler_answers_an_error_not_a_response():
    def boom(req: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("x")

    ans = handlers.call(boom, "hook_callback", {})
    assert isinstance(ans, handlers.Answer)
    assert ans.response is None and ans.error is not None and "on_hook" in ans.error
    assert ans.failure is not None and ans.failure.handler == "on_hook" and "KeyError" in ans.failure.reason


def test_an_async_handler_is_awaited_and_checked():
    async def allow(req: dict[str, Any]) -> dict[str, Any]:
        return {"behavior": "allow"}

    pending = handlers.call(allow, "can_use_tool", {})
    assert not isinstance(pending, handlers.Answer)
    ans = asyncio.run(handlers.settle(pending, "can_use_tool"))
    assert ans.response == {"behavior": "allow"} and ans.failure is None


def test_an_async_handler_the_blocking_client_cannot_run_is_closed_and_denied():
    async def allow(req: dict[str, Any]) -> dict[str, Any]:
        return {"behavior": "allow"}

    pending = handlers.call(allow, "can_use_tool", {})
    ans = handlers.not_awaited(pending, "can_use_tool")
    assert ans.response is not None and ans.response["behavior"] == "deny" and "AsyncClient" in ans.response["message"]
    assert pending.cr_frame is None  # type: ignore[attr-defined]  # closed: no "never awaited" warning


def test_a_long_reason_is_cut_to_fit_the_frame():
    ans = handlers.failed("can_use_tool", "x" * 10_000)
    assert ans.response is not None and len(ans.response["message"]) < 1200


def test_handler_error_carries_the_result_and_survives_pickling():
    failure = handlers.failed("can_use_tool", "it raised RuntimeError: bug").failure
    assert failure is not None
    res = TurnResult(status="ok", text="done", turn=3)
    err = handlers.error_for([failure, failure], res)
    assert isinstance(err, HandlerError) and isinstance(err, TurnstileError)
    assert "and 1 more" in str(err) and err.code == "handler_error"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is HandlerError and back.result == res and back.failures == [failure, failure]
    assert back.subtype == "can_use_tool" and back.handler == "on_permission"



# ------------------------------------------------- on_hook with a real broker and the sim


def hooks_seen(w: ClientProc) -> list[dict[str, Any]]:
    """The ``hook_callback`` requests the client process's ``on_hook`` was called with."""
    return [o["request"] for o in w.lines if o.get("ev") == "hook"]


@pytest.mark.parametrize(
    ("hook", "expect"),
    [
        ("continue", " [hook: continue] [hook: continue]"),
        ("block", " [hook: blocked: no-hook-from-test]"),  # at PreToolUse: no tool, so no PostToolUse
        (None, " [hook: continue] [hook: continue]"),  # no handler: the broker's default answer, {}
        ("raise", " [hook: failed: turnstile: the on_hook handler failed: it raised RuntimeError: hook-bug-from-test]"
                  " [hook: failed: turnstile: the on_hook handler failed: it raised RuntimeError: hook-bug-from-test]"),
    ],
)
def test_sim_hook_directive_calls_the_holders_on_hook(broker_factory, client, hook, expect):
    """``[sim:hook]`` makes the sim send ``hook_callback`` for the events the broker registers by default
    (PreToolUse, then PostToolUse); the holder's answers show in the reply."""
    broker_factory()
    w = client("webhook", "[sim:hook] guarded tool", hook=hook)
    res = w.ev("result")
    assert res["status"] == "ok", res
    assert res["text"].endswith(expect), res["text"]
    assert w.finish() == 0
    if hook is None:
        assert hooks_seen(w) == []
    else:
        seen = hooks_seen(w)
        assert [r["callback_id"] for r in seen] == (
            ["turnstile:PreToolUse"] if hook == "block" else ["turnstile:PreToolUse", "turnstile:PostToolUse"])
        req = seen[0]
        assert req["subtype"] == "hook_callback", req
        hook_input = req["input"]
        assert hook_input["hook_event_name"] == "PreToolUse" and hook_input["tool_name"] == "Bash", hook_input
        assert hook_input["tool_input"]["command"] == "echo sim" and hook_input["tool_use_id"] == req["tool_use_id"]
        assert hook_input["session_id"] == res["session_id"]
    # A failing handler is reported as documented: a handler_error event, and result() raises HandlerError.
    failed = [e for e in w.events() if e.get("type") == "turnstile" and e.get("subtype") == "handler_error"]
    assert bool(failed) == (hook == "raise"), w.events()
    assert ("on_hook" in res.get("handler_error", "")) == (hook == "raise"), res


def test_sim_hook_directive_for_post_tool_use_and_an_unregistered_event(broker_factory, client):
    """``[sim:hook=PostToolUse]`` fires after the tool, with its output; an event the broker did not register
    is said in the reply rather than answered with an invented callback id."""
    broker_factory(extra_args=("--hook-events=PostToolUse",))
    w = client("webhook", "[sim:hook=PostToolUse] after", "[sim:hook=PreToolUse] before", hook="block")
    assert w.finish() == 0
    post, pre = w.results()
    assert post["text"].endswith(" [hook: blocked: no-hook-from-test]"), post
    assert pre["text"].endswith(" [hook: PreToolUse not registered]"), pre
    [req] = hooks_seen(w)
    assert req["callback_id"] == "turnstile:PostToolUse" and req["input"]["hook_event_name"] == "PostToolUse"
    assert req["input"]["tool_response"]["stdout"] == "sim tool output", req
