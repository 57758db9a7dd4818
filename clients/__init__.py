"""turnstile clients: what bot authors import.

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same shape; every
error they raise is a :class:`TurnstileError`. An ``AsyncClient`` may be shared
by concurrent tasks; a ``Client`` serves one thread at a time.
"""

from typing import TYPE_CHECKING, Any

from clients.client import Client, ConcurrentUse, Turn
from clients.handlers import HandlerError
from clients.requests import TurnResult

# Every public error, so bot authors import them from one place.
from ipc.errors import (
    AgentError,
    AgentNotFound,
    AlreadyRunning,
    BrokerUnavailable,
    BrokerUnreachable,
    Cancelled,
    ClientTooSlow,
    FleetUnavailable,
    Interrupted,
    InvalidArgument,
    IPCError,
    LimitError,
    ModelRefused,
    NameSquatted,
    Preempted,
    ProtocolError,
    QueueFull,
    QueueGone,
    StateDamaged,
    StateDirError,
    TooManyConnections,
    TurnstileError,
    TurnTimeout,
)

if TYPE_CHECKING:
    from clients.aio import AsyncClient, AsyncTurn


def __getattr__(name: str) -> Any:
    # The asyncio client is imported on first use: asyncio costs a blocking client
    # (a `turnstile prompt` run by a shell webhook handler) ~40 ms of start-up.
    if name in ("AsyncClient", "AsyncTurn"):
        from clients import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AgentError",
    "AgentNotFound",
    "AlreadyRunning",
    "AsyncClient",
    "AsyncTurn",
    "BrokerUnavailable",
    "BrokerUnreachable",
    "Cancelled",
    "Client",
    "ClientTooSlow",
    "ConcurrentUse",
    "FleetUnavailable",
    "HandlerError",
    "IPCError",
    "Interrupted",
    "InvalidArgument",
    "LimitError",
    "ModelRefused",
    "NameSquatted",
    "Preempted",
    "ProtocolError",
    "QueueFull",
    "QueueGone",
    "StateDamaged",
    "StateDirError",
    "TooManyConnections",
    "Turn",
    "TurnResult",
    "TurnTimeout",
    "TurnstileError",
]
