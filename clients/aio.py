"""The asyncio client: the same shape as :class:`clients.Client`, awaitable.

It waits on the mailbox doorbell and the broker's pidfd with
``loop.add_reader`` (both are pollable descriptors), never in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from clients.core import Connection, HookHandler, PermissionHandler, RequestState, TurnResult, monotonic, new_request_id
from ipc import frames
from ipc.errors import BrokerUnavailable, TurnTimeout

POLL_S = 0.25


class AsyncTurn:
    """One submitted prompt: ``async for`` its events, ``await result()``."""

    def __init__(self, client: AsyncClient, st: RequestState) -> None:
        self._client = client
        self._st = st

    @property
    def request_id(self) -> str:
        """The id this request travels under."""
        return self._st.req

    @property
    def turn_id(self) -> int:
        """The broker's turn id once the turn started (0 before)."""
        return self._st.turn

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self.events()

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._st
        while True:
            while st.events:
                yield st.events.popleft()
            if st.done:
                return
            await self._client._wait(deadline, lambda: bool(st.events) or st.done)

    async def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._st
        while st.result is None:
            await self._client._wait(deadline, lambda: st.done)
        return st.result

    def cancel(self) -> None:
        """Cancel this request only."""
        if not self._st.done:
            self._client._conn.cancel(self._st)


class AsyncClient:
    """An asyncio connection to one session's broker. Use ``async with AsyncClient(...) as c``."""

    def __init__(
        self,
        session: str = "default",
        kind: frames.Kind = "worker",
        *,
        connect_timeout_s: float = 5.0,
        reconnect_timeout_s: float = 30.0,
        on_preempt: frames.OnPreempt = "requeue",
        on_permission: PermissionHandler | None = None,
        on_hook: HookHandler | None = None,
    ) -> None:
        self.session = session
        self.kind = kind
        self.on_preempt: frames.OnPreempt = on_preempt
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._conn = Connection(session, kind, on_permission=on_permission, on_hook=on_hook)
        self._wake: asyncio.Event | None = None

    @property
    def client_id(self) -> str:
        """This client's id."""
        return self._conn.client_id

    @property
    def incarnation(self) -> str:
        """The incarnation id of the broker this client is attached to."""
        return self._conn.incarnation

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel a turn by (incarnation, turn id), whoever holds it."""
        self._conn.cancel_turn(incarnation, turn)

    async def connect(self) -> AsyncClient:
        """Attach to the broker, waiting up to ``connect_timeout_s``."""
        start = monotonic()
        while not self._conn.try_attach():
            if monotonic() - start >= self.connect_timeout_s:
                self._conn.close()
                raise self._conn.unavailable(self.connect_timeout_s)
            await asyncio.sleep(0.02)
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave."""
        self._conn.close()

    def prompt(
        self,
        content: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        on_preempt: frames.OnPreempt | None = None,
        resume_prompt: str | None = None,
        request_id: str | None = None,
    ) -> AsyncTurn:
        """Submit a prompt; returns at once."""
        frame = self._conn.prompt_frame(
            content, model=model, on_preempt=on_preempt or self.on_preempt, resume_prompt=resume_prompt,
            request_id=request_id,
        )
        return AsyncTurn(self, self._conn.submit(frame))

    async def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        st = self._conn.submit(frames.SetModel(
            client=self._conn.client_id, req=new_request_id(), kind=self.kind, model=model,
        ))
        return await AsyncTurn(self, st).result(timeout_s)

    @contextlib.asynccontextmanager
    async def lease(
        self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[None]:
        """Hold the session across several turns."""
        st = self._conn.submit(frames.Lease(
            client=self._conn.client_id, req=new_request_id(), kind=self.kind, idle_timeout_s=idle_timeout_s,
        ))
        res = await AsyncTurn(self, st).result(timeout_s)
        if not st.granted:
            raise BrokerUnavailable(f"lease not granted: {res.error_code or res.status}")
        try:
            yield
        finally:
            if not self._conn.closed:
                self._conn._send(frames.Release(client=self._conn.client_id, req=new_request_id(), kind=self.kind))
                self._conn.lease_state = "none"

    async def _wait(self, deadline: float | None, ready: Callable[[], bool]) -> None:
        conn = self._conn
        loop = asyncio.get_running_loop()
        lost_at: float | None = None
        while True:
            conn.drain_mailbox()
            if ready():
                return
            now = monotonic()
            if deadline is not None and now >= deadline:
                raise TurnTimeout("no result in time", session=self.session)
            pidfd = conn.broker_pidfd
            if pidfd is None:
                lost_at = lost_at if lost_at is not None else now
                if conn.try_attach():
                    lost_at = None
                    continue
                if now - lost_at >= self.reconnect_timeout_s:
                    raise conn.lost(self.reconnect_timeout_s)
                await asyncio.sleep(0.02)
                continue
            wake = asyncio.Event()
            bell = conn.mailbox.fileno()
            died = False

            def on_died(wake: asyncio.Event = wake) -> None:
                nonlocal died
                died = True
                wake.set()

            loop.add_reader(bell, wake.set)
            loop.add_reader(pidfd, on_died)
            try:
                wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - now))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), wait)
            finally:
                loop.remove_reader(bell)
                loop.remove_reader(pidfd)
            conn.mailbox.clear_bell()
            if died:
                conn.broker_dead()  # reads what the broker wrote before it died
