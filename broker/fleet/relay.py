"""One session's remote requests: pulled from JetStream, run through local clients, results stored.

Exactly one result per request id, whatever dies:

* a request is acknowledged to JetStream only after its result is stored in the
  results bucket (``kv.create``: the first stored result wins, so a cancel that
  raced a finish cannot make a second one);
* a (re)delivered request is first looked up in the results bucket: if a result
  is there, it is acknowledged and not run again;
* a redelivery of a request that is running here (the ack wait ran out during a
  NATS restart) only replaces the message handle that will be acknowledged;
* the local broker de-duplicates a request id its client sent twice.

Requests of one kind are handed to the broker in the order they were pulled,
each kind by its own loop, so a worker backlog never delays a webhook and remote
webhooks join the broker's one webhook FIFO in arrival order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue

from broker.fleet.locals import LocalClients
from clients import fleet_wire as wire
from clients.aio import AsyncClient, AsyncTurn
from clients.core import TurnResult
from clients.handlers import HandlerError
from ipc import frames
from ipc.errors import TurnstileError

_TRANSIENT = (TimeoutError, nats.errors.Error, OSError)
FETCH_BATCH = 64
#: Longest wait for a remote handler's answer (the broker gives the holder 60 s by default).
ASK_TIMEOUT_S = 50.0


class RemoteHandlerError(TurnstileError):
    """The remote client's handler failed, or did not answer in time; the agent is told so."""

    code = "remote_handler_error"


@dataclass
class InFlight:
    """A request pulled and not yet acknowledged."""

    request: wire.RemoteRequest
    msg: Msg  # the latest delivery: the one acknowledged
    cancelled: bool = False
    turn: AsyncTurn | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def result_dict(res: TurnResult) -> dict[str, Any]:
    """What is stored for a finished request: the local result, as the remote client rebuilds it."""
    return {**res.as_dict(), "raw": res.raw}


