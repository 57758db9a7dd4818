"""What a client knows about one request: its state while it runs, and how it ended."""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ipc import frames
from ipc.errors import (
    AgentError,
    BrokerUnavailable,
    Cancelled,
    ClientTooSlow,
    LimitError,
    ModelRefused,
    Preempted,
    QueueFull,
    TurnstileError,
)

#: A broker-side refusal's ``error_code`` and the error it raises as (the broker's budgets and limits).
REFUSALS: dict[str, type[TurnstileError]] = {
    QueueFull.code: QueueFull,  # a prompt over a queued-bytes budget
    ClientTooSlow.code: ClientTooSlow,  # replies over a buffered-bytes budget
    LimitError.code: LimitError,  # the broker could not open this client's mailbox (open-file limit)
}


@dataclass
class TurnResult:
    """How a request ended."""

    status: frames.Status
    text: str = ""
    session_id: str | None = None
    model: str | None = None
    turn: int = 0
    queued_ms: float = 0.0
    turn_ms: float = 0.0
    error_code: str | None = None
    error: str | None = None
    #: The agent's own ``result`` message that ended the request's last attempt (from the Result frame,
    #: else the last ``result`` event streamed to the request; a preempted attempt's is the CLI's
    #: ``error_during_execution``). ``None`` when no agent result belongs to the request: refused or
    #: failed before the agent answered (``error`` with a broker-side ``error_code``, ``broker_unavailable``),
    #: cancelled while queued, and lease and set_model acknowledgements.
    raw: dict[str, Any] | None = None
    request_id: str = ""
    preemptions: int = 0

    @property
    def ok(self) -> bool:
        """True when the turn completed normally."""
        return self.status == "ok"

    def raise_for_status(self) -> TurnResult:
        """Return this result if the turn completed, else raise what ended it.

        :class:`Preempted` (``on_preempt="return"``), :class:`Cancelled`,
        :class:`BrokerUnavailable` (no broker came back for it), the
        broker's refusals (:class:`QueueFull`, :class:`ClientTooSlow`,
        :class:`LimitError`: a budget or limit, named in the message),
        :class:`ModelRefused` (the agent refused the model it named; nothing ran), or
        :class:`AgentError` for any other error; ``reason`` carries
        ``error_code``. Each error's ``exit_code`` is what ``turnstile prompt``
        exits with.
        """
        facts: dict[str, Any] = {"turn": self.turn, "request_id": self.request_id}
        if self.status == "preempted":
            raise Preempted(f"turn {self.turn} was preempted", **facts)
        if self.status == "cancelled":
            raise Cancelled(f"turn {self.turn} was cancelled", **facts)
        if self.status == "error":
            message = f"{self.error_code or 'error'}: {self.error or ''}".rstrip(": ")
            if self.error_code == BrokerUnavailable.code:
                raise BrokerUnavailable(message, reason=self.error_code, **facts)
            refusal = REFUSALS.get(self.error_code or "")
            if refusal is not None:
                raise refusal(message, reason=self.error_code, **facts)
            if self.error_code == ModelRefused.code:
                raise ModelRefused(message, reason=self.error_code, model=self.model, **facts)
            raise AgentError(message, reason=self.error_code, **facts)
        return self

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the CLI's ``result`` event)."""
        return {
            "status": self.status, "turn": self.turn, "text": self.text, "session_id": self.session_id,
            "model": self.model, "queued_ms": self.queued_ms, "turn_ms": self.turn_ms,
            "error_code": self.error_code, "error": self.error, "request_id": self.request_id,
            "preemptions": self.preemptions,
        }


@dataclass(frozen=True)
class HandlerFailure:
    """One agent request whose handler raised or answered something unusable (the agent was denied)."""

    subtype: str  # can_use_tool | hook_callback
    handler: str  # on_permission | on_hook
    reason: str


@dataclass
class RequestState:
    """One request the client sent and has no result for yet (or just got one)."""

    req: str
    frame: frames.RequestFrame
    events: deque[dict[str, Any]] = field(default_factory=deque)
    accepted: bool = False
    incarnation: str = ""
    turn: int = 0
    preemptions: int = 0
    result: TurnResult | None = None
    granted: bool = False  # lease requests
    last_result: dict[str, Any] | None = None  # the turn's result line, from the event stream
    cancelled: bool = False  # the client asked to cancel it (sent again after a resubmission)
    attempts: int = 0  # how many times a broker started it (every start after the first is a rerun)
    rerun_cause: str | None = None  # why the next start is a rerun (preempted, agent_restarted, broker_restarted)
    handler_failures: list[HandlerFailure] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True once the request has its result."""
        return self.result is not None

    def pop_events(self) -> Iterator[dict[str, Any]]:
        """The events not handed out yet, oldest first; each is taken only as it is yielded.

        Lazily, so a caller that stops iterating part-way leaves the rest for the next one.
        """
        while self.events:
            yield self.events.popleft()

    def has_news(self) -> bool:
        """What an events iterator waits for: an event to hand out, or the end."""
        return bool(self.events) or self.done


_req_counter = itertools.count(1)


def new_request_id() -> str:
    """A request id unique to this client."""
    return f"{next(_req_counter)}-{os.urandom(4).hex()}"
