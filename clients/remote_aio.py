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
from clients.core import HookHandler, PermissionHandler, TurnResult, monotonic
from clients.fleet_conn import FleetOptions
from clients.remote import RemoteCore, RemoteRequestState
from ipc import frames
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


class RemoteAsyncClient(AsyncClient):
    """``AsyncClient(session, kind, nats=URL)``: the asyncio client over NATS."""

    def __init__(
        self,
        session: str = "default",
        kind: frames.Kind = "worker",
        *,
        nats: str | FleetOptions | None = None,
        connect_timeout_s: float = 5.0,
        reconnect_timeout_s: float = 30.0,
        on_preempt: frames.OnPreempt = "requeue",
        on_permission: PermissionHandler | None = None,
        on_hook: HookHandler | None = None,
        label: str | None = None,
    ) -> None:
        assert nats is not None
        opts = FleetOptions.of(nats)
        if connect_timeout_s != opts.connect_timeout_s and not isinstance(nats, FleetOptions):
            opts = FleetOptions(url=opts.url, connect_timeout_s=connect_timeout_s)
        self.session = session
        self.kind = kind
        self.on_preempt: frames.OnPreempt = on_preempt
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_timeout_s = reconnect_timeout_s
        self._core = RemoteCore(session, kind, opts, on_permission=on_permission, on_hook=on_hook, label=label)
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def client_id(self) -> str:
        """This client's id."""
        return self._core.client_id

    @property
    def incarnation(self) -> str:
        """Not known remotely (the gateway's broker may change): empty."""
        return ""

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

    def prompt(
        self,
        content: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        on_preempt: frames.OnPreempt | None = None,
        resume_prompt: str | None = None,
        request_id: str | None = None,
    ) -> RemoteAsyncTurn:
        """Submit a prompt; returns at once (``await turn.submitted()`` waits for the durable store)."""
        msg = self._core.prompt_request(content, model=model, on_preempt=on_preempt or self.on_preempt,
                                        resume_prompt=resume_prompt, request_id=request_id)
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
