"""turnstile clients: what bot authors import.

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same shape; every
error they raise is a :class:`TurnstileError`.
"""

from typing import TYPE_CHECKING, Any

from clients.client import Client, Turn
from clients.core import TurnResult
from ipc.errors import (
    AgentError,
    BrokerUnavailable,
    Cancelled,
    ClientTooSlow,
    IPCError,
    Preempted,
    ProtocolError,
    QueueFull,
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
    "AsyncClient",
    "AsyncTurn",
    "BrokerUnavailable",
    "Cancelled",
    "Client",
    "ClientTooSlow",
    "IPCError",
    "Preempted",
    "ProtocolError",
    "QueueFull",
    "Turn",
    "TurnResult",
    "TurnTimeout",
    "TurnstileError",
]
