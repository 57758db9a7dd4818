"""Agent stdout lines decoded into typed messages, so the router dispatches with ``match``.

Only the fields the broker acts on are lifted out of the JSON object; every
message keeps its ``raw`` line, because what reaches a client is that line,
verbatim, never a re-encoding. Shapes follow the CLI as observed: ``type`` is
not always the first key, a ``result`` names the user messages it answers in
``user_message_uuids``, and a control response nests its ``request_id`` under
``response`` (see :func:`broker.protocol.control_response`). The messages are
frozen ``msgspec.Struct`` objects: built for every line the agent prints, they must
cost next to nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec

from broker import protocol

BadLine = protocol.BadLine


class Result(msgspec.Struct, frozen=True):
    """The end of a turn. ``uuids`` is None when the CLI listed none (an older CLI)."""

    raw: bytes
    uuids: tuple[str, ...] | None
    session_id: str | None
    is_error: bool
    subtype: str
    terminal_reason: str | None
    text: str


class System(msgspec.Struct, frozen=True):
    """A ``system`` line other than ``init`` (status frames, compaction notes, ...)."""

    raw: bytes
    subtype: Any
    session_id: str | None
    is_replay: bool


class Init(msgspec.Struct, frozen=True):
    """``system/init``: printed at the start of every turn the agent begins."""

    raw: bytes
    session_id: str | None
    is_replay: bool
    model: str | None = None  # the model the turn runs on


class ControlResponse(msgspec.Struct, frozen=True):
    """The agent's answer to a control request of ours, matched by its nested id."""

    raw: bytes
    reply: protocol.ControlResponse


class ControlRequest(msgspec.Struct, frozen=True):
    """A control request of the agent's own (``can_use_tool``, ``hook_callback``, ...)."""

    raw: bytes
    request_id: str
    subtype: str
    request: dict[str, Any]


class BadControlRequest(msgspec.Struct, frozen=True):
    """A ``control_request`` line without a string id or a request object: nothing can answer it."""

    raw: bytes


class ControlCancelRequest(msgspec.Struct, frozen=True):
    """The agent withdrew one of its control requests."""

    raw: bytes
    request_id: str | None


class CommandLifecycle(msgspec.Struct, frozen=True):
    """A ``command_lifecycle`` line; ``command_uuid`` names the user message it is about."""

    raw: bytes
    command_uuid: Any
    subtype: Any
    is_replay: bool


class Other(msgspec.Struct, frozen=True):
    """Any other line (assistant, user echo, stream events, ...): delivered as it is."""

    raw: bytes
    type: Any
    subtype: Any
    is_replay: bool


Message = (
    Result | Init | System | ControlResponse | ControlRequest | BadControlRequest | ControlCancelRequest
    | CommandLifecycle | Other
)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def decode(line: bytes) -> Message:
    """One stdout line as a typed message, or :class:`BadLine` if it is not one JSON object."""
    obj = protocol.parse(line)
    replay = bool(obj.get("isReplay"))
    match obj.get("type"):
        case "result":
            uuids = obj.get("user_message_uuids")
            text = obj.get("result")
            return Result(
                raw=line,
                uuids=tuple(u for u in uuids if isinstance(u, str)) if isinstance(uuids, list) else None,
                session_id=_str_or_none(obj.get("session_id")),
                is_error=bool(obj.get("is_error")),
                subtype=str(obj.get("subtype", "")),
                terminal_reason=_str_or_none(obj.get("terminal_reason")),
                text=text if isinstance(text, str) else "",
            )
        case "system" if obj.get("subtype") == "init":
            return Init(line, _str_or_none(obj.get("session_id")), replay, _str_or_none(obj.get("model")))
        case "system":
            return System(line, obj.get("subtype"), _str_or_none(obj.get("session_id")), replay)
        case "control_response":
            return ControlResponse(line, protocol.control_response(obj))
        case "control_request":
            rid, req = obj.get("request_id"), obj.get("request")
            if not isinstance(rid, str) or not isinstance(req, dict):
                return BadControlRequest(line)
            return ControlRequest(line, rid, str(req.get("subtype", "")), req)
        case "control_cancel_request":
            return ControlCancelRequest(line, _str_or_none(obj.get("request_id")))
        case "command_lifecycle":
            return CommandLifecycle(line, obj.get("command_uuid"), obj.get("subtype"), replay)
        case typ:
            return Other(line, typ, obj.get("subtype"), replay)
