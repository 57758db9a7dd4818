"""The remote clients' core: the same API as the local clients, over NATS JetStream through a session's gateway.

:class:`RemoteCore` is the asyncio core both front ends (:mod:`clients.remote_aio`,
:mod:`clients.remote_sync`) share: it publishes a
request durably (``Nats-Msg-Id`` = request id, so a retry or a second submit of
the same id is stored once), follows the request's live events, and collects
its one result from the session's results bucket, where it stays for a bounded
time; a client that reconnects with the same request id collects it there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from clients import fleet_wire as wire
from clients import handlers
from clients.core import HookHandler, PermissionHandler, TurnResult, monotonic, new_request_id
from clients.fleet_conn import FleetOptions, connect, redact
from clients.requests import HandlerFailure
from ipc import frames, names
from ipc.errors import BrokerUnavailable, FleetUnavailable, Interrupted, InvalidArgument, TurnTimeout

#: Longest wait without looking at the results bucket: notices are best effort (a NATS
#: restart or a gateway crash loses some), the stored result is not.
POLL_S = 1.0
#: The wait slice while an interruption check is set (how soon a recorded Ctrl-C stops a wait).
INTERRUPT_POLL_S = 0.25
PUBLISH_TIMEOUT_S = 5.0
#: How long a cancel or a lease's release waits for the gateway's answer.
CONTROL_TIMEOUT_S = 5.0
#: How often a remote client beats while it holds a lease (the gateway ends a lease whose beats stop).
LEASE_BEAT_S = 1.0

_TRANSIENT = (TimeoutError, nats.errors.Error, OSError)


@dataclass
class RemoteRequestState:
    """One request this remote client submitted."""

    req: str
    events: deque[dict[str, Any]] = field(default_factory=deque)
    turn: int = 0
    incarnation: str = ""
    preemptions: int = 0
    result: TurnResult | None = None
    #: This client's handlers that failed during the request (``result()`` raises :class:`HandlerError`).
    failures: list[HandlerFailure] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        """True once the result is in."""
        return self.result is not None

    def settle(self, stored: dict[str, Any]) -> None:
        """Take the stored result (and the handler failures the gateway stored with it)."""
        self.result = turn_result(stored)
        self.failures = [HandlerFailure(**f) for f in stored.get(wire.HANDLER_FAILURES, [])]
        self.changed.set()

    def outcome(self) -> TurnResult:
        """The result; raises :class:`HandlerError` if a handler failed, as a local turn's ``result()`` does."""
        assert self.result is not None, "only called once the request ended"
        if self.failures:
            raise handlers.error_for(self.failures, self.result)
        return self.result


def turn_result(d: dict[str, Any]) -> TurnResult:
    """A stored result dict back as a :class:`TurnResult`."""
    known = TurnResult.__dataclass_fields__
    return TurnResult(**{k: v for k, v in d.items() if k in known})


