"""One exception tree for every turnstile error.

Errors carry their facts as attributes (a ``code`` token and the values that
explain it), not only as a string, and survive pickling: each instance keeps its
message and attributes through ``__reduce__``.

Each class also carries the ``exit_code`` the ``turnstile`` command exits with
when that error ends it; the exit-code table in ``--help`` is generated from
these attributes (``broker/exits.py``), so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

#: Exit codes that are not errors (``broker/exits.py`` puts them in the table too).
EXIT_OK = 0
EXIT_SIGNAL = 130


class TurnstileError(Exception):
    """Base of every error turnstile raises on purpose."""

    code: str = "turnstile_error"
    #: What `turnstile` exits with when this error ends a command.
    exit_code: int = 1
    #: The line the exit-code table shows for ``exit_code`` (on the class that introduces it).
    exit_meaning: str = "any other error"

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


class InvalidArgument(TurnstileError, ValueError):
    """An argument is out of range or malformed (a session name, a turn id, a timeout).

    Also a ``ValueError``, so callers that caught the plain ``ValueError`` of
    earlier versions keep working. ``argument`` names what was wrong.
    """

    code = "invalid_argument"
    exit_code = 2
    exit_meaning = "usage error (bad arguments, or a prompt the broker refuses)"


class ProtocolError(TurnstileError):
    """A frame was malformed, oversize, of an unknown type or version, or out of sequence.

    ``reason`` names what was wrong (``malformed``, ``invalid``, ``unknown_type``,
    ``unsupported_version``, ``oversize``, ``chunk_sequence``, ``chunk_timeout``, ``chunk_evicted``,
    ``unknown_client``, ``kind_mismatch``, ``bad_content``, ``ring`` for an
    inconsistent mailbox ring). A refused frame is the caller's input: the same
    exit code as a usage error.
    """

    code = "protocol_error"
    exit_code = 2

    def __init__(self, code: str, message: str, **attrs: Any) -> None:
        super().__init__(f"{code}: {message}", reason=code, **attrs)


class IPCError(TurnstileError):
    """An operating-system IPC object could not be created, opened or used."""

    code = "ipc_error"
    exit_code = 11
    exit_meaning = "an IPC object could not be created or used (squatted name, system limit, full queue)"


class QueueGone(IPCError):
    """The request queue's name was removed while a client held it open (RemoveIPC, a sweep).

    The client detaches and reattaches to whatever queue the broker recreates.
    ``name`` is the queue's name.
    """

    code = "queue_gone"


class NameSquatted(IPCError):
    """An IPC name exists but is owned by another user or is open to group/other.

    turnstile refuses to use it: another local user could read or inject frames.
    """

    code = "name_squatted"


class StateDamaged(IPCError):
    """The session's state block is damaged (resized, foreign header, sequence word stuck mid-write).

    Not the same as "no broker": ``broker_alive`` says whether the broker it
    names still runs (a live broker rewrites its block at its next publish).
    """

    code = "state_damaged"


class LimitError(IPCError):
    """A system limit on POSIX queues or shared memory was hit; the message says which to raise."""

    code = "limit"


class QueueFull(IPCError):
    """The request queue stayed full for the whole bounded wait."""

    code = "queue_full"


class TooManyConnections(TurnstileError):
    """A client process already holds as many connections as the broker allows one process.

    Each connection costs a POSIX queue of the user's small budget, so one process
    must not take them all (``turnstile serve --max-clients-per-process``). ``pid``
    is the process, ``limit`` the cap.
    """

    code = "too_many_connections"


class StateDirError(TurnstileError):
    """The broker's state directory cannot be created or written (read-only, not a directory, disk full).

    ``path`` is the directory, ``reason`` the operating system's words.
    """

    code = "state_dir"
    exit_code = 13
    exit_meaning = "the state directory cannot be created or written (read-only, not a directory, disk full)"


class AlreadyRunning(TurnstileError):
    """Another live broker holds the session's lock."""

    code = "already_running"
    exit_code = 10
    exit_meaning = "another broker already serves this session"


class AgentNotFound(TurnstileError):
    """The agent's executable could not be located.

    ``searched`` lists the places tried, in order, so the message can say
    exactly where the binary was looked for; ``hint`` says how to install it.
    """

    code = "agent_not_found"
    exit_code = 12
    exit_meaning = "the agent executable was not found"

    def __init__(self, searched: list[str], hint: str = "") -> None:
        where = "; ".join(searched) or "nowhere"
        message = f"agent executable not found (searched: {where})"
        if hint:
            message = f"{message}. {hint}"
        super().__init__(message, searched=list(searched), hint=hint)


class BrokerUnavailable(TurnstileError):
    """No broker serves the session (not started, or died and none came back in time)."""

    code = "broker_unavailable"
    exit_code = 5
    exit_meaning = "no live broker serves the session"


class BrokerUnreachable(BrokerUnavailable):
    """A broker seems to serve the session, but this process cannot reach it: starting another would fail.

    ``reason``: ``other_user`` (the session's names belong to ``owner_uid``),
    ``other_ipc_namespace`` (the state block is visible, the request queue is
    not), ``other_pid_namespace`` (``broker_pid`` is another process here),
    ``lock_held`` (the broker's lock is held but its shared memory is not
    visible). The message says what to do: same user, share the broker's IPC
    namespace, or go through the NATS gateway.
    """

    code = "broker_unreachable"


class ClientTooSlow(TurnstileError):
    """The client did not drain its mailbox and the broker's bounded buffer for it overflowed."""

    code = "client_too_slow"


class AgentError(TurnstileError):
    """The agent failed a turn (API error, restart, crash): raised by ``TurnResult.raise_for_status``.

    ``reason`` is the broker's error code for the turn (``agent_restarted``, ...).
    """

    code = "agent_error"
    exit_code = 6
    exit_meaning = "agent error (API error, agent restarted mid-turn)"


class ModelRefused(AgentError):
    """The agent refused to switch to a model (the API does not serve it); the session kept its model.

    Raised by ``TurnResult.raise_for_status`` for a prompt or ``set_model``
    naming that model (the prompt did not run). ``model`` is the model the
    session is still on; ``turn`` and ``request_id`` as for every turn error.
    """

    code = "model_refused"


class Preempted(TurnstileError):
    """A turn was preempted and its client asked for that back (``on_preempt="return"``).

    Raised by ``TurnResult.raise_for_status``; ``turn`` is the preempted turn.
    """

    code = "preempted"
    exit_code = 3
    exit_meaning = "preempted (with --on-preempt return)"


class Cancelled(TurnstileError):
    """A turn was cancelled: raised by ``TurnResult.raise_for_status``; ``turn`` is the turn."""

    code = "cancelled"
    exit_code = 4
    exit_meaning = "cancelled"


class TurnTimeout(TurnstileError):
    """A client-side wait for a turn's result ran out."""

    code = "timeout"
    exit_code = 7
    exit_meaning = "--timeout-s ran out"


class Interrupted(TurnstileError):
    """A client's wait stopped because the caller's interrupt check said so (a recorded Ctrl-C, say).

    Raised between reply frames, every frame read so far applied; the request
    goes on (cancel it, then wait again for its result). See
    ``Client.interrupt_when``.
    """

    code = "interrupted"
    exit_code = EXIT_SIGNAL
    exit_meaning = "interrupted (Ctrl-C)"


class FleetUnavailable(BrokerUnavailable):
    """The NATS server of a fleet URL could not be reached, or no gateway serves the session there.

    ``url`` names the server (credentials removed); ``session`` the session asked for.
    """

    code = "fleet_unavailable"