class SessionRelay:
    """Serves one session's remote requests until stopped."""

    def __init__(self, nc: NATS, session: str, results: KeyValue, clients: LocalClients, log: Any,
                 *, ack_wait_s: float, idle_client_s: float = 30.0) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.session = session
        self.results = results
        self.clients = clients
        self.log = log.bind(session=session)
        self.ack_wait_s = ack_wait_s
        self.idle_client_s = idle_client_s
        self.inflight: dict[str, InFlight] = {}
        self.stopping = asyncio.Event()
        #: Held leases by (remote client, kind): set the event to release.
        self.leases: dict[tuple[str, str], asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ctl: Subscription | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Answer cancels and start pulling both kinds."""
        self._ctl = await self.nc.subscribe(wire.control_subject(self.session), cb=self._on_control)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._pull(kind)) for kind in ("webhook", "worker")]
        self._tasks.append(loop.create_task(self._tick()))

    async def stop(self, drain_timeout_s: float) -> None:
        """Stop pulling; give running requests ``drain_timeout_s`` to finish; leave the rest to NATS."""
        self.stopping.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for release in self.leases.values():
            release.set()
        running = [e.task for e in self.inflight.values() if e.task is not None]
        if running:
            _, pending = await asyncio.wait(running, timeout=drain_timeout_s)
            for t in pending:
                t.cancel()  # not acknowledged: redelivered to the next gateway
        if self._ctl is not None:
            with contextlib.suppress(*_TRANSIENT):
                await self._ctl.unsubscribe()

    # ------------------------------------------------------------ pulling

    async def _pull(self, kind: frames.Kind) -> None:
        psub = await self.js.pull_subscribe_bind(durable=kind, stream=wire.stream_name(self.session))
        while not self.stopping.is_set():
            try:
                msgs = await psub.fetch(FETCH_BATCH, timeout=1.0)
            except TimeoutError:
                continue
            except _TRANSIENT as exc:  # NATS restarting: the subscription comes back with the connection
                self.log.debug("fleet.fetch_failed", kind=kind, error=repr(exc))
                await asyncio.sleep(0.1)
                continue
            for msg in msgs:
                try:
                    await self._accept(kind, msg)
                except Exception as exc:  # one bad request must not stop the session's line
                    self.log.error("fleet.accept_failed", kind=kind, error=repr(exc))
                    with contextlib.suppress(*_TRANSIENT):
                        await msg.nak(delay=5.0)

    async def _accept(self, kind: frames.Kind, msg: Msg) -> None:
        try:
            request = wire.decode_request(msg.data)
            if not request.req:
                raise msgspec.ValidationError("a request needs a request id")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.log.warning("fleet.bad_request", kind=kind, error=str(exc))
            with contextlib.suppress(*_TRANSIENT):
                await msg.term()  # never deliver it again
            return
        # The subject decides the kind: NATS permissions are granted per subject.
        request.kind = kind
        entry = self.inflight.get(request.req)
        if entry is not None:
            entry.msg = msg  # a redelivery of a request running here
            return
        entry = InFlight(request=request, msg=msg)
        self.inflight[request.req] = entry
        try:
            await self._start(kind, entry)
        except BaseException:
            if entry.task is None:  # not started: a redelivery must not be taken for a running request
                self.inflight.pop(request.req, None)
            raise

    async def _start(self, kind: frames.Kind, entry: InFlight) -> None:
        request = entry.request
        stored = await self._stored(request.req)
        if stored is not None:  # finished before (its ack was lost): acknowledge, do not rerun
            await self._close(entry, stored)
            return
        if entry.cancelled:
            await self._finish(entry, result_dict(TurnResult(status="cancelled", request_id=request.req)))
            return
        loop = asyncio.get_running_loop()
        try:
            asks = {subtype: self._asker(request.client, subtype) for subtype in request.handles}
            local = await self.clients.acquire(
                request.client, kind, self.stopping, on_permission=asks.get("can_use_tool"),
                on_hook=asks.get("hook_callback"))
            run = self._run_lease if request.op == "lease" else self._run
            entry.task = loop.create_task(run(entry, local))
        except TurnstileError:
            self.inflight.pop(request.req, None)  # stopping: left in NATS for the next gateway

    async def _run(self, entry: InFlight, local: AsyncClient) -> None:
        r = entry.request
        try:
            try:
                if r.op == "set_model":
                    assert r.model is not None
                    res = await local.set_model(r.model)
                else:
                    assert r.content is not None
                    turn = local.prompt(r.content, model=r.model, on_preempt=r.on_preempt,
                                        resume_prompt=r.resume_prompt, request_id=r.req)
                    entry.turn = turn
                    if entry.cancelled:
                        turn.cancel()
                    async for ev in turn.events():
                        self._notify(wire.Notice(req=r.req, event=ev, turn=turn.turn_id,
                                                 incarnation=local.incarnation))
                    res = await turn.result()
                result = result_dict(res)
            except HandlerError as exc:  # the agent was answered (deny); the turn's result counts
                result = result_dict(exc.attrs["result"])
            except TurnstileError as exc:
                result = result_dict(TurnResult(status="error", error_code=getattr(exc, "reason", exc.code),
                                                error=str(exc), request_id=r.req))
            await self._finish(entry, result)
        finally:
            self.clients.release(r.client, r.kind)

    async def _run_lease(self, entry: InFlight, local: AsyncClient) -> None:
        """Hold a lease for the remote client until it releases it (its grant is the request's result)."""
        r = entry.request
        key = (r.client, r.kind)
        release = self.leases[key] = asyncio.Event()
        granted = False
        try:
            async with local.lease(idle_timeout_s=r.idle_timeout_s):
                granted = True
                await self._finish(entry, result_dict(TurnResult(status="ok", request_id=r.req)))
                # The prompts of the lease go through this same local client, marked as the lease's.
                await release.wait()
        except TurnstileError as exc:
            if not granted:
                await self._finish(entry, result_dict(TurnResult(
                    status="error", error_code=getattr(exc, "reason", exc.code), error=str(exc), request_id=r.req)))
        finally:
            if self.leases.get(key) is release:
                del self.leases[key]
            self.clients.release(r.client, r.kind)

    def _asker(self, remote_client: str, subtype: str) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        """An ``async def`` handler for the local client that asks the remote client over NATS."""
        subject = wire.ask_subject(self.session, remote_client)

        async def ask(data: dict[str, Any]) -> dict[str, Any]:
            question = wire.encode(wire.Ask(subtype=subtype, data=data))
            reply = wire.decode_ask_reply((await self.nc.request(subject, question, timeout=ASK_TIMEOUT_S)).data)
            if reply.error is not None:
                raise RemoteHandlerError(reply.error)
            return reply.response or {}

        return ask

    # ------------------------------------------------------------ results

    async def _stored(self, req: str) -> dict[str, Any] | None:
        while True:
            try:
                entry = await self.results.get(wire.escape(req))
            except nats.js.errors.KeyNotFoundError:
                return None
            except _TRANSIENT:
                await asyncio.sleep(0.2)  # NATS away: the answer decides whether the request runs
                continue
            return wire.decode_result(entry.value) if entry.value else None

    async def _store(self, req: str, result: dict[str, Any]) -> dict[str, Any]:
        """Store ``result`` unless one is stored already; return the one that counts."""
        while True:
            try:
                await self.results.create(wire.escape(req), wire.encode(result))
                return result
            except nats.js.errors.KeyWrongLastSequenceError:
                return await self._stored(req) or result
            except _TRANSIENT:
                await asyncio.sleep(0.2)

    async def _finish(self, entry: InFlight, result: dict[str, Any]) -> None:
        # Order matters: stored, then acknowledged. A crash in between leaves a
        # redelivery that finds the stored result and is only acknowledged.
        await self._close(entry, await self._store(entry.request.req, result))

    async def _close(self, entry: InFlight, stored: dict[str, Any]) -> None:
        for _ in range(40):
            try:
                await entry.msg.ack_sync(timeout=2.0)
                break
            except nats.errors.MsgAlreadyAckdError:
                break
            except _TRANSIENT:
                await asyncio.sleep(0.25)
        else:
            self.log.warning("fleet.ack_failed", req=entry.request.req)  # redelivered, found stored
        self.inflight.pop(entry.request.req, None)
        self._notify(wire.Notice(req=entry.request.req, result=stored))
        self.log.info("fleet.result", req=entry.request.req, kind=entry.request.kind, status=stored.get("status"))

    def _notify(self, notice: wire.Notice) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(notice))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _publish(self, notice: wire.Notice) -> None:
        with contextlib.suppress(*_TRANSIENT):  # live notices are best effort; results are stored
            await self.nc.publish(wire.events_subject(self.session, notice.req), wire.encode(notice))

    # ------------------------------------------------------------ keeping time

    async def _tick(self) -> None:
        while not self.stopping.is_set():
            await asyncio.sleep(self.ack_wait_s / 3)
            for entry in list(self.inflight.values()):
                with contextlib.suppress(*_TRANSIENT):
                    await entry.msg.in_progress()  # still running: do not deliver it again
            await self.clients.reap(self.idle_client_s)

    # ------------------------------------------------------------ cancels

    async def _on_control(self, msg: Msg) -> None:
        try:
            ctl = wire.decode_control(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._reply(msg, wire.ControlReply(ok=False, detail=f"bad control message: {exc}"))
            return
        if ctl.op == "release":
            for kind in ("webhook", "worker"):
                held = self.leases.get((ctl.client, kind))
                if held is not None:
                    held.set()
            await self._reply(msg, wire.ControlReply(ok=True, detail="released"))
            return
        if ctl.op == "cancel_turn":
            local = await self.clients.control(self.stopping)
            local.cancel_turn(ctl.incarnation, ctl.turn)
            await self._reply(msg, wire.ControlReply(ok=True, detail="cancel sent"))
            return
        entry = self.inflight.get(ctl.target)
        if entry is not None:
            entry.cancelled = True
            if entry.turn is not None:
                entry.turn.cancel()
            await self._reply(msg, wire.ControlReply(ok=True, detail="cancel sent"))
            return
        if await self._stored(ctl.target) is not None:
            await self._reply(msg, wire.ControlReply(ok=True, detail="already finished"))
            return
        # Not pulled yet: its result is the cancel; when pulled it is found stored and skipped.
        stored = await self._store(ctl.target, result_dict(TurnResult(status="cancelled", request_id=ctl.target)))
        self._notify(wire.Notice(req=ctl.target, result=stored))
        await self._reply(msg, wire.ControlReply(ok=True, detail="cancelled before it ran"))

    async def _reply(self, msg: Msg, reply: wire.ControlReply) -> None:
        with contextlib.suppress(*_TRANSIENT):
            await msg.respond(wire.encode(reply))
