"""One session's remote requests: pulled from JetStream, run through local clients, results stored.

Exactly one result per request id, whatever dies:

* a request is acknowledged to JetStream only after its result is stored in the
  results bucket (``kv.create``: the first stored result wins, so a cancel that
  raced a finish cannot make a second one);
* a (re)delivered request is first looked up in the results bucket: if a result
  is there, it is acknowledged and not run again. The lookup is skipped only
  where no result can exist (see :meth:`SessionRelay.may_be_stored`): it is a
  round trip to NATS on every webhook's way to the agent;
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
import time
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
from clients.requests import HandlerFailure
from ipc import frames
from ipc.errors import TurnstileError

_TRANSIENT = (TimeoutError, nats.errors.Error, OSError)
FETCH_BATCH = 64
#: How long one pull request stays open on the server (an idle gateway asks again this often).
PULL_EXPIRES_S = 1.0
#: A lease ends when this many of its holder's beats in a row did not come (its client died or lost NATS).
MISSED_BEATS = 5
#: Cancels asked for requests not pulled yet, remembered at most (beyond it every request is looked up).
MAX_CANCELS_ASKED = 10_000
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


@dataclass
class HeldLease:
    """A lease held for a remote client: ended by its release, or when its holder's beats stop."""

    #: How often the holder said it beats (None: an older client that does not).
    beat_s: float | None
    release: asyncio.Event = field(default_factory=asyncio.Event)
    last_beat: float = 0.0


