"""What the fake CLI answers to control requests: the replies' content and its refusals.

Pure functions of the session's state; :class:`broker.testing.fake_cli.cli.FakeCLI`
routes each request and writes the reply.  Only the standard library is
imported.
"""

from __future__ import annotations

import os
import re

from broker.testing.fake_cli.wire import DEFAULT_MODEL, MODEL_ALIASES, NO_AUTO_MODE, PERMISSION_MODES, new_uuid

TYPE_CHECKING = False  # not from typing: importing typing costs the fake CLI ~5 ms per start
if TYPE_CHECKING:
    from typing import Any

INVALID_MODE = "Cannot set permission mode: must be one of " + ", ".join(sorted(PERMISSION_MODES))
"""The error of ``set_permission_mode`` with an unknown mode."""


def initialize_info() -> dict[str, Any]:
    """The ``initialize`` reply: commands, models and this process's pid."""
    return {
        "commands": [
            {"name": "compact", "description": "Compact the conversation", "argumentHint": ""},
            {"name": "context", "description": "Show context usage", "argumentHint": ""},
            {"name": "model", "description": "Set the model", "argumentHint": "[model]"},
        ],
        "agents": [],
        "output_style": "default",
        "available_output_styles": ["default"],
        "models": [
            {"value": "default", "displayName": "Default", "description": DEFAULT_MODEL},
            {"value": "opus", "displayName": "Opus", "description": MODEL_ALIASES["opus"]},
            {"value": "haiku", "displayName": "Haiku", "description": MODEL_ALIASES["haiku"]},
        ],
        "account": {},
        "pid": os.getpid(),
    }


def context_usage(model: str, history: int) -> dict[str, Any]:
    """The ``get_context_usage`` reply: grows by 50 tokens per earlier user message."""
    used = 4000 + 50 * history
    return {
        "model": model,
        "totalTokens": used,
        "maxTokens": 200000,
        "rawMaxTokens": 200000,
        "percentage": round(100 * used / 200000, 2),
        "categories": [{"name": "Messages", "tokens": used, "color": "purple"}],
    }


def permission_mode_refusal(mode: Any, model: str, bypass_allowed: bool) -> tuple[str, str] | None:
    """Why ``set_permission_mode`` to ``mode`` is refused, as (error, error_code); None if allowed."""
    if not isinstance(mode, str) or mode not in PERMISSION_MODES:
        return INVALID_MODE, "invalid_mode"
    if mode == "auto" and NO_AUTO_MODE.search(model):
        return "Cannot set permission mode to auto: auto mode unavailable for this model", "auto_mode_model"
    if mode == "bypassPermissions" and not bypass_allowed:
        return (
            "Cannot set permission mode to bypassPermissions because the session was not "
            "launched with --dangerously-skip-permissions",
            "bypass_not_launched",
        )
    return None


def status_line(session_id: str, mode: str) -> dict[str, Any]:
    """The ``system/status`` line that follows a permission-mode change."""
    return {
        "type": "system",
        "subtype": "status",
        "status": None,
        "permissionMode": mode,
        "uuid": new_uuid(),
        "session_id": session_id,
    }


def registered_hooks(request: dict[str, Any]) -> dict[str, list[tuple[Any, list[str]]]]:
    """The hooks an ``initialize`` request registers: event -> [(matcher, callback ids)].

    Malformed entries are skipped: the CLI sends ``hook_callback`` only for ids
    it could read.
    """
    hooks = request.get("hooks")
    out: dict[str, list[tuple[Any, list[str]]]] = {}
    if not isinstance(hooks, dict):
        return out
    for event, matchers in hooks.items():
        for m in matchers if isinstance(matchers, list) else []:
            ids = m.get("hookCallbackIds") if isinstance(m, dict) else None
            if isinstance(ids, list):
                out.setdefault(str(event), []).append((m.get("matcher"), [i for i in ids if isinstance(i, str)]))
    return out


def hook_callback_ids(hooks: dict[str, list[tuple[Any, list[str]]]], event: str, tool_name: str) -> list[str]:
    """The callback ids registered for ``event`` whose matcher matches ``tool_name``, in order.

    A matcher of ``None``, ``""`` or ``"*"`` matches every tool; otherwise it is
    a regular expression the whole tool name must match (``"Bash|Edit"``).
    """
    ids: list[str] = []
    for matcher, callback_ids in hooks.get(event, []):
        if matcher in (None, "", "*") or _matches(str(matcher), tool_name):
            ids.extend(callback_ids)
    return ids


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return pattern == name
