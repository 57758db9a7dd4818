"""The fake Messages API's ``[api:...]`` directives: what a prompt asks the "model" to do.

The real Claude Code CLI runs unchanged against it when ``ANTHROPIC_BASE_URL``
points here, so tests drive turns through the CLI's normal path while the fake
decides what the "model" says.  Everything is deterministic: the reply is
derived from the text of the last ``user`` message in the request, without
the text the CLI injects there (see :func:`prompt_pieces`).

The CLI merges consecutive user messages into one: a prompt left unanswered
(by an interrupt that came before any reply text, or an API error) is sent
again in front of the next one.  So the fake answers the *newest piece* of the
message (its last text or tool_result block), which keeps replies the same
however the CLI merged.

Default reply: ``"echo: <newest piece>"``.  Directives in the newest piece
script a turn; several may be combined; when they conflict, status wins over
hang, hang over tool:

``[api:slow=MS]``
    Stream the reply as many small deltas spread over about MS milliseconds,
    long enough to preempt.  The stream stops as soon as the client goes away.
``[api:tool=NAME:JSON]``
    Reply with a ``tool_use`` block calling NAME with the JSON object as input.
    The follow-up request, which carries the ``tool_result``, is answered with
    text (``"echo: <tool result text>"``, unless a prompt was merged after
    it); directives are ignored there, so a tool whose output repeats the
    directive cannot loop forever.
``[api:status=CODE]``
    Answer with an error JSON body and that HTTP status.  The response carries
    ``x-should-retry: false`` so the CLI reports the error at once instead of
    backing off for minutes (it retries 5xx up to 10 times, 0.6 s to 19 s
    apart).
``[api:status=CODE*N]``
    Fail the first N attempts of this exact request (retryable, no
    ``x-should-retry`` header), then answer normally: a retry the CLI can win.
``[api:big=BYTES]``
    Reply with exactly BYTES bytes of deterministic ASCII text (:func:`big_text`).
``[api:hang]``
    Send ``message_start`` and then nothing, until the client disconnects or
    the server stops.

The syntax is shared with the fake CLI (:mod:`broker.testing.directives`);
docs/testing-kit.md lists every directive with an example.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from broker.testing.directives import scan_directives

__all__ = ["Directives", "big_text", "parse_directives"]

_BIG_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def big_text(n_bytes: int) -> str:
    """Return the deterministic ASCII text of ``[api:big=n_bytes]``.

    A repeating alphabet with a newline every 80 characters: easy to eyeball,
    one byte per character, and nothing but the newline needs JSON escaping.
    """
    line = (_BIG_ALPHABET * 2)[:79] + "\n"
    reps = n_bytes // len(line) + 1
    return (line * reps)[:n_bytes]



@dataclass(frozen=True)
class Directives:
    """The ``[api:...]`` directives found in one prompt."""

    slow_ms: int | None = None
    tool: tuple[str, dict[str, Any]] | None = None
    status: int | None = None
    # None: fail every attempt (and tell the CLI not to retry).
    status_times: int | None = None
    big: int | None = None
    hang: bool = False



def parse_directives(text: str) -> Directives:
    """Parse every ``[api:NAME]`` / ``[api:NAME=VALUE]`` directive in ``text``.

    Malformed or unknown directives are ignored: the prompt is then echoed,
    which makes a typo visible in the reply instead of failing the server.
    """
    found: dict[str, Any] = {}
    for name, raw in scan_directives(text, "api"):
        if raw is None:
            if name == "hang":
                found["hang"] = True
            continue
        with contextlib.suppress(ValueError):
            if name == "slow":
                found["slow_ms"] = max(0, int(raw))
            elif name == "big":
                found["big"] = max(0, int(raw))
            elif name == "status":
                code, _, times = raw.partition("*")
                # Both parsed before either is kept: "500*x" is ignored whole.
                parsed = (int(code), int(times) if times else None)
                found["status"], found["status_times"] = parsed
            elif name == "tool":
                tool_name, _, tool_input = raw.partition(":")
                value = json.loads(tool_input)  # JSONDecodeError is a ValueError
                if isinstance(value, dict):
                    found["tool"] = (tool_name, value)
    return Directives(**found)