class RemoteCore:
    """One remote client's NATS connection and request table (asyncio)."""

    def __init__(self, session: str, kind: frames.Kind, opts: FleetOptions, *,
                 on_permission: PermissionHandler | None = None, on_hook: HookHandler | None = None,
                 label: str | None = None) -> None:
        if kind not in frames.KINDS:
            raise InvalidArgument(f"kind must be 'webhook' or 'worker', not {kind!r}", argument="kind")
        names.check_session(session)
        self.session = session
        self.kind: frames.Kind = kind
        self.opts = opts
        self.client_id = names.new_client_id()
        #: The broker's incarnation is not known remotely (the gateway's broker may change): empty.
        self.incarnation = ""
        #: Shown as the NATS connection's name (the broker sees the gateway's local client).
        self.label = label
        self.nc: NATS | None = None
        self.kv: KeyValue | None = None
        self.requests: dict[str, RemoteRequestState] = {}
        #: The caller's interruption check (:meth:`RemoteFront.interrupt_when`), asked between waits.
        self.interrupted: Callable[[], bool] | None = None
        #: Permission violations NATS reported for this connection (they come asynchronously).
        self.denied: list[str] = []
        self.handlers: dict[str, PermissionHandler | HookHandler] = {}
        #: Beats for the lease this client holds (see :data:`LEASE_BEAT_S`).
        self._beating: asyncio.Task[None] | None = None
        if on_permission is not None:
            self.handlers["can_use_tool"] = on_permission
        if on_hook is not None:
            self.handlers["hook_callback"] = on_hook

    def _unavailable(self, message: str, waited_s: float = 0.0) -> FleetUnavailable:
        """The typed error for this session and server (the URL without its password)."""
        return FleetUnavailable(message, url=redact(self.opts.url), session=self.session, waited_s=waited_s)

    async def connect(self) -> None:
        """Connect and find the session's results bucket (made by its gateway)."""
        nc = await connect(self.opts, session=self.session,
                           name=f"turnstile-{self.kind}-{self.label or self.client_id}",
                           on_error=self._on_nats_error)
        try:
            self.kv = await self._results_bucket(nc)
        except nats.js.errors.BucketNotFoundError:
            await nc.close()
            raise self._unavailable(
                f"no gateway has served session {self.session!r} on {redact(self.opts.url)}. Start one on the "
                f"session's host with: turnstile gateway --nats URL --session {self.session}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            await nc.close()
            raise self._unavailable(f"NATS at {redact(self.opts.url)} refused the session {self.session!r}: "
                                    f"{self._denial() or repr(exc)}") from None
        # Before any request: the gateway may answer before the publish returns.
        await nc.subscribe(wire.client_events_subject(self.session, self.client_id), cb=self._on_notice)
        if self.handlers:
            # Before any request names us as its answerer.
            await nc.subscribe(wire.ask_subject(self.session, self.client_id), cb=self._on_ask)
        self.nc = nc

    async def _results_bucket(self, nc: NATS) -> KeyValue:
        """The session's results bucket, asked again until the connect timeout while nobody answers.

        On a NATS cluster that just lost a server, the bucket has no leader until
        the others elect one (seconds): that is a wait, not a refusal.
        """
        js = nc.jetstream(timeout=max(1.0, min(5.0, self.opts.connect_timeout_s)))
        deadline = monotonic() + self.opts.connect_timeout_s
        while True:
            try:
                return await js.key_value(wire.results_bucket(self.session))
            except (TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                if self._denial() is not None or monotonic() >= deadline:  # a permission denial never heals
                    raise
            await asyncio.sleep(0.1)

    async def _on_ask(self, msg: Msg) -> None:
        # The same rules as a local client's handlers (clients.handlers): a handler that raises or
        # answers nonsense becomes a deny with the reason, never an unanswered agent.
        try:
            ask = wire.decode_ask(msg.data)
        except Exception:  # answered with an error, as a local client answers what it cannot handle
            reply = wire.AskReply(error="malformed question")
        else:
            handler = self.handlers.get(ask.subtype)
            if handler is None:
                reply = wire.AskReply(error=f"no handler for {ask.subtype}")
            else:
                answer = handlers.call(handler, ask.subtype, ask.data)
                if not isinstance(answer, handlers.Answer):
                    answer = await handlers.settle(answer, ask.subtype)
                reply = wire.AskReply(response=answer.response, error=answer.error,
                                      failure=None if answer.failure is None else answer.failure.reason)
        with contextlib.suppress(*_TRANSIENT):
            await msg.respond(wire.encode(reply))

    def _on_nats_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():  # nats-py lowercases server errors
            self.denied.append(str(exc))

    def _denial(self, subject: str = "") -> str | None:
        """The permission violation NATS reported (for ``subject``), if any."""
        for text in reversed(self.denied):
            if subject.lower() in text:
                return text
        return None

    def _nc(self) -> NATS:
        if self.nc is None:
            raise self._unavailable("not connected")
        return self.nc

    async def submit(self, msg: wire.RemoteRequest) -> RemoteRequestState:
        """Publish ``msg`` and return once JetStream has stored it."""
        st = self.requests.get(msg.req)
        if st is not None:
            return st
        st = RemoteRequestState(req=msg.req)
        self.requests[msg.req] = st
        try:
            ack = await self._publish(msg)
        except BaseException:
            self._forget(st)
            raise
        if ack.duplicate:
            await self.poll_result(st)  # submitted before (by us or an earlier client): it may be done
        return st

    async def _publish(self, msg: wire.RemoteRequest) -> Any:
        js = self._nc().jetstream()
        subject = wire.request_subject(self.session, msg.kind)
        data = wire.encode(msg)
        deadline = monotonic() + max(PUBLISH_TIMEOUT_S, self.opts.connect_timeout_s)
        while True:
            try:
                return await js.publish(subject, data, timeout=2.0, stream=wire.stream_name(self.session),
                                        headers={"Nats-Msg-Id": msg.req})
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
                detail = "no stream answered"
            except (TimeoutError, nats.errors.TimeoutError, nats.errors.ConnectionClosedError):
                detail = "no acknowledgement"
                denial = self._denial(subject)
                if denial is not None:  # no retry will be allowed either
                    raise self._unavailable(
                        f"NATS at {redact(self.opts.url)} does not let this identity submit {msg.kind} requests to "
                        f"session {self.session!r}: {denial}") from None
            except nats.js.errors.APIError as exc:
                raise self._unavailable(
                    f"NATS at {redact(self.opts.url)} refused the request for session {self.session!r}: {exc}"
                ) from None
            # Retrying is safe: the same Nats-Msg-Id is stored once (within the stream's de-dup window;
            # past it a second copy is stored, so a retry is no longer fresh: the gateway looks it up).
            if msg.fresh:
                msg = msgspec.structs.replace(msg, fresh=False)
                data = wire.encode(msg)
            if monotonic() >= deadline:
                raise self._unavailable(f"request for session {self.session!r} not stored by NATS at "
                                        f"{redact(self.opts.url)} ({detail})", PUBLISH_TIMEOUT_S)
            await asyncio.sleep(0.1)

    async def _on_notice(self, msg: Msg) -> None:
        try:
            n = wire.decode_notice(msg.data)
        except Exception:  # junk on our subject is ignored, as a local client ignores a bad frame
            return
        st = self.requests.get(n.req)
        if st is None or st.done:
            return
        if n.turn:
            st.turn = n.turn
        if n.incarnation:
            st.incarnation = n.incarnation
        if n.event is not None:
            if n.event.get("type") == "turnstile" and n.event.get("subtype") == "preempted":
                st.preemptions += 1
            st.events.append(n.event)
        if n.result is not None:
            st.settle(n.result)
        st.changed.set()

    async def poll_result(self, st: RemoteRequestState) -> None:
        """Look for the request's stored result (a missed notice, a reconnect, a duplicate submit)."""
        if self.kv is None or st.done:
            return
        try:
            entry = await self.kv.get(wire.escape(st.req))
        except nats.js.errors.KeyNotFoundError:
            return
        except _TRANSIENT:
            return  # NATS is reconnecting: the next poll looks again
        if entry.value:
            st.settle(wire.decode_result(entry.value))

    async def wait(self, st: RemoteRequestState, deadline: float | None, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()``; raise :class:`TurnTimeout` at ``deadline``."""
        while not ready():
            if self.interrupted is not None and self.interrupted():
                raise Interrupted("the wait was interrupted", session=self.session)
            now = monotonic()
            if deadline is not None and now >= deadline:
                raise TurnTimeout("no result in time", session=self.session)
            # A recorded Ctrl-C is acted on within a short slice, as a local client does.
            slice_s = POLL_S if self.interrupted is None else INTERRUPT_POLL_S
            wait = slice_s if deadline is None else max(0.0, min(slice_s, deadline - now))
            st.changed.clear()
            try:
                await asyncio.wait_for(st.changed.wait(), wait)
            except TimeoutError:
                await self.poll_result(st)
        if st.done:
            self._forget(st)

    def _forget(self, st: RemoteRequestState) -> None:
        self.requests.pop(st.req, None)

    async def cancel(self, st: RemoteRequestState) -> None:
        """Ask the gateway to cancel this request (queued in NATS, queued at the broker, or running)."""
        await self._control(wire.Control(op="cancel", client=self.client_id, target=st.req))

    async def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel the session's turn (incarnation, turn), whoever holds it."""
        await self._control(wire.Control(op="cancel_turn", incarnation=incarnation, turn=turn))

    async def _control(self, ctl: wire.Control) -> wire.ControlReply:
        try:
            msg = await self._nc().request(wire.control_subject(self.session), wire.encode(ctl),
                                           timeout=CONTROL_TIMEOUT_S)
        except (nats.errors.NoRespondersError, TimeoutError, nats.errors.TimeoutError):
            raise self._unavailable(f"no gateway answered for session {self.session!r} on {redact(self.opts.url)}",
                                    CONTROL_TIMEOUT_S) from None
        return wire.decode_control_reply(msg.data)

    async def close(self) -> None:
        """Leave. Submitted requests still run; their results stay collectable by request id."""
        await self._stop_beating()
        self.requests.clear()
        if self.nc is not None:
            with contextlib.suppress(*_TRANSIENT):
                await self.nc.close()
            self.nc = None

    def prompt_request(
        self, content: str | list[dict[str, Any]], *, model: str | None, on_preempt: frames.OnPreempt,
        resume_prompt: str | None, request_id: str | None,
    ) -> wire.RemoteRequest:
        """Build and validate a prompt request (bad input fails here, not at the broker)."""
        req = request_id or new_request_id()
        frame = frames.Prompt(client=self.client_id, req=req, kind=self.kind, content=content, model=model,
                              on_preempt=on_preempt, resume_prompt=resume_prompt)
        frames.decode_request(frames.encode(frame))
        return wire.RemoteRequest(op="prompt", client=self.client_id, req=req, kind=self.kind, content=content,
                                  model=model, on_preempt=on_preempt, resume_prompt=resume_prompt,
                                  handles=sorted(self.handlers), fresh=request_id is None)

    def lease_request(self, idle_timeout_s: float | None) -> wire.RemoteRequest:
        """Build a lease request (it travels in line with the client's prompts)."""
        return wire.RemoteRequest(op="lease", client=self.client_id, req=new_request_id(), kind=self.kind,
                                  idle_timeout_s=idle_timeout_s, beat_s=LEASE_BEAT_S, handles=sorted(self.handlers),
                                  fresh=True)

    async def hold_lease(self, idle_timeout_s: float | None, timeout_s: float | None) -> None:
        """Ask for a lease and wait until it is granted (or raise why not)."""
        st = await self.submit(self.lease_request(idle_timeout_s))
        deadline = None if timeout_s is None else monotonic() + timeout_s
        await self.wait(st, deadline, lambda: st.done)
        assert st.result is not None
        if not st.result.ok:
            raise BrokerUnavailable(f"lease not granted: {st.result.error_code or st.result.status}",
                                    session=self.session)
        # From this loop, not the caller's thread: a holder busy between its turns still beats.
        self._beating = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        beat = wire.encode(wire.Control(op="beat", client=self.client_id))
        while True:
            with contextlib.suppress(*_TRANSIENT):  # NATS away: the gateway does not count what it cannot get
                await self._nc().publish(wire.control_subject(self.session), beat)
            await asyncio.sleep(LEASE_BEAT_S)

    async def _stop_beating(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
            self._beating = None

    async def release_lease(self) -> None:
        """End this client's lease."""
        await self._stop_beating()
        await self._control(wire.Control(op="release", client=self.client_id))

    def model_request(self, model: str) -> wire.RemoteRequest:
        """Build and validate a set_model request."""
        req = new_request_id()
        frames.decode_request(frames.encode(frames.SetModel(client=self.client_id, req=req, kind=self.kind,
                                                            model=model)))
        return wire.RemoteRequest(op="set_model", client=self.client_id, req=req, kind=self.kind, model=model,
                                  handles=sorted(self.handlers), fresh=True)


class RemoteFront:
    """What both remote front ends put in place of the local connection: the link, identity, prompts.

    Mixed in before :class:`~clients.Client` / :class:`~clients.AsyncClient`, whose constructor
    (``BaseClient.__init__``) sets the common attributes and then calls :meth:`_open`.
    """

    session: str
    kind: frames.Kind
    connect_timeout_s: float
    _core: RemoteCore

    def _open(self, *, on_permission: PermissionHandler | None, on_hook: HookHandler | None, label: str | None,
              nats: str | FleetOptions | None) -> None:
        if nats is None:
            raise InvalidArgument("a remote client needs nats=URL", argument="nats")
        opts = nats if isinstance(nats, FleetOptions) else FleetOptions(url=nats,
                                                                         connect_timeout_s=self.connect_timeout_s)
        self._core = RemoteCore(self.session, self.kind, opts, on_permission=on_permission, on_hook=on_hook,
                                label=label)
        self._setup()

    def _setup(self) -> None:
        """What the front end does once the core exists."""

    def interrupt_when(self, check: Callable[[], bool] | None) -> None:
        """As :meth:`clients.Client.interrupt_when`: a wait raises :class:`~ipc.errors.Interrupted` once ``check()``."""
        self._core.interrupted = check

    def _link(self) -> RemoteCore:
        return self._core
