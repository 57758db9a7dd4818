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
from collections.abc import Iterator
from typing import Any

from clients.core import (
    Connection,
    HookHandler,
    PermissionHandler,
    RequestState,
    TurnResult,
    monotonic,
    new_request_id,
)
from ipc import frames
from ipc.errors import BrokerUnavailable, TurnTimeout

#: Longest single wait: a backstop in case a doorbell or pidfd wake-up is missed.
POLL_S = 0.25


class Turn:
    """One submitted prompt: iterate for its events, ``result()`` for its end."""

    def __init__(self, client: Client, st: RequestState) -> None:
        self._client = client
        self._st = st

    @property
    def request_id(self) -> str:
        """The id this request travels under (stable across broker restarts)."""
        return self._st.req

    @property
    def turn_id(self) -> int:
        """The broker's turn id once the turn started (0 before)."""
        return self._st.turn

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.events()

    def events(self, timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
        """The agent's stream-json objects of this turn, in order, until its result."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._st
        while True:
            while st.events:
                yield st.events.popleft()
            if st.done:
                return
            self._client._wait(deadline, lambda: bool(st.events) or st.done)

    def result(self, timeout_s: float | None = None) -> TurnResult:
        """Wait for the terminal result (events not yet read are kept for iteration)."""
        deadline = None if timeout_s is None else monotonic() + timeout_s
        st = self._st
        while st.result is None:
            self._client._wait(deadline, lambda: st.done)
        return st.result

    def cancel(self) -> None:
        """Cancel this request only (whichever turn runs it; a no-op once it ended)."""
        if not self._st.done:
            self._client._conn.cancel(self._st)


class Client:
    """A blocking connection to one session's broker."""

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
        self.reconnect_timeout_s = reconnect_timeout_s
        self._conn = Connection(session, kind, on_permission=on_permission, on_hook=on_hook)
        try:
            self._connect(connect_timeout_s)
        except BaseException:
            self._conn.close()
            raise

    @property
    def client_id(self) -> str:
        """This client's id."""
        return self._conn.client_id

    @property
    def incarnation(self) -> str:
        """The incarnation id of the broker this client is attached to."""
        return self._conn.incarnation

    def _connect(self, timeout_s: float) -> None:
        start = monotonic()
        while not self._conn.try_attach():
            if monotonic() - start >= timeout_s:
                raise self._conn.unavailable(timeout_s)
            # Nothing to wait on before a broker exists: poll its state block.
            select.select([], [], [], min(0.02, timeout_s))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave: the broker drops anything of ours still queued."""
        self._conn.close()

    # ------------------------------------------------------------ requests

    def prompt(
        self,
        content: str | list[dict[str, Any]],
        *,
        model: str | None = None,
        on_preempt: frames.OnPreempt | None = None,
        resume_prompt: str | None = None,
        request_id: str | None = None,
    ) -> Turn:
        """Submit a prompt; returns at once with a :class:`Turn`."""
        frame = self._conn.prompt_frame(
            content, model=model, on_preempt=on_preempt or self.on_preempt, resume_prompt=resume_prompt,
            request_id=request_id,
        )
        return Turn(self, self._conn.submit(frame))

    def set_model(self, model: str, *, timeout_s: float | None = None) -> TurnResult:
        """Switch the session's model (in line with other requests)."""
        st = self._conn.submit(frames.SetModel(
            client=self._conn.client_id, req=new_request_id(), kind=self.kind, model=model,
        ))
        return Turn(self, st).result(timeout_s)

    @contextlib.contextmanager
    def lease(self, *, idle_timeout_s: float | None = None, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the session across several turns (a worker lease yields to webhooks between turns)."""
        st = self._conn.submit(frames.Lease(
            client=self._conn.client_id, req=new_request_id(), kind=self.kind, idle_timeout_s=idle_timeout_s,
        ))
        res = Turn(self, st).result(timeout_s)
        if not st.granted:
            raise BrokerUnavailable(f"lease not granted: {res.error_code or res.status}")
        try:
            yield
        finally:
            if not self._conn.closed:
                self._conn._send(frames.Release(client=self._conn.client_id, req=new_request_id(), kind=self.kind))
                self._conn.lease_state = "none"

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel a turn by (incarnation, turn id), whoever holds it."""
        self._conn.cancel_turn(incarnation, turn)

    # ------------------------------------------------------------ waiting

    def _wait(self, deadline: float | None, ready: Any) -> None:
        """Wait for mailbox frames until ``ready()``; reattach across broker restarts."""
        conn = self._conn
        lost_at: float | None = None
        while True:
            conn.drain_mailbox()
            if ready():
                return
            now = monotonic()
            if deadline is not None and now >= deadline:
                raise TurnTimeout("no result in time", session=self.session)
            if conn.broker_pidfd is None:
                if lost_at is None:
                    lost_at = now
                if conn.try_attach():
                    lost_at = None
                    continue
                if now - lost_at >= self.reconnect_timeout_s:
                    raise conn.lost(self.reconnect_timeout_s)
                select.select([], [], [], 0.02)
                continue
            wait = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - now))
            fds = [conn.mailbox.fileno(), conn.broker_pidfd]
            readable, _, _ = select.select(fds, [], [], wait)
            if conn.mailbox.fileno() in readable:
                conn.mailbox.clear_bell()
            if conn.broker_pidfd in readable:
                conn.broker_dead()  # reads what the broker wrote before it died
