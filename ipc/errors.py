"""One exception tree for every turnstile error.

Errors carry their facts as attributes (a ``code`` token and the values that
explain it), not only as a string, and survive pickling: each class keeps the
constructor arguments in ``args`` order through ``__reduce__``.
"""

from __future__ import annotations

from typing import Any


class TurnstileError(Exception):
    """Base of every error turnstile raises on purpose."""

    code: str = "turnstile_error"

    def __init__(self, message: str, **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self.attrs = attrs
        for key, value in attrs.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.attrs))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[TurnstileError], message: str, attrs: dict[str, Any]) -> TurnstileError:
    err = cls.__new__(cls)
    TurnstileError.__init__(err, message, **attrs)
    return err


class ProtocolError(TurnstileError):
    """A frame was malformed, oversize, of an unknown type or version, or out of sequence.

    ``code`` names what was wrong (``malformed``, ``invalid``, ``unknown_type``,
    ``unsupported_version``, ``oversize``, ``chunk_sequence``, ``chunk_timeout``,
    ``unknown_client``, ``kind_mismatch``, ``bad_content``, ``ring`` for an
    inconsistent mailbox ring).
    """

    code = "protocol_error"

    def __init__(self, code: str, message: str, **attrs: Any) -> None:
        super().__init__(f"{code}: {message}", reason=code, **attrs)


class IPCError(TurnstileError):
    """An operating-system IPC object could not be created, opened or used."""

    code = "ipc_error"


class NameSquatted(IPCError):
    """An IPC name exists but is owned by another user or is open to group/other.

    turnstile refuses to use it: another local user could read or inject frames.
    """

    code = "name_squatted"


class LimitError(IPCError):
    """A system limit on POSIX queues or shared memory was hit; the message says which to raise."""

    code = "limit"


class QueueFull(IPCError):
    """The request queue stayed full for the whole bounded wait."""

    code = "queue_full"


class BrokerUnavailable(TurnstileError):
    """No broker serves the session (not started, or died and none came back in time)."""

    code = "broker_unavailable"


class ClientTooSlow(TurnstileError):
    """The client did not drain its mailbox and the broker's bounded buffer for it overflowed."""

    code = "client_too_slow"


class AgentError(TurnstileError):
    """The agent failed a turn (API error, restart, crash)."""

    code = "agent_error"


class Preempted(TurnstileError):
    """A turn was preempted by a webhook and the client asked to get that back as its result."""

    code = "preempted"


class Cancelled(TurnstileError):
    """A turn was cancelled."""

    code = "cancelled"


class TurnTimeout(TurnstileError):
    """A client-side wait for a turn's result ran out."""

    code = "timeout"
