"""Answering the agent's control requests with the caller's handlers, and what a failing handler gives.

A handler (``on_permission=`` for ``can_use_tool``, ``on_hook=`` for
``hook_callback``) is a plain function or, on :class:`clients.AsyncClient`,
an ``async def``. Whatever goes wrong in it (it raises, returns something that
is not a JSON object, or a permission answer that is neither allow nor deny)
must neither leave the agent waiting nor pass silently: the agent gets a deny
(a failed-hook error for hooks), and the caller gets a :class:`HandlerError`
from that turn's ``result()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from clients.requests import HandlerFailure
from ipc.errors import TurnstileError

#: A handler gets the agent's request object and returns the answer (or, on AsyncClient, awaits it).
Handler = Callable[[dict[str, Any]], "dict[str, Any] | Awaitable[dict[str, Any]]"]

#: The longest failure reason sent to the agent (the frame bounds its error text at 4 KiB).
MAX_REASON = 1000

#: Which constructor argument answers which agent request.
HANDLER_NAMES = {"can_use_tool": "on_permission", "hook_callback": "on_hook"}


class HandlerError(TurnstileError):
    """A handler for the agent's requests failed during this turn; the agent was answered with a deny.

    Raised by the turn's ``result()`` once the turn ended. Attributes:
    ``subtype`` and ``handler`` of the first failure, ``reason``, ``failures``
    (every :class:`~clients.requests.HandlerFailure` of the turn) and
    ``result`` (the turn's :class:`~clients.TurnResult`, which still counts).
    """

    code = "handler_error"


@dataclass(frozen=True)
class Answer:
    """What to send back to the agent: a response object or an error, and why, if the handler failed."""

    response: dict[str, Any] | None = None
    error: str | None = None
    failure: HandlerFailure | None = None


def call(handler: Handler, subtype: str, request: dict[str, Any]) -> Answer | Awaitable[Any]:
    """Run ``handler`` on ``request``: the answer, or the awaitable an ``async def`` handler returned."""
    try:
        value = handler(request)
    except Exception as exc:
        return failed(subtype, f"it raised {type(exc).__name__}: {exc}")
    if inspect.isawaitable(value):
        return value
    return check(subtype, value)


async def settle(pending: Awaitable[Any], subtype: str) -> Answer:
    """Await an ``async def`` handler's answer and check it."""
    try:
        value = await pending
    except Exception as exc:
        return failed(subtype, f"it raised {type(exc).__name__}: {exc}")
    return check(subtype, value)


def not_awaited(pending: Awaitable[Any], subtype: str) -> Answer:
    """The blocking client cannot run an ``async def`` handler: a deny that says what to use instead."""
    if inspect.iscoroutine(pending):
        pending.close()  # never awaited: close it so Python does not warn about it later
    return failed(subtype, "it is an async def: the blocking Client needs a plain function "
                           "(use AsyncClient for async handlers)")


def check(subtype: str, value: Any) -> Answer:
    """Accept an answer only if the broker will: a JSON object, and allow/deny for a permission."""
    if not isinstance(value, dict):
        return failed(subtype, f"it returned {type(value).__name__}, not a dict")
    try:
        msgspec.json.encode(value)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        return failed(subtype, f"its answer cannot be encoded as JSON: {exc}")
    # The broker refuses any other permission answer and the agent would wait for one until
    # the broker's relay timeout: checked here so the agent is denied at once.
    if subtype == "can_use_tool" and value.get("behavior") not in ("allow", "deny"):
        return failed(subtype, f"its answer has behavior {value.get('behavior')!r}, not 'allow' or 'deny'")
    return Answer(response=value)


def failed(subtype: str, why: str) -> Answer:
    """The answer for a handler that failed: a deny for a permission, an error (a failed hook) otherwise."""
    name = HANDLER_NAMES.get(subtype, "handler")
    if len(why) > MAX_REASON:  # an answer's text is bounded on the wire
        why = why[:MAX_REASON] + "..."
    message = f"turnstile: the {name} handler failed: {why}"
    failure = HandlerFailure(subtype=subtype, handler=name, reason=why)
    if subtype == "can_use_tool":
        return Answer(response={"behavior": "deny", "message": message}, failure=failure)
    return Answer(error=message, failure=failure)


def error_for(failures: list[HandlerFailure], result: Any) -> HandlerError:
    """The error a turn's ``result()`` raises when its handlers failed."""
    first = failures[0]
    more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
    return HandlerError(
        f"the {first.handler} handler failed on a {first.subtype} request{more}: {first.reason}; "
        "the agent was denied",
        subtype=first.subtype, handler=first.handler, reason=first.reason, failures=list(failures), result=result,
    )
