"""The blocking client.

```python
with Client(session="home", kind="webhook") as c:
    turn = c.prompt("review PR 12")
    for event in turn:          # the agent's stream-json objects of this turn
        ...
    result = turn.result()
```
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Callable, Iterator
from typing import Any

from clients.base import BaseClient, BaseTurn
from clients.core import POLL_S, RETRY_S, RequestState, TurnResult, deadline_after, monotonic
from ipc.errors import TurnstileError

__all__ = ["POLL_S", "Client", "ConcurrentUse", "Turn"]


class ConcurrentUse(TurnstileError):
    """A second thread called into a blocking :class:`Client` while another thread was using it."""

    code = "concurrent_use"


class Turn(BaseTurn):
    """One submitted prompt: iterate for its events, ``result()`` for its end."""

    _client: Client

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events()

    def events(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline, st = deadline_after(timeout_s), self._st
        while True:
            yield from st.pop_events()
            if st.done:
                return
            self._client._wait(deadline, st.has_news)

    def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result (events not yet read are kept for iteration).

        Raises :class:`~clients.handlers.HandlerError` (carrying the result) if
        an ``on_permission``/``on_hook`` handler failed during the turn.
        """
        deadline, st = deadline_after(timeout_s), self._st
        while not st.done:
            self._client._wait(deadline, lambda: st.done)
        return self._outcome()


class Client(BaseClient[Turn]):
    """A blocking connection to one session's broker.

    One thread at a time: a client is not shared by threads that use it at
    once (its mailbox has one reader). A call from a second thread while
    another is inside the client (waiting for a result, say) raises
    :class:`ConcurrentUse`; give each thread its own ``Client``, or share one
    :class:`~clients.AsyncClient` between concurrent tasks.
    """

    #: The subclass ``Client(..., nats=URL)`` builds (see ``BaseClient.__new__``).
    _remote_class = "clients.remote_sync:RemoteClient"

    def _setup(self) -> None:
        # Which thread is inside the client now, and how deep (a handler may call back in).
        self._guard = threading.Lock()
        self._user: int | None = None
        self._depth = 0
        try:
            self._connect(self.connect_timeout_s)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self, timeout_s: float) -> None:
        start = monotonic()
        while not self._conn.try_attach():
            if monotonic() - start >= timeout_s:
                raise self._conn.unavailable(timeout_s)
            # Nothing to wait on before a broker exists: poll its state block.
            select.select([], [], [], min(RETRY_S, timeout_s))

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the client for this thread; raise :class:`ConcurrentUse` if another thread holds it."""
        me = threading.get_ident()
        with self._guard:
            if self._user is not None and self._user != me:
                raise ConcurrentUse(
                    "this Client is in use by another thread: a blocking Client serves one thread at a time "
                    "(give each thread its own Client, or share an AsyncClient between tasks)",
                    session=self.session,
                )
            self._user = me
            self._depth += 1
        try:
            yield
        finally:
            with self._guard:
                self._depth -= 1
                if self._depth == 0:
                    self._user = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave: the broker drops anything of ours still queued."""
        with self._exclusive():
            self._conn.close()

    # ------------------------------------------------------------ requests

    def _turn(self, st: RequestState) -> Turn:
        return Turn(self, st)

    def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        with self._exclusive():
            return Turn(self, self._conn.set_model(model)).result(timeout_s)

    @contextlib.contextmanager
    def lease(self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the session across several turns (a worker lease yields to webhooks between turns)."""
        with self._exclusive():
            st = self._conn.lease(idle_timeout_s)
            self._conn.lease_granted(st, Turn(self, st).result(timeout_s))
        try:
            yield
        finally:
            with self._exclusive():
                self._conn.release()

    # ------------------------------------------------------------ waiting

    def interrupt_when(self, check: Callable[[], bool] | None) -> None:
        """Make every wait of this client raise :class:`~ipc.errors.Interrupted` once ``check()`` is true (None: never).

        ``check`` is asked only between reply frames, once every frame read so
        far was applied, and at least every :data:`POLL_S` while waiting: a
        command's SIGINT handler that only records the signal stops a wait here
        without losing a frame, then cancels the turn and waits on for its
        result. The library installs no signal handler of its own.
        """
        self._conn.interrupted = check

    def _wait(self, deadline: float | None, ready: Callable[[], bool]) -> None:
        """Wait for mailbox frames until ``ready()``; reattach across broker restarts."""
        with self._exclusive():
            self._wait_here(deadline, ready)

    def _wait_here(self, deadline: float | None, ready: Callable[[], bool]) -> None:
        conn = self._conn
        conn.lost_at = None  # a blocking wait counts its reconnect window from its own start
        while True:
            conn.drain_mailbox()
            conn.take_changed()  # only the asyncio client wakes waiters selectively
            if ready():
                return
            wait = conn.next_wait_s(deadline, self.reconnect_timeout_s)
            if conn.broker_pidfd is None:
                select.select([], [], [], wait)
                continue
            fds = [conn.mailbox.fileno(), conn.broker_pidfd]
            readable, _, _ = select.select(fds, [], [], wait)
            if not readable:
                conn.check_queue()  # nothing came: our frames may sit in a queue nobody reads
            if conn.mailbox.fileno() in readable:
                conn.mailbox.clear_bell()
            if conn.broker_pidfd in readable:
                conn.broker_dead()  # reads what the broker wrote before it died
