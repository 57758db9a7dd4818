"""The fake CLI's wire format: what its stdout lines look like, and how they are written.

Each builder returns one line as a dict, with the keys in the order the real
CLI 2.1.330 writes them (see docs/claude-stream-json.md); :class:`Stdout`
writes it as one compact JSON line.  Only the standard library is imported.
"""

from __future__ import annotations

import json
import os
import re
import select
import time

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from typing import Any, NoReturn

    from broker.testing.fake_cli.script import Turn

SIM_VERSION = "2.1.330-sim"
"""Reported as ``claude_code_version``; the suffix tells logs it is not the real CLI."""

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"
"""The model reported when neither ``--model`` nor ``set_model`` chose one."""

MODEL_ALIASES = {
    "default": DEFAULT_MODEL,
    "sonnet": DEFAULT_MODEL,
    "opus": "claude-opus-4-1-20250805",
    "haiku": "claude-haiku-4-5-20251001",
}
"""Aliases the sim resolves, as the real CLI resolves its own."""

CAPABILITIES = ["interrupt_receipt_v1", "interrupt_cancel_queued_v1", "msg_lifecycle_v1"]
"""Advertised on ``system/init``."""

TOOLS = ["Task", "Bash", "Glob", "Grep", "Read", "Edit", "Write", "WebFetch", "TodoWrite"]
"""The ``tools`` list of ``system/init``."""

PERMISSION_MODES = {"default", "acceptEdits", "auto", "bypassPermissions", "plan", "dontAsk"}
"""Modes ``set_permission_mode`` and ``--permission-mode`` accept."""

NO_AUTO_MODE = re.compile(r"-4-5(?:-|$)")
"""Models the real CLI refuses "auto" permission mode for (the 4.5 generation:
claude-sonnet-4-5, claude-haiku-4-5, claude-opus-4-5, dated or not)."""

TOOL_REJECTED = (
    "The user doesn't want to proceed with this tool use. The tool use was rejected (eg. if it "
    "was a file edit, the new_string was NOT written to the file). STOP what you are doing and "
    "wait for the user to tell you how to proceed."
)
"""The ``tool_result`` the real CLI records for a tool an interrupt stopped
while it waited for permission."""

TOOL_STOPPED = (
    "Correction to the text above: this call was stopped while running, not refused before it "
    "ran. It may have run in part or in full, and its changes may have been written. No "
    "permission prompt was involved. Work it started elsewhere (a remote command, a background "
    "process) may still be running, so check before starting the same work again. The "
    "instruction to stop and wait still stands."
)
"""Appended to :data:`TOOL_REJECTED` when the tool was already running."""

ERROR_RESULTS = {
    "max_turns": ("error_max_turns", "max_turns", "Reached maximum number of turns (1)"),
    "budget": ("error_max_budget_usd", "budget_exhausted", "Reached maximum budget"),
}
"""``[sim:error=KIND]`` -> (result subtype, terminal reason, error message) of the real CLI's line."""


