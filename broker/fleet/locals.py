"""The gateway's local clients: one public ``AsyncClient`` per remote requester and kind.

To the broker each remote requester is then a client of its own: its kind fixes
its priority, its request ids de-duplicate, a lease or cancel stays its own, and
the death of the gateway is the death of ordinary clients (their turns are
cancelled, their queued requests dropped: the un-acknowledged NATS messages
bring them back through the next gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from clients.aio import AsyncClient
from clients.handlers import Handler
from ipc import frames
from ipc.errors import BrokerUnavailable, TurnstileError


@dataclass
class _Slot:
    client: AsyncClient
    busy: int = 0
    idle_since: float = 0.0


class LocalClients:
    """Local clients by (remote client id, kind), connected on first use, closed when idle."""

    def __init__(self, session: str, *, broker_wait_s: float, connect_step_s: float = 2.0) -> None:
        self.session = session
        self.broker_wait_s = broker_wait_s
        self.connect_step_s = connect_step_s
        self.slots: dict[tuple[str, str], _Slot] = {}
        self._control: AsyncClient | None = None

    async def _connect(self, kind: frames.Kind, stopping: asyncio.Event, *,
                       on_permission: Handler | None = None, on_hook: Handler | None = None) -> AsyncClient:
        # Waits for a broker as long as the gateway runs: the request stays safe in NATS meanwhile.
        while True:
            c = AsyncClient(self.session, kind, connect_timeout_s=self.connect_step_s,
                            reconnect_timeout_s=self.broker_wait_s, on_permission=on_permission, on_hook=on_hook)
            try:
                return await c.connect()
            except BrokerUnavailable:
                if stopping.is_set():
                    raise

    async def acquire(self, remote_client: str, kind: frames.Kind, stopping: asyncio.Event, *,
                      on_permission: Handler | None = None, on_hook: Handler | None = None) -> AsyncClient:
        """The local client for this requester and kind, marked busy with one more request.

        Its handlers (``async def``s that ask the remote client over NATS) are those of the
        requester's first request: a remote client's handlers are fixed for its life.
        """
        key = (remote_client, kind)
        slot = self.slots.get(key)
        if slot is None:
            slot = _Slot(await self._connect(kind, stopping, on_permission=on_permission, on_hook=on_hook))
            self.slots[key] = slot
        slot.busy += 1
        return slot.client

    def release(self, remote_client: str, kind: str) -> None:
        """One request of this requester ended."""
        slot = self.slots.get((remote_client, kind))
        if slot is not None:
            slot.busy -= 1
            if slot.busy == 0:
                slot.idle_since = time.monotonic()

    async def reap(self, idle_s: float) -> None:
        """Close the clients that have had nothing to do for ``idle_s``."""
        now = time.monotonic()
        for key, slot in list(self.slots.items()):
            if slot.busy == 0 and now - slot.idle_since >= idle_s:
                del self.slots[key]
                await _close(slot.client)

    async def control(self, stopping: asyncio.Event) -> AsyncClient:
        """A client for cancels of turns by (incarnation, turn)."""
        if self._control is None:
            self._control = await self._connect("webhook", stopping)
        return self._control

    async def close(self) -> None:
        """Close every client (their unfinished requests are dropped by the broker)."""
        clients = [s.client for s in self.slots.values()]
        if self._control is not None:
            clients.append(self._control)
        self.slots.clear()
        self._control = None
        for c in clients:
            await _close(c)


async def _close(c: AsyncClient) -> None:
    with contextlib.suppress(TurnstileError, OSError):
        await c.close()
