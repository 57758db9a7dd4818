"""The broker's lifecycle: start → serve (a tick every :data:`TICK_S`) → drain → stop.

The parts each own one job: :mod:`broker.session_store` (lock, session.json),
:mod:`broker.ingress` (request queue → scheduler events), :mod:`broker.registry`
(clients and their mailboxes), :mod:`broker.agent_link` (the agent process,
its stdin and the routing of its output), :mod:`broker.publisher` (the state
block). This module wires them, feeds the scheduler and carries out its
decisions, and handles signals: a signal is only recorded, the loop acts on it;
a second one escalates from graceful to immediate.
"""

from __future__ import annotations

import asyncio
import collections
import os
import resource
import signal
import time
from typing import Any

from broker import log as blog
from broker.agent_link import AgentLink
from broker.agents import make_agent
from broker.agents.base import AgentAdapter, AgentPolicy
from broker.budgets import Trimmer
from broker.config import BrokerConfig
from broker.exits import RET_OK, RET_SIGNAL
from broker.ingress import Ingress
from broker.publisher import Publisher
from broker.registry import FDS_PER_CLIENT, Registry
from broker.scheduler import (
    Config,
    Decision,
    Deliver,
    DropClient,
    RestartAgent,
    ResultRead,
    SchedEvent,
    Scheduler,
    Submitted,
    Tick,
    WriteInterrupt,
    WriteSetModel,
    WriteUser,
)
from broker.session_store import SessionStore
from ipc import frames, names
from ipc.errors import AlreadyRunning

#: How often the periodic work runs (relay deadlines, wedge check, pumps, chunk expiry, heartbeat).
TICK_S = 0.5
#: Signals that stop the broker gracefully. SIGHUP is one: a foreground `serve` whose
#: terminal closes gets it, and must drain and clean up as for SIGTERM, not die unlogged.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Descriptors a broker uses before any client (stdio, log, lock, queue, state block, agent
#: pipes, the event loop's own, the refusal reserve): what the client budget is counted after.
NOFILE_BASE = 32
#: Where the soft limit goes when the hard one is unlimited (the kernel's usual nr_open).
NOFILE_IF_UNLIMITED = 1 << 20


