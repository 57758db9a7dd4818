"""turnstile clients: what bot authors import.

``Client`` (blocking) and ``AsyncClient`` (asyncio) have the same shape; every
error they raise is a :class:`TurnstileError`.
"""

from clients.aio import AsyncClient, AsyncTurn
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
