"""The asyncio remote client: ``AsyncClient(session, kind, nats=URL)``.

The same shape as :class:`clients.AsyncClient`; :meth:`RemoteAsyncClient.prompt`
returns at once, and ``await turn.submitted()`` waits until JetStream stored the
request (``events()`` and ``result()`` wait for that first).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from clients.aio import AsyncClient, AsyncTurn
from clients.core import TurnResult, monotonic
from clients.remote import RemoteCore, RemoteFront, RemoteRequestState
from ipc.errors import FleetUnavailable, TurnstileError


class RemoteAsyncTurn(AsyncTurn):
    """A remote prompt: ``async for`` its events, ``await result()``."""

    def __init__(self, client: RemoteAsyncClient, submitting: asyncio.Task[RemoteRequestState], req: str) -> None:
        self._rclient = client
        self._submitting = submitting
        self._req = req

    async def submitted(self) -> None:
        """Wait until JetStream stored the request (raises what the submit raised)."""
        await self._submitting

    @property
    def request_id(self) -> str:
        """The id this request travels under."""
        return self._req

    @property
    def turn_id(self) -> int:
        """The broker's turn id once the turn started (0 before)."""
        if not self._submitting.done() or self._submitting.exception() is not None:
            return 0
        return self._submitting.result().turn

    async def events(self, timeout_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = await self._submitting
        while True:
            while st.events:
                yield st.events.popleft()
            if st.done:
                return
            await self._rclient._core.wait(st, deadline, lambda: bool(st.events) or st.done)

    async def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = await self._submitting
        await self._rclient._core.wait(st, deadline, lambda: st.done)
        return st.outcome()

    def cancel(self) -> None:
        """Cancel this request only (sent once it is stored)."""
        core = self._rclient._core
        task = asyncio.get_running_loop().create_task(self._cancel(core))
        self._rclient._background.add(task)
        task.add_done_callback(self._rclient._background.discard)

    async def _cancel(self, core: RemoteCore) -> None:
        st = await self._submitting
        if not st.done:
            await core.cancel(st)


class RemoteAsyncClient(RemoteFront, AsyncClient):
    """``AsyncClient(session, kind, nats=URL)``: the asyncio client over NATS."""

    def _setup(self) -> None:
        self._background: set[asyncio.Task[Any]] = set()

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel a turn by (incarnation, turn id), whoever holds it."""
        task = asyncio.get_running_loop().create_task(self._core.cancel_turn(incarnation, turn))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def connect(self) -> RemoteAsyncClient:
        """Connect to NATS and find the session."""
        await self._core.connect()
        return self

    async def __aenter__(self) -> RemoteAsyncClient:
        return await self.connect()

    async def close(self) -> None:
        """Leave (submitted requests still complete; collect them by request id)."""
        for task in list(self._background):
            with contextlib.suppress(TurnstileError):
                await task
        await self._core.close()

    def _submit_prompt(self, content: str | list[dict[str, Any]], **options: Any) -> RemoteAsyncTurn:
        msg = self._core.prompt_request(content, **options)
        task = asyncio.get_running_loop().create_task(self._core.submit(msg))
        return RemoteAsyncTurn(self, task, msg.req)

    async def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        st = await self._core.submit(self._core.model_request(model))
        deadline = None if timeout_s is None else monotonic() + timeout_s
        await self._core.wait(st, deadline, lambda: st.done)
        assert st.result is not None
        return st.result

    @contextlib.asynccontextmanager
    async def lease(
        self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None
    ) -> AsyncIterator[None]:
        """Hold the session across several turns (a worker lease yields to webhooks between turns)."""
        await self._core.hold_lease(idle_timeout_s, timeout_s)
        try:
            yield
        finally:
            with contextlib.suppress(FleetUnavailable):  # no gateway: the broker's idle timeout ends it
                await self._core.release_lease()