def _remote_failure(failure: HandlerFailure) -> dict[str, str]:
    """A failure the gateway's local client recorded, as the remote client reports it (its own reason)."""
    relayed = f"it raised {RemoteHandlerError.__name__}: "
    reason = failure.reason.removeprefix(relayed)
    return {"subtype": failure.subtype, "handler": failure.handler, "reason": reason}


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
        #: Stream sequence after which every message was published once this gateway's consumers
        #: existed and its control subscription listened (set by :meth:`start`).
        self.own_after_seq: int | None = None
        #: Ids of requests a cancel was asked for before they were pulled (see :meth:`may_be_stored`).
        self.cancels_asked: set[str] = set()
        self.stopping = asyncio.Event()
        #: Held leases by (remote client, kind).
        self.leases: dict[tuple[str, str], HeldLease] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ctl: Subscription | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Answer cancels and start pulling both kinds."""
        self._ctl = await self.nc.subscribe(wire.control_subject(self.session), cb=self._on_control)
        # The server has our control subscription before it answers this: a message stored after
        # the answer's last sequence can be cancelled only through us, and the consumers (made
        # afresh by this gateway before) are the only ones that ever delivered it.
        await self.nc.flush()
        info = await self.js.stream_info(wire.stream_name(self.session))
        self.own_after_seq = info.state.last_seq
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
        for held in self.leases.values():
            held.release.set()
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
        """Keep one pull request open on the kind's consumer; what it delivers is accepted as it arrives.

        Not ``fetch()``: it makes a new request, a task per message waited for, and waits for
        the server's end-of-batch status before returning, all on a webhook's way to the agent.
        """
        ended = asyncio.Event()  # the open request was used up or ended by the server
        left = 0
        refused = ""  # why the server ended the last request, unless it just expired

        async def on_msg(msg: Msg) -> None:
            nonlocal left, refused
            status = msg.headers.get("Status") if msg.headers else None
            if status:  # 408: expired; 409: refused (consumer gone, too many waiting pulls...)
                if status != "408":
                    refused = f"{status} {msg.headers.get('Description', '') if msg.headers else ''}"
                ended.set()
                return
            left -= 1
            if left <= 0:
                ended.set()
            try:
                await self._accept(kind, msg)
            except Exception as exc:  # one bad request must not stop the session's line
                self.log.error("fleet.accept_failed", kind=kind, error=repr(exc))
                with contextlib.suppress(*_TRANSIENT):
                    await msg.nak(delay=5.0)

        # Messages of one subscription reach its callback one at a time, in order.
        sub = await self.nc.subscribe(self.nc.new_inbox(), cb=on_msg)
        ask = msgspec.json.encode({"batch": FETCH_BATCH, "expires": int(PULL_EXPIRES_S * 1e9)})
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{wire.stream_name(self.session)}.{kind}"
        try:
            while not self.stopping.is_set():
                ended.clear()
                left = FETCH_BATCH
                try:
                    await self.nc.publish(subject, ask, reply=sub.subject)
                except _TRANSIENT as exc:  # NATS restarting: ask again once it is back
                    self.log.debug("fleet.pull_failed", kind=kind, error=repr(exc))
                    await asyncio.sleep(0.1)
                    continue
                # No end at all: the server lost the request (it restarted); ask again.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), PULL_EXPIRES_S + 1.0)
                if refused:  # not in a tight loop
                    self.log.debug("fleet.pull_refused", kind=kind, status=refused)
                    refused = ""
                    await asyncio.sleep(0.1)
        finally:
            with contextlib.suppress(*_TRANSIENT):
                await sub.unsubscribe()

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

    def may_be_stored(self, entry: InFlight) -> bool:
        """Whether a result may already be stored for this delivery (if not, the lookup is skipped).

        A cancel asked before the request was pulled marks it cancelled here.

        Results are stored only by gateways, for a request they pulled or were asked to
        cancel. None can exist for the first delivery (by consumers this gateway made) of a
        message stored after this gateway started listening, carrying an id its client made
        for this very publish (``fresh``), with no cancel asked for it: no other consumer ever
        delivered it, no earlier message had its id, and a cancel would have reached us.
        """
        r = entry.request
        if r.req in self.cancels_asked:
            self.cancels_asked.discard(r.req)
            entry.cancelled = True  # asked before it was pulled: it never runs
            return True
        if not r.fresh or self.own_after_seq is None or len(self.cancels_asked) >= MAX_CANCELS_ASKED:
            return True
        meta = entry.msg.metadata
        return meta.num_delivered != 1 or meta.sequence.stream <= self.own_after_seq

    async def _start(self, kind: frames.Kind, entry: InFlight) -> None:
        request = entry.request
        if self.may_be_stored(entry):
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
        except TurnstileError:
            self.inflight.pop(request.req, None)  # stopping: left in NATS for the next gateway
            return
        if request.op == "lease":
            entry.task = loop.create_task(self._run_lease(entry, local))
            return
        sent: AsyncTurn | TurnstileError | None = None
        if request.op == "prompt":
            # Sent now, not from the task: no event-loop hop on the way to the agent, and the
            # broker gets one kind's requests in the order they were pulled.
            try:
                sent = self._send_prompt(entry, local)
            except TurnstileError as exc:
                sent = exc
        entry.task = loop.create_task(self._run(entry, local, sent))

    def _send_prompt(self, entry: InFlight, local: AsyncClient) -> AsyncTurn:
        r = entry.request
        assert r.content is not None
        turn = entry.turn = local.prompt(r.content, model=r.model, on_preempt=r.on_preempt,
                                         resume_prompt=r.resume_prompt, request_id=r.req)
        if entry.cancelled:
            turn.cancel()
        return turn

    async def _run(self, entry: InFlight, local: AsyncClient, sent: AsyncTurn | TurnstileError | None) -> None:
        """Follow a request to its result (a prompt was sent already: ``sent``), store it, acknowledge it."""
        r = entry.request
        try:
            try:
                if isinstance(sent, TurnstileError):
                    raise sent
                if sent is None:
                    assert r.model is not None
                    res = await local.set_model(r.model)
                else:
                    turn = sent
                    async for ev in turn.events():
                        self._notify(r.client, wire.Notice(req=r.req, event=ev, turn=turn.turn_id,
                                                 incarnation=local.incarnation))
                    res = await turn.result()
                result = result_dict(res)
            except HandlerError as exc:  # the agent was answered (deny); the turn's result counts
                result = result_dict(exc.attrs["result"])
                # Stored with it, so the remote client's result() raises HandlerError as a local one does.
                result[wire.HANDLER_FAILURES] = [_remote_failure(f) for f in exc.attrs["failures"]]
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
        held = self.leases[key] = HeldLease(beat_s=r.beat_s)
        granted = False
        try:
            async with local.lease(idle_timeout_s=r.idle_timeout_s):
                granted = True
                held.last_beat = time.monotonic()
                await self._finish(entry, result_dict(TurnResult(status="ok", request_id=r.req)))
                # The prompts of the lease go through this same local client, marked as the lease's.
                await self._hold(held, r.client)
        except TurnstileError as exc:
            if not granted:
                await self._finish(entry, result_dict(TurnResult(
                    status="error", error_code=getattr(exc, "reason", exc.code), error=str(exc), request_id=r.req)))
        finally:
            if self.leases.get(key) is held:
                del self.leases[key]
            self.clients.release(r.client, r.kind)

    async def _hold(self, held: HeldLease, remote_client: str) -> None:
        """Until the lease is released, or its holder's beats stopped (it died, or lost NATS)."""
        if held.beat_s is None:  # a client that does not beat: released, or ended by the broker's idle timeout
            await held.release.wait()
            return
        while not held.release.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(held.release.wait(), held.beat_s)
            now = time.monotonic()
            if not self.nc.is_connected:
                held.last_beat = now  # our own link is down: no beat could reach us, none is missed
            elif now - held.last_beat > held.beat_s * MISSED_BEATS:
                self.log.warning("fleet.lease_lost", client=remote_client, silent_s=round(now - held.last_beat, 3))
                return

    def _asker(self, remote_client: str, subtype: str) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        """An ``async def`` handler for the local client that asks the remote client over NATS."""
        subject = wire.ask_subject(self.session, remote_client)

        async def ask(data: dict[str, Any]) -> dict[str, Any]:
            question = wire.encode(wire.Ask(subtype=subtype, data=data))
            reply = wire.decode_ask_reply((await self.nc.request(subject, question, timeout=ASK_TIMEOUT_S)).data)
            if reply.failure is not None:  # the local client records it on the request it belongs to
                raise RemoteHandlerError(reply.failure)
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
        self._notify(entry.request.client, wire.Notice(req=entry.request.req, result=stored))
        self.log.info("fleet.result", req=entry.request.req, kind=entry.request.kind, status=stored.get("status"))

    def _notify(self, remote_client: str, notice: wire.Notice) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(remote_client, notice))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _publish(self, remote_client: str, notice: wire.Notice) -> None:
        with contextlib.suppress(*_TRANSIENT):  # live notices are best effort; results are stored
            await self.nc.publish(wire.events_subject(self.session, remote_client, notice.req), wire.encode(notice))

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
        if ctl.op == "beat":  # published, not requested: no reply
            for kind in wire.CONSUMERS:
                held = self.leases.get((ctl.client, kind))
                if held is not None:
                    held.last_beat = time.monotonic()
            return
        if ctl.op == "release":
            for kind in wire.CONSUMERS:
                held = self.leases.get((ctl.client, kind))
                if held is not None:
                    held.release.set()
            await self._reply(msg, wire.ControlReply(ok=True, detail="released"))
            return
        if ctl.op == "cancel_turn":
            local = await self.clients.control(self.stopping)
            local.cancel_turn(ctl.incarnation, ctl.turn)
            await self._reply(msg, wire.ControlReply(ok=True, detail="cancel sent"))
            return
        entry = self.inflight.get(ctl.target)
        if entry is None and len(self.cancels_asked) < MAX_CANCELS_ASKED:
            # Before any await: if it is pulled meanwhile, it is looked up and never runs.
            self.cancels_asked.add(ctl.target)
        if entry is not None:
            entry.cancelled = True
            if entry.turn is not None:
                entry.turn.cancel()
            await self._reply(msg, wire.ControlReply(ok=True, detail="cancel sent"))
            return
        if await self._stored(ctl.target) is not None:
            self.cancels_asked.discard(ctl.target)  # finished: it is not pulled again
            await self._reply(msg, wire.ControlReply(ok=True, detail="already finished"))
            return
        # Not pulled yet: its result is the cancel; when pulled it is found stored and skipped.
        stored = await self._store(ctl.target, result_dict(TurnResult(status="cancelled", request_id=ctl.target)))
        self._notify(ctl.client, wire.Notice(req=ctl.target, result=stored))
        await self._reply(msg, wire.ControlReply(ok=True, detail="cancelled before it ran"))

    async def _reply(self, msg: Msg, reply: wire.ControlReply) -> None:
        with contextlib.suppress(*_TRANSIENT):
            await msg.respond(wire.encode(reply))