def new_uuid() -> str:
    """A random version-4 UUID string (``uuid`` is not imported: start-up cost)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def resolve_model(name: str | None, default: str = DEFAULT_MODEL) -> str:
    """Resolve an alias (``sonnet``, ``opus``, ``haiku``, ``default``) or ``None``.

    ``None`` and ``"default"`` give ``default``: the built-in default model,
    as in the real CLI, where ``set_model`` null ignores ``--model``.
    """
    if name is None or name == "default":
        return default
    return MODEL_ALIASES.get(name, name)


def timestamp() -> str:
    """The current UTC time as the CLI writes it (ISO 8601 with milliseconds)."""
    now = time.time()
    ms = int(now * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{ms:03d}Z"


def reject_constant(name: str) -> NoReturn:
    """``parse_constant`` for stdin lines: JSON.parse refuses NaN and Infinity, so must the fake."""
    raise ValueError(f"invalid JSON constant {name}")


class StdoutClosed(Exception):
    """The reader of stdout went away."""


class Stdout:
    """Writes whole lines to fd 1, unbuffered, waiting out a full pipe."""

    def write(self, data: bytes) -> None:
        """Write ``data`` entirely; raise :class:`StdoutClosed` if the reader is gone."""
        view = memoryview(data)
        while view:
            try:
                n = os.write(1, view)
            except BlockingIOError:
                select.select([], [1], [])
                continue
            except BrokenPipeError:
                raise StdoutClosed from None
            view = view[n:]

    @staticmethod
    def encode(obj: dict[str, Any]) -> bytes:
        """One compact JSON line, like ``JSON.stringify``."""
        try:
            data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from the input: escape it, as JSON.stringify does.
            data = json.dumps(obj, separators=(",", ":")).encode("ascii")
        return data + b"\n"


def control_success(request_id: Any, response: dict[str, Any] | None) -> dict[str, Any]:
    """A ``control_response`` line answering ``request_id``."""
    inner: dict[str, Any] = {"subtype": "success", "request_id": request_id}
    if response is not None:
        inner["response"] = response
    return {"type": "control_response", "response": inner}


def control_error(request_id: Any, error: str, code: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """A ``control_response`` line refusing ``request_id`` (``error_code`` when given)."""
    inner: dict[str, Any] = {"subtype": "error", "request_id": request_id, "error": error}
    if code is not None:
        inner["error_code"] = code
    inner.update(extra)
    return {"type": "control_response", "response": inner}


def lifecycle(session_id: str, command_uuid: str, state: str) -> dict[str, Any]:
    """A ``command_lifecycle`` line: ``queued``, ``started``, ``completed`` or ``cancelled``."""
    return {
        "type": "command_lifecycle",
        "command_uuid": command_uuid,
        "state": state,
        "uuid": new_uuid(),
        "session_id": session_id,
    }


def system_init(session_id: str, model: str, permission_mode: str) -> dict[str, Any]:
    """The ``system/init`` line that opens every turn."""
    return {
        "type": "system",
        "subtype": "init",
        "cwd": os.getcwd(),
        "session_id": session_id,
        "tools": TOOLS,
        "mcp_servers": [],
        "model": model,
        "permissionMode": permission_mode,
        "slash_commands": ["compact", "context", "model"],
        "apiKeySource": "none",
        "claude_code_version": SIM_VERSION,
        "output_style": "default",
        "agents": ["general-purpose"],
        "skills": [],
        "plugins": [],
        "capabilities": CAPABILITIES,
        "uuid": new_uuid(),
    }


def assistant(session_id: str, model: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    """An ``assistant`` line carrying ``content`` blocks."""
    return {
        "type": "assistant",
        "message": {
            "id": "msg_sim_" + new_uuid().replace("-", "")[:24],
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
        "parent_tool_use_id": None,
        "session_id": session_id,
        "uuid": new_uuid(),
    }


def user(session_id: str, content: Any, **extra: Any) -> dict[str, Any]:
    """A ``user`` line the CLI writes itself (tool results, the interrupt marker)."""
    return {
        "type": "user",
        "message": {"role": "user", "content": content},
        "parent_tool_use_id": None,
        "session_id": session_id,
        "uuid": new_uuid(),
        "timestamp": timestamp(),
        **extra,
    }


def can_use_tool(request_id: str, tool_name: str, tool_input: dict[str, Any], tool_id: str) -> dict[str, Any]:
    """The ``can_use_tool`` control request the CLI sends before running a tool."""
    request = {
        "subtype": "can_use_tool", "tool_name": tool_name, "input": tool_input,
        "permission_suggestions": [], "tool_use_id": tool_id,
    }
    return control_request(request_id, request)


def hook_callback(request_id: str, callback_id: str, hook_input: dict[str, Any], tool_id: str) -> dict[str, Any]:
    """The ``hook_callback`` control request the CLI sends for a hook registered at ``initialize``."""
    request = {"subtype": "hook_callback", "callback_id": callback_id, "input": hook_input, "tool_use_id": tool_id}
    return control_request(request_id, request)


def control_request(request_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """A control request of the CLI's own, which waits for the ``control_response`` with ``request_id``."""
    return {"type": "control_request", "request_id": request_id, "request": request}


