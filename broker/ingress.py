"""The request queue in, scheduler events out: one pass per message.

A message is decoded, reassembled if it is a chunk, validated against its
sender (connected, the kind fixed at hello), and turned into a scheduler
event, or rejected with a typed error sent to the sender's mailbox when one
is known. Nothing that fails here reaches the agent. Reading is batched and
yields to the loop between batches, so agent output is never starved by a
flood of frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from broker.agent_link import Relays
from broker.budgets import QueuedBytes
from broker.config import BrokerConfig
from broker.publisher import Publisher
from broker.registry import Registry
from broker.scheduler import CancelAsked, Released, SchedEvent, Submitted
from ipc import chunks, frames, rqueue
from ipc.errors import ProtocolError, QueueFull, TooManyConnections, TurnstileError

#: Frames handled per wake-up before yielding to the loop (agent output must not starve).
BATCH = 64


class Ingress:
    """Owns the session's request queue and turns its messages into scheduler events."""

    def __init__(
        self,
        cfg: BrokerConfig,
        log: Any,
        *,
        publisher: Publisher,
        registry: Registry,
        relays: Relays,
        feed: Callable[[SchedEvent], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.publisher = publisher
        self.registry = registry
        self.relays = relays
        self.feed = feed
        self.stopping = stopping
        self.rq: rqueue.RequestQueue | None = None
        self.reasm = chunks.Reassembler()
        #: Bytes of prompts held until their requests end (the broker releases them as results go out).
        self.queued = QueuedBytes(cfg.max_queued_bytes_per_client, cfg.max_queued_bytes)
        #: When the last message was read (perf_counter ns): the start of the latencies the broker adds.
        self.received_ns = 0
        self._adopted = False
        registry.gone_hooks.append(self.reasm.drop_client)

    @property
    def queue_name(self) -> str:
        """The request queue's name ("" when there is none)."""
        return self.rq.name if self.rq is not None else ""

    def _create(self) -> rqueue.RequestQueue:
        return rqueue.RequestQueue.create(
            self.cfg.session, max_messages=self.cfg.queue_max_messages, max_message_bytes=self.cfg.queue_message_bytes
        )

    def open(self) -> None:
        """Create the request queue, or adopt the one a dead broker left (its frames are served)."""
        self._adopted = rqueue.exists(self.cfg.session)
        self.rq = self._create()

    def abandon(self) -> None:
        """The broker could not start: leave no queue of ours behind to eat the user's queue budget.

        One adopted from a dead broker keeps its frames for the next.
        """
        if self.rq is None:
            return
        if not self._adopted:
            self.rq.unlink()
        self.rq.close()
        self.rq = None

    def listen(self) -> None:
        """Start reading, beginning with the frames sent while no broker ran."""
        assert self.rq is not None
        asyncio.get_running_loop().add_reader(self.rq.fileno(), self.on_readable)
        self.on_readable()

    def stop_listening(self) -> None:
        """Stop reading (a stopping broker takes no new frames; they wait for the next one)."""
        if self.rq is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.rq.fileno())

    def close(self) -> None:
        """Remove the queue's name and close it."""
        if self.rq is not None:
            self.rq.unlink()
            self.rq.close()
            self.rq = None

    def recreate_queue(self) -> None:
        """Its name vanished: serve a new queue, after what was still waiting in the old one."""
        old = self.rq
        assert old is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(old.fileno())
        self.rq = self._create()
        while (got := old.receive_nowait()) is not None:
            self.on_message(got[0])
        old.close()
        loop.add_reader(self.rq.fileno(), self.on_readable)

    def on_readable(self) -> None:
        """Read up to :data:`BATCH` messages, then come back later if more may wait."""
        rq = self.rq
        if rq is None or self.stopping():
            return
        for _ in range(BATCH):
            got = rq.receive_nowait()
            if got is None:
                return
            self.received_ns = time.perf_counter_ns()
            self.on_message(got[0])
        # More may wait: come back after agent output had its turn.
        asyncio.get_running_loop().call_soon(self.on_readable)

    def on_message(self, data: bytes) -> None:
        """One queue message: decode, reassemble, validate, route; reject it typed if it is bad."""
        now = time.monotonic()
        whole: bytes | None = None
        try:
            frame = frames.decode_request(data)
            if isinstance(frame, frames.Chunk):
                if self.registry.get(frame.client) is None:
                    # Only a connected client holds pending chunks: client ids cost nothing
                    # to make up. One whose hello this broker never read resubmits anyway.
                    self.publisher.count("rejected_frames")
                    self.log.warning("frame.unknown_client", client=frame.client, type="Chunk")
                    return
                try:
                    whole = self.reasm.add(frame, now, connected=True)
                finally:
                    for d in self.reasm.take_dropped():  # sets evicted to make room: tell their owners
                        self.reject(d.client, d.req, ProtocolError(d.code, d.message))
                if whole is None:
                    return
                inner = frames.decode_request(whole)
                if inner.client != frame.client or isinstance(inner, frames.Chunk):
                    raise ProtocolError("chunk_sequence", "a chunk set must carry one frame of its own sender")
                frame = inner
            self._route(frame, now, len(whole) if whole is not None else len(data))
        except (ProtocolError, TooManyConnections) as exc:
            client, req = frames.peek_sender(data)
            self.reject(client, req or "", exc)
        except Exception as exc:
            self.publisher.count("rejected_frames")
            self.log.exception("frame.failed", error=repr(exc))

    def reject(self, client: str | None, req: str, exc: TurnstileError) -> None:
        """Count and log a bad frame; tell its sender, connected or not, if it can be reached."""
        self.publisher.count("rejected_frames")
        self.publisher.mark_dirty()
        self.log.warning("frame.rejected", client=client, req=req, error=str(exc))
        if client is None:
            return
        code = str(getattr(exc, "reason", exc.code))
        self.registry.send_to_mailbox(client, frames.Error(client=client, req=req, code=code, message=str(exc)[:4000]))

    def _route(self, frame: frames.RequestFrame, now: float, size: int) -> None:
        conn = self.registry.get(frame.client)
        if isinstance(frame, frames.Hello):
            if conn is not None:
                if conn.kind != frame.kind:
                    raise ProtocolError("kind_mismatch", f"client is a {conn.kind}, fixed at connect time")
                conn.handles = list(frame.handles)
                conn.label = frame.label or ""  # adopted from its mailbox before its hello came
                return
            if self.registry.adopt(frame.client, frame.kind, frame) is None:
                self.log.warning("client.hello_refused", client=frame.client, pid=frame.pid)
            return
        if isinstance(frame, frames.Bye):
            if conn is not None:
                self.registry.gone(conn.id, "bye")
            return
        if isinstance(frame, frames.Cancel) and frame.target is None:
            # A cancel by turn names its target fully and touches no request of the
            # sender: it needs no connected sender (`turnstile cancel` may be gone,
            # mailbox and all, before its frame is read).
            self._cancel_turn(frame, now)
            return
        kind = getattr(frame, "kind", None)
        if conn is None:
            conn = self.registry.adopt(frame.client, kind if kind in frames.KINDS else None, req=frame.req)
            if conn is None:
                self.publisher.count("rejected_frames")
                self.log.warning("frame.unknown_client", client=frame.client, type=type(frame).__name__)
                return
        if kind is not None and kind != conn.kind:
            raise ProtocolError("kind_mismatch", f"client is a {conn.kind}, fixed at connect time; frame says {kind}")
        match frame:
            case frames.Prompt():
                try:
                    self.queued.admit(frame.client, frame.req, size)
                except QueueFull as exc:
                    self.reject(frame.client, frame.req, exc)
                    return
                self.feed(Submitted(
                    now, frame.client, frame.req, frame.kind, "prompt", content=frame.content, model=frame.model,
                    on_preempt=frame.on_preempt, resume_prompt=frame.resume_prompt,
                ))
            case frames.SetModel():
                self.feed(Submitted(now, frame.client, frame.req, frame.kind, "set_model", model=frame.model))
            case frames.Lease():
                self.feed(Submitted(now, frame.client, frame.req, frame.kind, "lease",
                                    lease_idle_s=frame.idle_timeout_s))
            case frames.Release():
                self.feed(Released(now, frame.client, frame.req))
            case frames.Cancel():
                self.feed(CancelAsked(now, frame.client, target=frame.target))
            case frames.ControlAnswer():
                self.relays.answer(conn.id, frame)

    def _cancel_turn(self, frame: frames.Cancel, now: float) -> None:
        inc, turn = frame.incarnation, frame.turn
        if inc is None or turn is None:
            slot = self.publisher.read_cancel()  # a bare ring: the slot names the turn
            if slot is not None:
                inc, turn = slot
        self.feed(CancelAsked(now, frame.client, incarnation=inc, turn=turn))
        self.publisher.clear_cancel()

    def tick(self, now: float) -> None:
        """Periodic work: expire incomplete chunk sets and tell their senders (naming the request)."""
        for d in self.reasm.expire(now):
            self.reject(d.client, d.req, ProtocolError(d.code, d.message))
