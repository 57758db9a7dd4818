"""The asyncio client: the same shape as :class:`clients.Client`, awaitable, shareable between tasks.

It waits on the mailbox doorbell and the broker's pidfd with
``loop.add_reader`` (both are pollable descriptors), never in a thread. One
:class:`Waiters` per client owns the two readers: when the doorbell rings it
drains the mailbox once, applies every frame to its request, and wakes only
the tasks waiting on a request whose state changed. So any number of
concurrent tasks can share one ``AsyncClient`` (as a web server shares one
HTTP client) and each wakes on its own frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from clients.base import BaseClient, BaseTurn
from clients.core import POLL_S, RETRY_S, Connection, RequestState, TurnResult, deadline_after, monotonic
from ipc.errors import TurnstileError

__all__ = ["POLL_S", "AsyncClient", "AsyncTurn", "Waiters"]


class AsyncTurn(BaseTurn):
    """One submitted prompt: ``async for`` its events, ``await result()``."""

    _client: AsyncClient

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self.events()

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline, st = deadline_after(timeout_s), self._st
        while True:
            for event in st.pop_events():
                yield event
            if st.done:
                return
            await self._client._wait(st, deadline, st.has_news)

    async def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result.

        Raises :class:`~clients.handlers.HandlerError` (carrying the result) if
        an ``on_permission``/``on_hook`` handler failed during the turn.
        """
        deadline, st = deadline_after(timeout_s), self._st
        while not st.done:
            await self._client._wait(st, deadline, lambda: st.done)
        return self._outcome()


