"""The agent's stream-json wire protocol: lines we write, lines we read.

Every line written to the agent is built here from validated values and
re-serialised by one encoder, as exactly one JSON object and one newline: a
malformed line kills the CLI and loses its turn.

Control responses carry their ``request_id`` **nested** under ``response``
(``{"type":"control_response","response":{"request_id":...}}``); matching on a
top-level ``request_id`` never matches, which once hung every model switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from ipc import frames
from ipc.errors import AgentError

_json = msgspec.json.Encoder()
_decode = msgspec.json.Decoder()


class BadLine(AgentError):
    """An agent stdout line that is not one JSON object (logged and dropped by the broker)."""

    code = "bad_line"


def encode(obj: dict[str, Any]) -> bytes:
    """One JSON object as compact bytes (no newline), by the one encoder of this module."""
    return _json.encode(obj)


def _line(obj: dict[str, Any]) -> bytes:
    # msgspec escapes control characters, so the output can never contain a raw newline.
    return _json.encode(obj) + b"\n"


def user_message(content: str | list[dict[str, Any]], uuid: str) -> bytes:
    """A user message stamped with ``uuid`` (a result lists the uuids it answers)."""
    frames.check_content(content)
    return _line({
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
        "session_id": "default",
        "uuid": uuid,
    })


def control_request(request_id: str, subtype: str, **fields: Any) -> bytes:
    """A control request (``interrupt``, ``set_model``, ``initialize``, ...)."""
    return _line({"type": "control_request", "request_id": request_id, "request": {"subtype": subtype, **fields}})


def control_success(request_id: str, response: dict[str, Any] | None) -> bytes:
    """Our answer to a control request the agent sent us."""
    body: dict[str, Any] = {"subtype": "success", "request_id": request_id}
    if response is not None:
        body["response"] = response
    return _line({"type": "control_response", "response": body})


def control_error(request_id: str, error: str) -> bytes:
    """An error answer to a control request the agent sent us."""
    body = {"subtype": "error", "request_id": request_id, "error": error}
    return _line({"type": "control_response", "response": body})


def parse(line: bytes) -> dict[str, Any]:
    """One stdout line as a dict, or :class:`BadLine`."""
    try:
        obj = _decode.decode(line)
    except msgspec.DecodeError as exc:
        raise BadLine(str(exc), reason="malformed") from None
    if not isinstance(obj, dict):
        raise BadLine(f"a JSON {type(obj).__name__}, not an object", reason="not_an_object")
    return obj


@dataclass(frozen=True)
class ControlResponse:
    """A control response, with the id taken from where the CLI really puts it."""

    request_id: str | None
    ok: bool
    response: dict[str, Any]
    error: str | None


def control_response(obj: dict[str, Any]) -> ControlResponse:
    """Read a ``control_response`` line: the request id is ``response.request_id``."""
    body = obj.get("response")
    if not isinstance(body, dict):
        return ControlResponse(None, False, {}, "control_response without a response object")
    rid = body.get("request_id")
    inner = body.get("response")
    return ControlResponse(
        request_id=rid if isinstance(rid, str) else None,
        ok=body.get("subtype") == "success",
        response=inner if isinstance(inner, dict) else {},
        error=None if body.get("subtype") == "success" else str(body.get("error") or "error"),
    )


def default_answer(
    subtype: str, request: dict[str, Any], permission: str = "deny"
) -> tuple[bool, dict[str, Any] | str]:
    """The answer to an agent control request nobody handles: (ok, response or error).

    ``permission`` is the serve-level policy for ``can_use_tool`` (``deny`` unless
    ``turnstile serve --default-permission allow``).
    """
    if subtype == "can_use_tool":
        if permission == "allow":
            tool_input = request.get("input")
            return True, {"behavior": "allow", "updatedInput": tool_input if isinstance(tool_input, dict) else {}}
        return True, {
            "behavior": "deny",
            "message": "turnstile: the turn holder registered no permission handler",
        }
    if subtype == "hook_callback":
        return True, {}
    if subtype == "mcp_message":
        return False, "turnstile: no MCP server is served by this session's clients"
    return False, f"turnstile: unsupported control request {subtype!r}"


def validate_answer(subtype: str, response: dict[str, Any] | None) -> dict[str, Any]:
    """Check a client's answer to an agent control request before it reaches the agent."""
    if response is None:
        raise ValueError("an answer needs a response object")
    if subtype == "can_use_tool":
        behavior = response.get("behavior")
        if behavior == "allow":
            updated = response.get("updatedInput", {})
            if not isinstance(updated, dict):
                raise ValueError("updatedInput must be an object")
            return {"behavior": "allow", "updatedInput": updated}
        if behavior == "deny":
            return {"behavior": "deny", "message": str(response.get("message", "denied"))}
        raise ValueError("can_use_tool answer needs behavior 'allow' or 'deny'")
    # Round-trip through JSON so only JSON values reach the agent.
    out = _decode.decode(_json.encode(response))
    if not isinstance(out, dict):
        raise ValueError("the answer must be a JSON object")
    return out
