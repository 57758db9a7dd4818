"""The blocking remote client: ``Client(session, kind, nats=URL)``.

The NATS client library is asyncio only, so a blocking remote client runs the
shared :class:`~clients.remote.RemoteCore` on a private event loop in a daemon
thread and waits on its futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import uvloop

from clients.client import Client, Turn
from clients.core import TurnResult, monotonic
from clients.remote import RemoteFront, RemoteRequestState
from ipc.errors import FleetUnavailable

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()  # as the broker and the gateway run (its calls in are a little cheaper)
        self.thread = threading.Thread(target=self.loop.run_forever, name="turnstile-nats", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its value."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        """Stop the loop and join its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


class RemoteTurn(Turn):
    """A remote prompt: iterate for its events, ``result()`` for its end."""

    def __init__(self, client: RemoteClient, st: RemoteRequestState) -> None:
        self._rclient = client
        self._rst = st

    def _ids(self) -> RemoteRequestState:
        return self._rst

    def events(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._rst
        while True:
            while st.events:  # appended on the loop thread; deque appends and pops are atomic
                yield st.events.popleft()
            if st.done:
                return
            self._rclient._run(self._rclient._core.wait(st, deadline, lambda: bool(st.events) or st.done))

    def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result (events not yet read are kept for iteration)."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._rst
        self._rclient._run(self._rclient._core.wait(st, deadline, lambda: st.done))
        return st.outcome()

    def cancel(self) -> None:
        """Cancel this request only (a no-op once it ended)."""
        if not self._rst.done:
            self._rclient._run(self._rclient._core.cancel(self._rst))


class RemoteClient(RemoteFront, Client):
    """A blocking client of a session served by a gateway, over NATS."""

    def _setup(self) -> None:
        self._loop = _LoopThread()
        try:
            self._run(self._core.connect())
        except BaseException:
            self._loop.stop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run(coro)

    def close(self) -> None:
        """Leave (submitted requests still complete; collect them by request id)."""
        if self._loop.loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._core.close())
        self._loop.stop()

    def _submit_prompt(self, content: str | list[dict[str, Any]], **options: Any) -> RemoteTurn:
        return RemoteTurn(self, self._run(self._core.submit(self._core.prompt_request(content, **options))))

    def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        st = self._run(self._core.submit(self._core.model_request(model)))
        return RemoteTurn(self, st).result(timeout_s)

    @contextlib.contextmanager
    def lease(self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the session across several turns (a worker lease yields to webhooks between turns)."""
        self._run(self._core.hold_lease(idle_timeout_s, timeout_s))
        try:
            yield
        finally:
            with contextlib.suppress(FleetUnavailable):  # no gateway: the broker's idle timeout ends it
                self._run(self._core.release_lease())

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel a turn by (incarnation, turn id), whoever holds it."""
        self._run(self._core.cancel_turn(incarnation, turn))
