"""What the fake Messages API reads from a request and keeps: the prompt, and the request's record.

The CLI merges consecutive user messages into one: a prompt left unanswered
(by an interrupt that came before any reply text, or an API error) is sent
again in front of the next one.  So the fake answers the *newest piece* of the
message (its last text or tool_result block), which keeps replies the same
however the CLI merged.  Text the CLI injects is not the client's and is
dropped (see :func:`prompt_pieces`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CLIENT_GONE", "RecordedRequest", "has_tool_result", "last_user", "prompt_pieces", "prompt_text"]

# Text the CLI itself adds to user messages (context reminders, the record of
# a local /model command, interrupt markers).  Dropped so the echo, and the
# directives, are the client's words only.
_CLI_INJECTED_RE = re.compile(
    r"<(system-reminder|local-command-caveat|local-command-stdout|local-command-stderr"
    r"|command-name|command-message|command-args)>.*?</\1>"
    r"|^\[Request interrupted by user[^\]\n]*\]$",
    re.DOTALL | re.MULTILINE,
)
#: Pseudo event name in :meth:`OfflineAPI.sent_events`: the client went away
#: (or the server stopped) before the response was complete.
CLIENT_GONE = "client_gone"


def prompt_pieces(content: Any) -> list[str]:
    """Return the client-written text pieces of one message's ``content``.

    ``content`` is a string or a list of blocks.  Text blocks count, and so do
    ``tool_result`` blocks (their string content or their text blocks).  Text
    the CLI injects is dropped so the echo is the client's prompt: the
    ``<system-reminder>`` blocks it prepends (environment, date, skills), and,
    because it merges consecutive user messages into one, the record of a
    ``/model`` switch (``<local-command-stdout>`` and friends) and the
    ``[Request interrupted by user]`` marker of an earlier aborted turn.
    """
    parts: list[str] = []
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append(block["text"])
            elif kind == "tool_result":
                parts.append(prompt_text(block.get("content")))
    cleaned = (_CLI_INJECTED_RE.sub("", p).strip() for p in parts)
    return [p for p in cleaned if p]


def prompt_text(content: Any) -> str:
    """Return the prompt text of one message's ``content``: its
    :func:`prompt_pieces` joined by newlines."""
    return "\n".join(prompt_pieces(content))


def last_user(messages: Any) -> dict[str, Any] | None:
    """The last message of role ``user`` in a request's ``messages``, or None."""
    if not isinstance(messages, list):
        return None
    for msg in reversed(messages):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return msg
    return None


def has_tool_result(message: dict[str, Any] | None) -> bool:
    """True when ``message`` carries a ``tool_result`` block (the turn continues after a tool)."""
    content = message.get("content") if message else None
    return isinstance(content, list) and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content)



@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake received.

    ``t_ns`` is ``time.perf_counter_ns()`` when the request line arrived.  On
    Linux that is CLOCK_MONOTONIC, so it compares with ``time.monotonic_ns()``
    and ``perf_counter_ns()`` taken in other processes of the same machine.

    ``prompt`` is the whole client-written text of the last user message (all
    of its pieces, newline-joined); ``latest`` is its newest piece, the one the
    fake answers.  They differ when the CLI merged several prompts into one
    message, so match on ``latest`` to find "the request for my prompt".
    """

    method: str
    path: str
    model: str | None
    messages: list[Any]
    stream: bool
    t_ns: int
    prompt: str
    latest: str
    body_bytes: int
    headers: dict[str, str] = field(default_factory=dict)
    # Arrival index among all requests of this server, for sent_events().
    seq: int = -1

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-able dict, without the (large) messages."""
        return {
            "method": self.method,
            "path": self.path,
            "model": self.model,
            "stream": self.stream,
            "t_ns": self.t_ns,
            "prompt": self.prompt,
            "latest": self.latest,
            "message_count": len(self.messages),
            "body_bytes": self.body_bytes,
            "seq": self.seq,
        }