def hook_input(
    event: str, session_id: str, transcript_path: str, prompt_id: str, permission_mode: str, tool_name: str,
    tool_input: dict[str, Any], tool_id: str, tool_response: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A tool hook's input, keys in the real CLI's order (``tool_response`` and ``duration_ms`` for PostToolUse)."""
    out: dict[str, Any] = {
        "session_id": session_id,
        "transcript_path": transcript_path,
        "cwd": os.getcwd(),
        "prompt_id": prompt_id,
        "permission_mode": permission_mode,
        "hook_event_name": event,
        "tool_name": tool_name,
        "tool_input": tool_input,
    }
    if tool_response is not None:
        out["tool_response"] = tool_response
    out["tool_use_id"] = tool_id
    if tool_response is not None:
        out["duration_ms"] = 0
    return out


def tool_result(session_id: str, tool_id: str, content: str, is_error: bool, **extra: Any) -> dict[str, Any]:
    """The ``user`` line with the ``tool_result`` of ``tool_id``."""
    block = {"tool_use_id": tool_id, "type": "tool_result", "content": content, "is_error": is_error}
    return user(session_id, [block], **extra)


def model_switch(session_id: str, shown: str) -> dict[str, Any]:
    """The ``isReplay`` line that records a ``set_model`` switch (its own key order)."""
    return {
        "type": "user",
        "message": {"role": "user", "content": f"<local-command-stdout>Set model to `{shown}`</local-command-stdout>"},
        "session_id": session_id,
        "parent_tool_use_id": None,
        "uuid": new_uuid(),
        "timestamp": timestamp(),
        "isReplay": True,
    }


def result(
    session_id: str,
    turn: Turn | None,
    result_index: int,
    *,
    subtype: str,
    terminal_reason: str | None,
    is_error: bool,
    text: str | None,
    errors: list[str] | None,
    api_error_status: int | None,
) -> dict[str, Any]:
    """The ``result`` line that ends ``turn`` (``None``: a start-up failure)."""
    elapsed = int((time.monotonic() - turn.started) * 1000) if turn else 0
    out_tokens = (turn.out_chars // 4 + 1) if turn else 0
    in_tokens = (len(turn.prompt) // 4 + 10) if turn else 0
    cost = round(in_tokens * 3e-6 + out_tokens * 15e-6, 8) if turn else 0
    usage = {
        "input_tokens": in_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": out_tokens,
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "service_tier": "standard",
    }
    if turn is None:
        # A start-up failure (unknown --resume id): the real CLI's line for
        # it does start with "type" and names no turn or terminal reason.
        return {
            "type": "result",
            "subtype": subtype,
            "duration_ms": 0,
            "duration_api_ms": 0,
            "is_error": is_error,
            "num_turns": 0,
            "stop_reason": None,
            "session_id": session_id,
            "total_cost_usd": 0,
            "usage": usage,
            "modelUsage": {},
            "permission_denials": [],
            "uuid": new_uuid(),
            "errors": errors or [],
            "result_index": result_index,
        }
    # Key order copied from the real CLI: "type" is in the middle, so a
    # client must parse the line rather than sniff its prefix.
    line: dict[str, Any] = {
        "duration_api_ms": elapsed,
        "stop_reason": "end_turn" if terminal_reason == "completed" else None,
        "session_id": session_id,
        "total_cost_usd": cost,
        "usage": usage,
        "modelUsage": {
            turn.model: {
                "inputTokens": in_tokens,
                "outputTokens": out_tokens,
                "cacheReadInputTokens": 0,
                "cacheCreationInputTokens": 0,
                "webSearchRequests": 0,
                "costUSD": cost,
                "contextWindow": 200000,
            }
        },
        "permission_denials": [],
        "terminal_reason": terminal_reason,
        "is_error": is_error,
        "num_turns": turn.num_turns,
        "subtype": subtype,
    }
    if api_error_status is not None:
        line["api_error_status"] = api_error_status
    if errors is not None:
        line["errors"] = errors
    if text is not None:
        line["result"] = text
    line["type"] = "result"
    line["duration_ms"] = elapsed
    line["uuid"] = new_uuid()
    if turn.uuids:
        line["user_message_uuid"] = turn.uuids[0]
    line["user_message_uuids"] = list(turn.uuids)
    line["queued_turn_count"] = 0
    line["result_index"] = result_index
    return line