class Broker:
    """One session's broker: wires the parts and runs their lifecycle."""

    def __init__(self, cfg: BrokerConfig, adapter: AgentAdapter | None = None) -> None:
        self.cfg = cfg
        self.log = blog.get("turnstile.broker").bind(session=cfg.session)
        adapter = adapter or make_agent(
            cfg.agent, claude_bin=cfg.claude_bin, extra_args=cfg.agent_args, env=cfg.agent_env, cwd=cfg.agent_cwd,
            policy=AgentPolicy(permission_mode=cfg.permission_mode, hook_events=cfg.hook_events),
        )
        self.incarnation = names.new_incarnation()
        self.sched = Scheduler(Config(
            incarnation=self.incarnation,
            drain_timeout_s=cfg.drain_timeout_s,
            model_timeout_s=cfg.model_timeout_s,
            lease_idle_s=cfg.lease_idle_s,
            model=cfg.model,
            start_timeout_s=cfg.agent_start_timeout_s,
            unavailable_timeout_s=cfg.agent_unavailable_timeout_s,
        ))
        self.stopping = False
        self.signals = 0
        self.store = SessionStore(cfg, self.log)
        self.publisher = Publisher(
            cfg.session, self.log, self.incarnation, self.sched, self.store,
            agent_pid=lambda: self.link.pid, client_count=lambda: len(self.registry),
            client_label=lambda client: self.registry.label(client),
        )
        self.trimmer = Trimmer(self.log)
        self.registry = Registry(cfg, self.log, self.publisher, self._feed, self.trimmer)
        self.link = AgentLink(
            cfg, self.log, adapter, incarnation=self.incarnation, sched=self.sched, store=self.store,
            registry=self.registry, publisher=self.publisher, feed=self._feed, stopping=self._is_stopping,
        )
        self.ingress = Ingress(
            cfg, self.log, publisher=self.publisher, registry=self.registry, relays=self.link.relays, feed=self._feed,
            stopping=self._is_stopping,
        )
        self._timer: asyncio.TimerHandle | None = None
        self._stop_event = asyncio.Event()
        self._events: collections.deque[SchedEvent] = collections.deque()
        self._feeding = False

    def _is_stopping(self) -> bool:
        return self.stopping

    # ---------------------------------------------------------------- lifecycle

    async def serve(self) -> int:
        """Run until SIGTERM, SIGINT or SIGHUP; returns the exit code."""
        loop = asyncio.get_running_loop()
        self._startup()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.link.spawn()
            self.ingress.listen()
            ticker = asyncio.ensure_future(self._tick_loop())
            self.log.info("broker.ready", pid=os.getpid(), incarnation=self.incarnation, agent=self.link.adapter.name,
                          agent_pid=self.link.pid, session_id=self.store.session_id, queue=self.ingress.queue_name)
            await self._stop_event.wait()
            ticker.cancel()
            if self.signals > 1:
                self.link.kill_now()
                return RET_SIGNAL
            # Graceful stop: no new turns, interrupt the running one, wait for its result
            # (bounded). Its client gets no result from this broker: the request was not
            # finished, so the client resubmits it to the next broker.
            self.ingress.stop_listening()
            await self.link.drain()
            return RET_OK
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            await self._shutdown()

    def _startup(self) -> None:
        self.store.open()
        self.store.reap_previous_agent()
        saved_model = self.store.load()
        if self.cfg.model is None and saved_model:
            self.sched.model = saved_model
        self.ingress.open()
        try:
            self.publisher.create()
        except BaseException:
            # Refused (a squatted name, a limit): leave no queue of ours behind.
            self.ingress.abandon()
            raise
        self.registry.sweep()

    def _on_signal(self, sig: int) -> None:
        # Only record the signal: the loop acts on it. A second one escalates.
        self.signals += 1
        self.stopping = True
        self.log.info("broker.signal", signal=signal.Signals(sig).name, count=self.signals)
        self._stop_event.set()
        if self.signals > 1:
            asyncio.get_running_loop().call_soon(self._escalate)

    def _escalate(self) -> None:
        self.link.kill_now()
        self.ingress.close()
        self.publisher.close()
        self.store.unlock()
        os._exit(RET_SIGNAL)

    async def _shutdown(self) -> None:
        self.ingress.stop_listening()
        await self.link.stop()
        self.registry.close_all()
        self.registry.sweep()
        self.publisher.publish_closed()
        self.ingress.close()
        self.publisher.close()
        self.store.unlock()
        self.log.info("broker.stopped")

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._tick(time.monotonic())
            except Exception as exc:
                # Out of descriptors, say (a sweep lists /dev/shm): this tick's work is lost,
                # the next one runs. A dead tick loop would leave the heartbeat stale for good.
                self.log.exception("broker.tick_failed", error=repr(exc))

    def _tick(self, now: float) -> None:
        self.link.tick(now)
        self.registry.tick()
        self.ingress.tick(now)
        self._feed(Tick(now))
        self.publisher.tick(self.ingress)
        self.store.retry()
        self.trimmer.tick()

    # ---------------------------------------------------------------- the scheduler: events in, decisions out

    def _feed(self, event: SchedEvent) -> None:
        # Events raised while carrying out decisions (a client failing mid-delivery)
        # queue behind the current one, so decisions always run in the order made.
        self._events.append(event)
        if self._feeding:
            return
        self._feeding = True
        try:
            while self._events:
                ev = self._events.popleft()
                decisions = self.sched.handle(ev)
                # Agent writes first (a preempt's interrupt, a handoff's next prompt): they
                # are the latency that matters, and a client delivery before them rings a
                # doorbell whose wake-up can take the CPU from us first. Agent and client
                # channels are independent; order within each is kept (stable sort).
                decisions.sort(key=_client_side)
                for d in decisions:
                    self._do(d, ev)
        finally:
            self._feeding = False
        if self.sched.model != self.store.saved_model:
            # A switch (or the agent naming its model) sticks for every later turn: the next
            # broker starts the agent on it too. Written only when it changed.
            self.store.save(self.sched.model)
        deadline = self.sched.next_deadline()
        if deadline is not None:
            self._arm_timer(deadline)
        self.publisher.mark_dirty()

    def _do(self, d: Decision, cause: SchedEvent) -> None:
        latencies = self.publisher.latencies
        match d:
            case WriteInterrupt():
                self.link.interrupt()
                us = (time.perf_counter_ns() - self.ingress.received_ns) // 1000 if d.reason == "preempt" else 0
                if d.reason == "preempt" and isinstance(cause, Submitted):
                    latencies["last_preempt_signal_us"] = us
                    self.publisher.observe("preempt_signal_us", us)
                self.log.info("turn.interrupt", turn=d.turn, reason=d.reason, broker_us=us or None)
            case WriteUser():
                ok = self.link.write_user(d.turn, d.uuid, d.content)
                now_ns = time.perf_counter_ns()
                if isinstance(cause, ResultRead):
                    latencies["last_handoff_us"] = (now_ns - self.link.result_read_ns) // 1000
                    self.publisher.observe("handoff_us", latencies["last_handoff_us"])
                elif isinstance(cause, Submitted):
                    latencies["last_submit_to_write_us"] = (now_ns - self.ingress.received_ns) // 1000
                holder = self.sched.holder()
                self.log.info("turn.start", turn=d.turn, client=holder[0] if holder else None,
                              kind=holder[1] if holder else None, req=holder[2] if holder else None, written=ok)
            case WriteSetModel():
                self.link.set_model(d.ctrl_id, d.model)
                self.log.info("model.switch", model=d.model, ctrl_id=d.ctrl_id)
            case Deliver():
                self.registry.send(d.client, d.frame)
                if isinstance(d.frame, frames.Result):
                    r = d.frame
                    self.trimmer.note_freed(self.ingress.queued.release(d.client, r.req))
                    if r.turn:  # a turn ran for it (not refused, nor cancelled while queued)
                        self.publisher.observe("queue_wait_ms", r.queued_ms)
                        self.publisher.observe("turn_ms", r.turn_ms)
                    self.log.info("request.result", client=d.client, req=r.req, status=r.status, turn=r.turn,
                                  queued_ms=r.queued_ms, turn_ms=r.turn_ms, error_code=r.error_code)
                elif isinstance(d.frame, frames.PreemptedNotice):
                    self.log.info("turn.preempted", client=d.client, req=d.frame.req, turn=d.frame.turn)
            case DropClient():
                self.registry.drop(d.client)
                self.trimmer.note_freed(self.ingress.queued.drop_client(d.client))
            case RestartAgent():
                self.link.restart(d.reason, d.model, d.delay_s)

    def _arm_timer(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None and self._timer.when() <= deadline + (loop.time() - time.monotonic()):
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, deadline - time.monotonic())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.stopping:
            # A stopping broker makes no more decisions: the drain ends the running turn, and
            # a deadline firing now (the drain timeout of a preempted turn) must neither
            # restart the agent nor answer a request its client will resubmit to the next broker.
            return
        self._feed(Tick(time.monotonic()))


def _client_side(d: Decision) -> bool:
    """Sort key: False for decisions that write to the agent, True for the rest."""
    return not isinstance(d, (WriteInterrupt, WriteUser, WriteSetModel))


def raise_nofile_limit(log: Any) -> None:
    """Raise the soft open-file limit to the hard one, and log the client budget it gives.

    Each connected client costs the broker :data:`~broker.registry.FDS_PER_CLIENT`
    descriptors, so the common soft default of 1024 would cap a session near
    330 clients long before the queue limits do.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, NOFILE_IF_UNLIMITED)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("broker.nofile_not_raised", soft=soft, hard=hard, error=str(exc))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("broker.nofile", soft=now, hard=hard, was=soft, fds_per_client=FDS_PER_CLIENT,
             clients_max=max(0, (now - NOFILE_BASE) // FDS_PER_CLIENT))


def run(cfg: BrokerConfig) -> int:
    """Run a broker in this process until it is stopped; returns the exit code."""
    import uvloop

    blog.configure(cfg.log_format, cfg.log_level)
    raise_nofile_limit(blog.get("turnstile.broker").bind(session=cfg.session))
    return uvloop.run(Broker(cfg).serve())


__all__ = ["AlreadyRunning", "Broker", "run"]
