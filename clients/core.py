"""The connection core the blocking and the asyncio client share: everything but waiting.

This module attaches to the broker, builds and sends every request frame
(prompt, set_model, lease, release, cancel), digests reply frames into the
request table and answers the agent's requests with the caller's handlers.
The two front ends (:mod:`clients.client`, :mod:`clients.aio`) only differ in
how they wait for the mailbox doorbell and the broker's pidfd. A client
resubmits every request that has no result yet, with the same request id,
when it sees a new broker incarnation; the broker de-duplicates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from clients import handlers
from clients.handlers import Handler
from clients.requests import RequestState, TurnResult, new_request_id
from ipc import defaults, frames, mailbox, names, reach, rqueue, state
from ipc.errors import (
    BrokerUnavailable,
    Interrupted,
    InvalidArgument,
    IPCError,
    LimitError,
    ProtocolError,
    QueueFull,
    QueueGone,
    StateDamaged,
    TurnstileError,
    TurnTimeout,
)

log = logging.getLogger("turnstile.client")

#: The handler types, by the constructor argument they are given as.
PermissionHandler = Handler
HookHandler = Handler

#: Longest single wait: a backstop in case a doorbell or pidfd wake-up is missed.
POLL_S = 0.25
#: Between tries to reattach while no broker is attached: there is nothing to wait on but its state block.
RETRY_S = 0.02

__all__ = [
    "POLL_S", "RETRY_S", "Connection", "HookHandler", "PermissionHandler", "RequestState", "TurnResult",
    "deadline_after", "monotonic", "new_request_id", "start_command",
]


def start_command(session: str) -> str:
    """What to run to start a broker for ``session`` (for error messages)."""
    return f"turnstile serve --session {session}" if session != "default" else "turnstile serve"


class Connection:
    """One client's mailbox, request-queue handle, state-block view and request table."""

    def __init__(
        self,
        session: str,
        kind: frames.Kind,
        *,
        on_permission: PermissionHandler | None = None,
        on_hook: HookHandler | None = None,
        send_timeout_s: float = defaults.SEND_TIMEOUT_S,
        mailbox_capacity: int = mailbox.DEFAULT_CAPACITY,
        label: str | None = None,
    ) -> None:
        if kind not in frames.KINDS:
            raise InvalidArgument(f"kind must be 'webhook' or 'worker', not {kind!r}", argument="kind")
        names.check_session(session)
        self.label = frames.check_label(label)
        self.session = session
        self.kind: frames.Kind = kind
        self.client_id = names.new_client_id()
        self.on_permission = on_permission
        self.on_hook = on_hook
        self.send_timeout_s = send_timeout_s
        self.pid, self.start_time = names.self_identity()
        self.mailbox = mailbox.MailboxReader(session, self.client_id, capacity=mailbox_capacity)
        self.rq: rqueue.RequestQueue | None = None
        self.block: state.StateBlock | None = None
        self.incarnation = ""
        self.broker_pid = 0
        self.broker_pidfd: int | None = None
        self.requests: dict[str, RequestState] = {}
        self.lease_state: str = "none"  # none | waiting | held
        self.closed = False
        #: The broker's refusal of this connection (it could not open our mailbox), if it sent one.
        self.refusal: frames.Error | None = None
        #: A resubmission asked of an attach whose hello found the queue full: done on the next attach.
        self.resubmit_due = False
        # Ids of requests whose state changed since the last take_changed(): the asyncio
        # front end wakes only those requests' waiters.
        self.changed: set[str] = set()
        #: Called before the broker's pidfd is closed, so a waiter can stop watching it first.
        self.on_detach: Callable[[], None] | None = None
        #: Runs an async handler's answer (the asyncio front end sets it; the blocking one cannot).
        self.run_async: Callable[[Awaitable[None]], None] | None = None
        #: Errors the broker sent that name no request of ours (a frame it could not
        #: attribute): kept (the last 100) and logged, never dropped silently.
        self.errors: deque[frames.Error] = deque(maxlen=100)
        #: Why the last attach failed, when that says more than "no broker" (a damaged state block).
        self.attach_error: TurnstileError | None = None
        #: When a waiter first saw no broker attached (None while one is): the reconnect window's start.
        self.lost_at: float | None = None
        #: The caller's interrupt check, asked by every wait between frames (``Client.interrupt_when``).
        self.interrupted: Callable[[], bool] | None = None

    # ------------------------------------------------------------ broker discovery

    def try_attach(self, *, resubmit: bool = False) -> bool:
        """Attach to the session's live broker if there is one; True when attached (or already).

        Every request without a result is sent again when the broker is a new
        one, or when ``resubmit`` says the old queue may have swallowed frames.
        """
        try:
            block = state.StateBlock.open(self.session)
        except StateDamaged as exc:
            self.attach_error = exc  # its broker, if alive, repairs it: the caller keeps trying
            return False
        except (FileNotFoundError, IPCError):
            return False
        try:
            snap = block.snapshot()
        except IPCError as exc:
            self.attach_error = exc if isinstance(exc, StateDamaged) else None
            block.close()
            return False
        if not snap.broker_alive:
            block.close()
            return False
        try:
            rq = rqueue.RequestQueue.open(self.session)
        except IPCError:
            block.close()
            return False
        try:
            pidfd = os.pidfd_open(snap.record.broker_pid)
        except OSError:
            block.close()
            rq.close()
            return False
        if names.proc_start_time(snap.record.broker_pid) != snap.record.broker_start:
            os.close(pidfd)
            block.close()
            rq.close()
            return False
        self._detach()
        self.attach_error = None
        self.block, self.rq, self.broker_pidfd = block, rq, pidfd
        self.broker_pid = snap.record.broker_pid
        try:
            self._send(frames.Hello(
                client=self.client_id, kind=self.kind, pid=self.pid, start_time=self.start_time,
                handles=self._handles(), label=self.label,
            ))
        except QueueFull as exc:
            # A live broker that has not drained its queue yet (a burst of hellos on a loaded
            # machine): not attached yet. The caller keeps trying until its own connect or
            # reconnect deadline, not just one send wait; the incarnation is taken only once
            # the hello went in, so the resubmission below still happens then.
            self._detach()
            self.attach_error = exc
            self.resubmit_due = self.resubmit_due or resubmit
            return False
        changed = snap.record.incarnation != self.incarnation
        self.incarnation = snap.record.incarnation
        if changed or resubmit or self.resubmit_due:
            self.resubmit_due = False
            self._resubmit()
        return True

    def check_queue(self) -> bool:
        """Reattach if our request queue's name was removed and a broker serves a new one; True if it did.

        What systemd-logind's ``RemoveIPC=yes`` does to a running broker's
        queue: the broker recreates it and reads only the new one, so frames
        this client sends to the old one would never be read. Requests that
        may have been sent there are resubmitted (same ids: the broker answers
        a duplicate, never reruns it). Until a new queue exists the old one is
        kept: the broker reads what is in it when it moves.
        """
        if self.rq is None or not self.rq.unlinked():
            return False
        return self.try_attach(resubmit=True)

    def _handles(self) -> list[str]:
        out = []
        if self.on_permission is not None:
            out.append("can_use_tool")
        if self.on_hook is not None:
            out.append("hook_callback")
        return out

    def _detach(self) -> None:
        if self.broker_pidfd is not None:
            if self.on_detach is not None:
                self.on_detach()
            with contextlib.suppress(OSError):
                os.close(self.broker_pidfd)
            self.broker_pidfd = None
        if self.rq is not None:
            self.rq.close()
            self.rq = None
        if self.block is not None:
            self.block.close()
            self.block = None

    def broker_dead(self) -> None:
        """The broker's pidfd fired: read what it left, forget it until a new one is attached."""
        try:
            self.drain_mailbox()
        finally:
            # A broker that died while streaming a large frame into our ring published
            # only its head; the next broker writes its frames right after those bytes,
            # so the head would swallow them. The dead broker's complete frames were
            # read just now: what is left can never complete. Detached even if the
            # read failed, so nobody waits on a dead pidfd.
            self.mailbox.discard_partial()
            self._detach()

    def _resubmit(self) -> None:
        # A new broker knows nothing of what the old one accepted: send again every
        # request without a result, same ids (the broker de-duplicates).
        if self.lease_state == "held":
            self.lease_state = "none"
        for st in list(self.requests.values()):
            if st.result is None:
                st.accepted = False
                if st.attempts:
                    # It ran (maybe partly: tools and all) on the dead broker: its next start is a rerun.
                    st.rerun_cause = "broker_restarted"
                self._send(st.frame)
                if st.cancelled:
                    # A cancel the dead broker never read, or one sent while none
                    # ran (the new broker finds it before the request, stale): the
                    # request must not run uncancelled on the new broker.
                    self.cancel(st)

    def lost(self, waited_s: float) -> BrokerUnavailable:
        """No broker came back in ``waited_s``: end every request without a result; return the error.

        The requests end with an ``error``/``broker_unavailable`` result, so a
        later ``result()`` returns it at once instead of waiting all over again.
        """
        err = self.unavailable(waited_s)
        for st in self.requests.values():
            if st.result is None:
                st.result = TurnResult(status="error", error_code="broker_unavailable", error=str(err),
                                       request_id=st.req, preemptions=st.preemptions)
        return err

    def unavailable(self, waited_s: float) -> BrokerUnavailable:
        """The error for 'no broker came' (or 'its state block stayed damaged', or 'its queue stayed full').

        :class:`BrokerUnreachable` when one runs out of this process's reach.
        """
        def error(message: str, **facts: Any) -> BrokerUnavailable:
            return BrokerUnavailable(message, session=self.session, waited_s=waited_s, **facts)

        if isinstance(self.attach_error, StateDamaged):
            return error(f"session {self.session!r} has a damaged state block (waited {waited_s:g} s): "
                         f"{self.attach_error}", damaged=True)
        if isinstance(self.attach_error, QueueFull):
            return error(f"the broker of session {self.session!r} did not take this client's hello "
                         f"(waited {waited_s:g} s): {self.attach_error}")
        found = reach.diagnose(self.session)
        if found is not None:
            return found.error(self.session, waited_s)
        return error(f"no broker serves session {self.session!r} (waited {waited_s:g} s). "
                     f"Start one with: {start_command(self.session)}")

    def next_wait_s(self, deadline: float | None, reconnect_timeout_s: float) -> float:
        """One pass of a front end's wait loop, once the mailbox was read and the waiter is not ready yet.

        Returns how long to wait now: on the doorbell and the broker's pidfd (at
        most :data:`POLL_S`, never past ``deadline``) while a broker is attached;
        otherwise, after a failed try to reattach, a plain :data:`RETRY_S` sleep
        (0 when the try succeeded: look at the mailbox again at once). Raises
        :class:`TurnTimeout` at ``deadline``, and :meth:`lost`'s error once no
        broker came back for ``reconnect_timeout_s``, and :class:`Interrupted`
        once the caller's :attr:`interrupted` check says so: called after every
        frame read was applied, so this is between frames.
        """
        if self.interrupted is not None and self.interrupted():
            raise Interrupted("the wait was interrupted", session=self.session)
        now = monotonic()
        if deadline is not None and now >= deadline:
            raise TurnTimeout("no result in time", session=self.session)
        if self.broker_pidfd is not None:
            self.lost_at = None
            return POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - now))
        if self.lost_at is None:
            self.lost_at = now
        if self.try_attach():
            self.lost_at = None
            return 0.0
        if now - self.lost_at >= reconnect_timeout_s:
            self.lost_at = None  # every request ended with the error: a later wait starts afresh
            raise self.lost(reconnect_timeout_s)
        return RETRY_S

    # ------------------------------------------------------------ sending

    def _send(self, frame: frames.RequestFrame, priority: int | None = None) -> None:
        if self.rq is None:
            return  # not attached: sent (again) on attach
        try:
            if priority is None:
                self.rq.send_frame(frame, timeout_s=self.send_timeout_s)
            else:  # a small frame (never chunked) at a priority other than its class's
                self.rq.send_bytes(frames.encode(frame), priority, timeout_s=self.send_timeout_s)
        except QueueGone:
            self._detach()

    def submit(self, frame: frames.RequestFrame) -> RequestState:
        """Record and send a request frame."""
        st = RequestState(req=frame.req, frame=frame)
        self.requests[frame.req] = st
        try:
            self._send(frame)
        except BaseException:
            # Not sent (QueueFull, say): the caller gets the error, so the request must not
            # be resubmitted behind its back when a new broker comes.
            del self.requests[frame.req]
            raise
        self.check_queue()  # sent to a queue whose name is gone: send it where the broker reads now
        return st

    def prompt_frame(
        self, content: str | list[dict[str, Any]], *, model: str | None, on_preempt: frames.OnPreempt | None,
        resume_prompt: str | None, request_id: str | None,
    ) -> frames.Prompt:
        """Build (and validate) a prompt frame."""
        if on_preempt is None:
            on_preempt = "requeue"
        frame = frames.Prompt(
            client=self.client_id, req=request_id or new_request_id(), kind=self.kind, content=content,
            model=model, on_preempt=on_preempt, resume_prompt=resume_prompt,
        )
        # Validate here too, so bad input fails in the caller, not in the broker.
        frames.decode_request(frames.encode(frame))
        return frame

    def prompt(
        self, content: str | list[dict[str, Any]], *, model: str | None, on_preempt: frames.OnPreempt | None,
        resume_prompt: str | None, request_id: str | None,
    ) -> RequestState:
        """Build, validate and send a prompt."""
        return self.submit(self.prompt_frame(content, model=model, on_preempt=on_preempt,
                                             resume_prompt=resume_prompt, request_id=request_id))

    def set_model(self, model: str) -> RequestState:
        """Ask for the session's model to change (in line with other requests)."""
        return self.submit(frames.SetModel(client=self.client_id, req=new_request_id(), kind=self.kind, model=model))

    def lease(self, idle_timeout_s: float | None) -> RequestState:
        """Ask for the session across several turns; :meth:`lease_granted` reads the answer."""
        st = self.submit(frames.Lease(client=self.client_id, req=new_request_id(), kind=self.kind,
                                      idle_timeout_s=idle_timeout_s))
        self.lease_state = "waiting"
        return st

    def lease_granted(self, st: RequestState, res: TurnResult) -> None:
        """Check a lease request's answer: raise :class:`BrokerUnavailable` unless it was granted."""
        if not st.granted:
            if self.lease_state == "waiting":
                self.lease_state = "none"
            raise BrokerUnavailable(f"lease not granted: {res.error_code or res.status}", session=self.session)

    def release(self) -> None:
        """Give the lease back (a no-op once the connection is closed: Bye ended it)."""
        if not self.closed:
            self._send(frames.Release(client=self.client_id, req=new_request_id(), kind=self.kind))
        self.lease_state = "none"

    def cancel(self, st: RequestState) -> None:
        """Cancel one of our requests (queued or running)."""
        st.cancelled = True
        # Sent at our requests' priority, not the control one: the queue is FIFO
        # within a priority, so the cancel cannot overtake the request it names
        # (a cancel read before its request is stale, and the request would run).
        self._send(frames.Cancel(client=self.client_id, req=new_request_id(), target=st.req),
                   priority=frames.PRIORITY[self.kind])

    def cancel_turn(self, incarnation: str, turn: int) -> None:
        """Cancel the turn (incarnation, turn), whoever holds it; honoured only if it is running."""
        if not 1 <= turn <= frames.MAX_TURN:
            # Checked before the cancel slot is touched: a failed pack would leave its sequence word odd.
            raise InvalidArgument(f"turn {turn}: a turn id is 1..{frames.MAX_TURN}", argument="turn")
        if self.block is not None:
            self.block.write_cancel(incarnation, turn)
        self._send(frames.Cancel(client=self.client_id, req=new_request_id(), incarnation=incarnation, turn=turn))

    # ------------------------------------------------------------ receiving

    def drain_mailbox(self) -> int:
        """Read every frame waiting in the mailbox and apply it; returns how many."""
        n = 0
        for data in self.mailbox.read_frames():
            n += 1
            try:
                frame = frames.decode_reply(data)
            except ProtocolError:
                continue
            self.apply(frame)
        return n

    def apply(self, frame: frames.ReplyFrame) -> None:
        """Digest one reply frame."""
        if isinstance(frame, frames.LeaseEnded):
            self.lease_state = "none"
        st = self.requests.get(frame.req)
        match frame:
            case frames.Accepted():
                if st is not None:
                    st.accepted = True
                    st.incarnation = frame.incarnation
            case frames.Started():
                if st is not None:
                    st.attempts += 1
                    if st.attempts > 1:
                        st.events.append(rerun_notice(st, frame))
                    st.turn = frame.turn
                    st.incarnation = frame.incarnation
            case frames.Event():
                if st is not None:
                    try:
                        obj = _json_decode(frame.data)
                    except (ValueError, msgspec.DecodeError):
                        obj = None
                    if isinstance(obj, dict):
                        st.events.append(obj)
                        if obj.get("type") == "result":
                            st.last_result = obj  # the Result frame does not repeat it
            case frames.PreemptedNotice():
                if st is not None:
                    st.preemptions += 1
                    st.rerun_cause = frame.reason
                    st.events.append({"type": "turnstile", "subtype": "preempted", "turn": frame.turn,
                                      "requeued": frame.requeued, "reason": frame.reason})
            case frames.Result():
                if st is not None:
                    st.result = TurnResult(
                        status=frame.status, text=frame.text, session_id=frame.session_id, model=frame.model,
                        turn=frame.turn or st.turn, queued_ms=frame.queued_ms, turn_ms=frame.turn_ms,
                        error_code=frame.error_code, error=frame.error,
                        raw=_json_or_none(frame.raw) or st.last_result, request_id=frame.req,
                        preemptions=st.preemptions,
                    )
            case frames.Error():
                if st is not None:
                    st.result = TurnResult(status="error", error_code=frame.code, error=frame.message,
                                           request_id=frame.req)
                elif not frame.req and frame.code == LimitError.code:
                    self._refused(frame)
                else:
                    self.errors.append(frame)
                    log.warning("broker error for no pending request: req=%r code=%s: %s",
                                frame.req, frame.code, frame.message)
            case frames.LeaseGranted():
                self.lease_state = "held"
                if st is not None:
                    st.granted = True
                    st.result = TurnResult(status="ok", request_id=frame.req)
            case frames.LeaseEnded():
                if st is not None and st.result is None:
                    st.result = TurnResult(status="cancelled", error_code=frame.reason, request_id=frame.req)
            case frames.AgentRequest():
                self._answer(frame)
        if st is not None:
            self.changed.add(st.req)
        if st is not None and st.result is not None:
            # Finished: the Turn keeps its state; the table keeps only what may need resubmitting,
            # so a long-lived client does not grow by one entry per turn.
            self.requests.pop(st.req, None)

    def _refused(self, frame: frames.Error) -> None:
        # The broker answered our hello with a refusal: nothing we sent will be served
        # (it refuses each later frame too, until it has room). End what waits now.
        self.refusal = frame
        for st in list(self.requests.values()):
            if st.result is None:
                st.result = TurnResult(status="error", error_code=frame.code, error=frame.message, request_id=st.req)
                self.changed.add(st.req)
                self.requests.pop(st.req, None)

    def take_changed(self) -> set[str]:
        """Ids of the requests whose state changed since the last call."""
        out, self.changed = self.changed, set()
        return out

    def _answer(self, frame: frames.AgentRequest) -> None:
        st = self.requests.get(frame.req)  # the running request (kept: the answer may come after it ended)
        handler = self.on_permission if frame.subtype == "can_use_tool" else (
            self.on_hook if frame.subtype == "hook_callback" else None)
        if handler is None:
            self._send_answer(frame, st, handlers.Answer(error=f"no handler for {frame.subtype}"))
            return
        try:
            request = _json_decode(frame.data)
        except (ValueError, msgspec.DecodeError):
            request = {}
        outcome = handlers.call(handler, frame.subtype, request)
        if isinstance(outcome, handlers.Answer):
            self._send_answer(frame, st, outcome)
        elif self.run_async is not None:
            self.run_async(self._answer_later(frame, st, outcome))
        else:
            self._send_answer(frame, st, handlers.not_awaited(outcome, frame.subtype))

    async def _answer_later(self, frame: frames.AgentRequest, st: RequestState | None, pending: Awaitable[Any]) -> None:
        self._send_answer(frame, st, await handlers.settle(pending, frame.subtype))

    def _send_answer(self, frame: frames.AgentRequest, st: RequestState | None, answer: handlers.Answer) -> None:
        if answer.failure is not None and st is not None:
            st.handler_failures.append(answer.failure)
            st.events.append({"type": "turnstile", "subtype": "handler_error", "turn": frame.turn,
                              "request": frame.subtype, "handler": answer.failure.handler,
                              "error": answer.failure.reason})
            self.changed.add(st.req)
        self._send(frames.ControlAnswer(
            client=self.client_id, req=frame.req, request_id=frame.request_id, response=answer.response,
            error=answer.error,
        ))

    # ------------------------------------------------------------ closing

    def close(self) -> None:
        """Say bye and remove the mailbox."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(TurnstileError, OSError):
            # At our requests' priority, like a cancel: the queue is FIFO within a
            # priority, so the bye cannot overtake a release or prompt sent before it
            # (which would then come from a client the broker no longer knows).
            self._send(frames.Bye(client=self.client_id), priority=frames.PRIORITY[self.kind])
        self._detach()
        self.mailbox.close()


_json_decode = msgspec.json.decode


def rerun_notice(st: RequestState, started: frames.Started) -> dict[str, Any]:
    """The ``turnstile``/``rerun`` event: the request starts again, so what its earlier attempt did may repeat.

    Tools an earlier attempt ran may run again (at-least-once); ``cause`` is
    what ended that attempt. Consumes the recorded cause, so each rerun has one notice.
    """
    cause, st.rerun_cause = st.rerun_cause or "agent_restarted", None
    return {"type": "turnstile", "subtype": "rerun", "cause": cause, "attempt": st.attempts,
            "turn": started.turn, "previous_turn": st.turn, "incarnation": started.incarnation}


def _json_or_none(data: bytes | None) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        obj = _json_decode(data)
    except (ValueError, msgspec.DecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def monotonic() -> float:
    """The clock clients use for deadlines."""
    return time.monotonic()


def deadline_after(timeout_s: float | None) -> float | None:
    """The :func:`monotonic` time ``timeout_s`` from now (None: no deadline)."""
    return None if timeout_s is None else monotonic() + timeout_s