class Waiters:
    """One reader per descriptor (doorbell, broker pidfd) for every task waiting on one connection.

    Invariant: a task waits only on a future registered under its request id,
    and every drain of the mailbox is followed by waking the futures of the
    requests it changed (all of them when the broker died), so no task can
    sleep through a frame for its request; the poll timeout is a backstop only.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.waiting: dict[str, list[asyncio.Future[None]]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.bell: int | None = None  # the descriptors with a reader installed now
        self.pidfd: int | None = None
        conn.on_detach = self.unwatch_broker  # the pidfd's reader goes before the fd is closed

    def watch(self) -> None:
        """Install the readers for the connection's descriptors on the running loop (idempotent)."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.unwatch()  # a new event loop (another asyncio.run): move the readers to it
            self.loop = loop
        if self.bell is None:
            self.bell = self.conn.mailbox.fileno()
            loop.add_reader(self.bell, self._on_bell)
        pidfd = self.conn.broker_pidfd
        if pidfd is not None and self.pidfd != pidfd:
            self.unwatch_broker()
            self.pidfd = pidfd
            loop.add_reader(pidfd, self._on_broker_died)

    def unwatch_broker(self) -> None:
        """Remove the pidfd's reader (before the connection closes the fd)."""
        if self.pidfd is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.pidfd)
        self.pidfd = None

    def unwatch(self) -> None:
        """Remove both readers."""
        self.unwatch_broker()
        if self.bell is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.remove_reader(self.bell)
        self.bell = None

    def drain(self) -> None:
        """Read the mailbox once and wake the tasks whose requests changed."""
        try:
            self.conn.drain_mailbox()
        finally:
            self.wake(self.conn.take_changed())

    def wake(self, reqs: set[str]) -> None:
        """Wake every task waiting on one of ``reqs``."""
        for req in reqs:
            for fut in self.waiting.pop(req, ()):
                if not fut.done():
                    fut.set_result(None)

    def wake_all(self) -> None:
        """Wake every waiting task (the broker died, or the mailbox failed)."""
        self.wake(set(self.waiting))

    def add(self, req: str, fut: asyncio.Future[None]) -> None:
        """Register a task's future under its request."""
        self.waiting.setdefault(req, []).append(fut)

    def discard(self, req: str, fut: asyncio.Future[None]) -> None:
        """Forget a future (woken, timed out or cancelled)."""
        futs = self.waiting.get(req)
        if futs is not None and fut in futs:
            futs.remove(fut)
            if not futs:
                del self.waiting[req]

    def _on_bell(self) -> None:
        self.conn.mailbox.clear_bell()  # before reading the ring: a later frame rings again
        try:
            self.drain()
        except TurnstileError:
            # A failed mailbox (client_too_slow, a broken ring): every waiter drains for
            # itself on waking and gets the error raised in its own task.
            self.wake_all()

    def _on_broker_died(self) -> None:
        self.unwatch_broker()
        try:
            self.conn.broker_dead()  # reads what the broker wrote before it died
        except TurnstileError:
            pass  # raised again to each waiter by its own drain
        finally:
            self.conn.take_changed()
            self.wake_all()  # every waiter reattaches (or gives up) on its own deadline


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncClient(BaseClient[AsyncTurn]):
    """An asyncio connection to one session's broker. Use ``async with AsyncClient(...) as c``.

    One client can be shared by any number of concurrent tasks of one event
    loop (a web server's handlers, say): each request wakes on its own frames.
    ``on_permission=`` / ``on_hook=`` may be plain functions or ``async def``.
    """

    #: The subclass ``AsyncClient(..., nats=URL)`` builds (see ``BaseClient.__new__``).
    _remote_class = "clients.remote_aio:RemoteAsyncClient"

    def _setup(self) -> None:
        self._waiters = Waiters(self._conn)
        self._tasks: set[asyncio.Task[None]] = set()
        self._conn.run_async = self._spawn

    async def connect(self) -> AsyncClient:
        """Attach to the broker, waiting up to ``connect_timeout_s``."""
        start = monotonic()
        while not self._conn.try_attach():
            if monotonic() - start >= self.connect_timeout_s:
                self._conn.close()
                raise self._conn.unavailable(self.connect_timeout_s)
            await asyncio.sleep(RETRY_S)
        self._waiters.watch()  # frames are handled from now on, waited for or not
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Leave."""
        for task in list(self._tasks):
            task.cancel()
        self._waiters.unwatch()
        self._conn.close()

    def _turn(self, st: RequestState) -> AsyncTurn:
        return AsyncTurn(self, st)

    async def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        return await AsyncTurn(self, self._conn.set_model(model)).result(timeout_s)

    @contextlib.asynccontextmanager
    async def lease(
        self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[None]:
        """Hold the session across several turns."""
        st = self._conn.lease(idle_timeout_s)
        self._conn.lease_granted(st, await AsyncTurn(self, st).result(timeout_s))
        try:
            yield
        finally:
            self._conn.release()

    # ------------------------------------------------------------ async handlers

    def _spawn(self, answer: Awaitable[None]) -> None:
        async def run() -> None:
            await answer

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a failed send: the broker's relay timeout answers the agent instead
        self._waiters.wake(self._conn.take_changed())

    # ------------------------------------------------------------ waiting

    def interrupt_when(self, check: Callable[[], bool] | None) -> None:
        """As :meth:`clients.Client.interrupt_when`: a wait raises :class:`~ipc.errors.Interrupted` between frames once
        ``check()`` is true (one waiting task gets it: make ``check`` true once per interruption)."""
        self._conn.interrupted = check

    async def _wait(self, st: RequestState, deadline: float | None, ready: Callable[[], bool]) -> None:
        conn = self._conn
        waiters = self._waiters
        loop = asyncio.get_running_loop()
        while True:
            waiters.drain()  # frames already in the ring (the backstop for a missed wake-up)
            if ready():
                return
            # conn.lost_at is shared by every task waiting on this client: the window starts when the first saw it.
            wait = conn.next_wait_s(deadline, self.reconnect_timeout_s)
            if conn.broker_pidfd is None:
                await asyncio.sleep(wait)
                continue
            waiters.watch()
            fut: asyncio.Future[None] = loop.create_future()
            waiters.add(st.req, fut)
            timer = loop.call_later(wait, _settle, fut)
            try:
                await fut
            finally:
                timer.cancel()
                waiters.discard(st.req, fut)
            conn.check_queue()  # our frames may sit in a queue nobody reads (one fstat)
