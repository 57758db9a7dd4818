"""The session runtime: one asyncio lifecycle, start → serve → drain → stop.

It reads the request queue, feeds the scheduler, and carries out its
decisions. It is the only writer to the agent's stdin. Agent output is routed
by the ``uuid`` stamped on each user message (``result.user_message_uuids``),
never by "the next result"; output that belongs to no turn is logged, never
delivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import json
import os
import signal
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker import log as blog
from broker import protocol
from broker.agentproc import AgentProcess, reap_group
from broker.agents import make_agent
from broker.agents.base import AgentAdapter
from broker.config import BrokerConfig
from broker.exits import RET_ALREADY_RUNNING, RET_OK, RET_SIGNAL
from broker.scheduler import (
    AgentExited,
    AgentStarted,
    CancelAsked,
    ClientGone,
    Config,
    Connected,
    Decision,
    Deliver,
    DropClient,
    ModelAnswered,
    Released,
    RestartAgent,
    SchedEvent,
    Scheduler,
    Submitted,
    Tick,
    TurnInit,
    TurnResult,
    WriteInterrupt,
    WriteSetModel,
    WriteUser,
)
from ipc import chunks, frames, mailbox, names, rqueue, state, sweep
from ipc.errors import AlreadyRunning, ClientTooSlow, IPCError, ProtocolError, TurnstileError

#: Frames handled per wake-up before yielding to the loop (agent output must not starve).
BATCH = 64
HEARTBEAT_S = 0.5
#: Signals that stop the broker gracefully. SIGHUP is one: a foreground `serve` whose
#: terminal closes gets it, and must drain and clean up as for SIGTERM, not die unlogged.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Every this many heartbeats, remove the mailboxes of clients that died unwatched.
SWEEP_EVERY = 10
#: While a client's mailbox is full, how often the broker moves its buffered frames in as it frees room.
PUMP_S = 0.001
#: An agent that exits sooner than this after its start, before any turn, counts towards the restart back-off.
QUICK_EXIT_S = 5.0


@dataclass
class ClientConn:
    """What the broker knows of one connected client."""

    id: str
    kind: frames.Kind
    pid: int
    start_time: int
    writer: mailbox.MailboxWriter
    pidfd: int
    handles: list[str] = field(default_factory=list)


@dataclass
class Relay:
    """An agent control request waiting for the turn holder's answer."""

    request_id: str
    subtype: str
    client: str
    request: dict[str, Any]
    deadline: float


class Broker:
    """One session's broker."""

    def __init__(self, cfg: BrokerConfig, adapter: AgentAdapter | None = None) -> None:
        self.cfg = cfg
        self.log = blog.get("turnstile.broker").bind(session=cfg.session)
        self.adapter = adapter or make_agent(
            cfg.agent, claude_bin=cfg.claude_bin, extra_args=cfg.agent_args, env=cfg.agent_env, cwd=cfg.agent_cwd
        )
        self.incarnation = names.new_incarnation()
        self.sched = Scheduler(Config(
            incarnation=self.incarnation,
            drain_timeout_s=cfg.drain_timeout_s,
            model_timeout_s=cfg.model_timeout_s,
            lease_idle_s=cfg.lease_idle_s,
            model=cfg.model,
        ))
        self.clients: dict[str, ClientConn] = {}
        self.reasm = chunks.Reassembler()
        self.agent: AgentProcess | None = None
        self.agent_session_id = ""
        self.resume = False
        self.uuid_turn: dict[str, int] = {}
        self.turn_client: dict[int, tuple[str, str]] = {}
        self.relays: dict[str, Relay] = {}
        self.pending_ctrl: dict[str, str] = {}
        self.ctrl_seq = 0
        self.last_output_s = time.monotonic()
        self.agent_started_s = 0.0
        self.agent_served = False  # the running agent began a turn (printed system/init)
        self.restart_failures = 0
        self.stopping = False
        self.signals = 0
        self.rq: rqueue.RequestQueue | None = None
        self.block: state.StateBlock | None = None
        self.started_unix_ns = time.time_ns()
        self.counters: dict[str, int] = dict.fromkeys(state.COUNTERS, 0)
        self.latencies: dict[str, int] = dict.fromkeys(state.LATENCIES, 0)
        self._timer: asyncio.TimerHandle | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._stop_event = asyncio.Event()
        self._lock_fd: int | None = None
        self._slow_clients: set[str] = set()
        self._pump_handle: asyncio.TimerHandle | None = None
        self._broker_start = names.self_identity()[1]  # constant: not re-read from /proc at every publish
        self._rq_received_ns = 0
        self._result_read_ns = 0
        self._dirty = False
        self._events: collections.deque[SchedEvent] = collections.deque()
        self._drained = asyncio.Event()
        self._feeding = False

    # ================================================================ lifecycle

    async def serve(self) -> int:
        """Run until SIGTERM, SIGINT or SIGHUP; returns the exit code."""
        loop = asyncio.get_running_loop()
        self._start_ipc()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._spawn_agent()
            assert self.rq is not None
            loop.add_reader(self.rq.fileno(), self._on_rq_readable)
            self._on_rq_readable()  # frames sent while no broker ran
            heartbeat = asyncio.ensure_future(self._heartbeat())
            self.log.info("broker.ready", pid=os.getpid(), incarnation=self.incarnation, agent=self.adapter.name,
                          agent_pid=self.agent.pid if self.agent else 0, session_id=self.agent_session_id,
                          queue=self.rq.name)
            await self._stop_event.wait()
            heartbeat.cancel()
            if self.signals > 1:
                return self._stop_now()
            await self._drain()
            return RET_OK
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
            await self._teardown()

    def _on_signal(self, sig: int) -> None:
        # Only record the signal: the loop acts on it. A second one escalates.
        self.signals += 1
        self.stopping = True
        self.log.info("broker.signal", signal=signal.Signals(sig).name, count=self.signals)
        self._stop_event.set()
        if self.signals > 1:
            asyncio.get_running_loop().call_soon(self._escalate)

    def _escalate(self) -> None:
        if self.agent is not None:
            self.agent.kill_group()
        self._unlink_ipc()
        self._unlock()
        os._exit(RET_SIGNAL)

    def _start_ipc(self) -> None:
        cfg = self.cfg
        cfg.session_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock()
        self._reap_previous_agent()
        self._load_session()
        adopted = rqueue.exists(cfg.session)
        self.rq = rqueue.RequestQueue.create(
            cfg.session, max_messages=cfg.queue_max_messages, max_message_bytes=cfg.queue_message_bytes
        )
        try:
            self.block = state.StateBlock.create(cfg.session)
        except BaseException:
            # Refused (a squatted name, a limit): leave no queue of ours behind to eat the
            # user's queue budget. One adopted from a dead broker keeps its frames for the next.
            if not adopted:
                self.rq.unlink()
            self.rq.close()
            self.rq = None
            raise
        self._publish()
        self._sweep_dead_clients()

    def _lock(self) -> None:
        path = self.cfg.session_dir / "broker.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise AlreadyRunning(
                    f"another broker serves session {self.cfg.session!r} (lock {path.name} is held)",
                    exit_code=RET_ALREADY_RUNNING,
                ) from None
            raise
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _reap_previous_agent(self) -> None:
        path = self.cfg.session_dir / "agent.json"
        try:
            prev = json.loads(path.read_text())
            killed = reap_group(int(prev["pgid"]), int(prev["start_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return
        if killed:
            self.log.warning("agent.reaped_orphans", pgid=prev["pgid"], killed=killed)

    def _load_session(self) -> None:
        path = self.cfg.session_dir / "session.json"
        try:
            saved = json.loads(path.read_text())
            self.agent_session_id = str(uuidlib.UUID(saved["session_id"]))
            # The agent writes its transcript at its first turn: an id that never ran
            # one cannot be resumed (--resume fails) and must be started afresh.
            self.resume = bool(saved.get("resumable", True))
            if self.cfg.model is None and saved.get("model"):
                self.sched.model = str(saved["model"])
        except (OSError, ValueError, KeyError, TypeError):
            self.agent_session_id = str(uuidlib.uuid4())
            self.resume = False

    def _save_session(self) -> None:
        path = self.cfg.session_dir / "session.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"session_id": self.agent_session_id, "model": self.sched.model,
                                   "resumable": self.resume}))
        os.replace(tmp, path)

    async def _drain(self) -> None:
        """Graceful stop: no new turns, interrupt the running one, wait for its result (bounded).

        Its client gets no result from this broker: the request was not
        finished, so the client resubmits it to the next broker.
        """
        if self.rq is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.rq.fileno())
        t = self.sched.turn
        agent = self.agent
        if t is None or agent is None or t.phase == "switching":
            return
        self._drained.clear()
        self._write(protocol.control_request(self._ctrl_id("int"), "interrupt"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.wait([asyncio.ensure_future(self._drained.wait()), asyncio.ensure_future(agent.exited.wait())],
                             return_when=asyncio.FIRST_COMPLETED),
                self.cfg.drain_timeout_s,
            )
        self.log.info("broker.drained", turn=t.id, finished=self._drained.is_set())

    def _stop_now(self) -> int:
        if self.agent is not None:
            self.agent.kill_group()
        return RET_SIGNAL

    async def _teardown(self) -> None:
        loop = asyncio.get_running_loop()
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.rq is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self.rq.fileno())
        if self.agent is not None:
            await self.agent.stop(self.cfg.stop_step_s)
        for c in list(self.clients.values()):
            self._close_client(c)
        self._sweep_dead_clients()
        if self.block is not None:
            rec = self._record()
            rec.closed = True
            self.block.write(rec)
        self._unlink_ipc()
        self._unlock()
        self.log.info("broker.stopped")

    def _unlink_ipc(self) -> None:
        if self.rq is not None:
            self.rq.unlink()
            self.rq.close()
            self.rq = None
        if self.block is not None:
            state.unlink(self.cfg.session)
            self.block.close()
            self.block = None

    # ================================================================ agent

    async def _spawn_agent(self) -> None:
        launch = self.adapter.launch(session_id=self.agent_session_id, resume=self.resume, model=self.sched.model)
        def on_line(line: bytes) -> None:
            if self.agent is agent:  # lines of a killed predecessor belong to no turn
                self._on_agent_line(line)

        def on_overlong(size: int) -> None:
            if self.agent is agent:
                self._on_overlong(size)

        agent = AgentProcess(
            launch,
            on_line=on_line,
            on_exit=self._on_agent_exit,
            on_overlong=on_overlong,
            on_stderr=self._on_agent_stderr,
            max_line_bytes=self.cfg.max_line_bytes,
        )
        await agent.start()
        self.agent = agent
        self.last_output_s = self.agent_started_s = time.monotonic()
        self.agent_served = False
        (self.cfg.session_dir / "agent.json").write_text(
            json.dumps({"pid": agent.pid, "pgid": agent.pid, "start_time": agent.start_time})
        )
        self._save_session()
        self.log.info("agent.started", pid=agent.pid, session_id=self.agent_session_id, model=self.sched.model)
        self._feed(AgentStarted(time.monotonic()))

    def _on_agent_exit(self, agent: AgentProcess, rc: int | None) -> None:
        if agent is not self.agent or self.stopping:
            return
        self.log.warning("agent.exited", pid=agent.pid, returncode=rc)
        # An agent that keeps dying right after start, before it began any turn (a
        # bad binary, a bad flag, a session it cannot resume), must not be respawned
        # in a tight loop. One that died in a turn is restarted at once.
        if not self.agent_served and time.monotonic() - self.agent_started_s < QUICK_EXIT_S:
            self.restart_failures += 1
        else:
            self.restart_failures = 0
        agent.kill_group()  # a tool child may still hold the pipes
        self._feed(AgentExited(time.monotonic(), reason=f"exited rc={rc}"))

    def _on_agent_stderr(self, data: bytes) -> None:
        text = data.decode(errors="replace").strip()
        if text:
            self.log.info("agent.stderr", text=text[:2000])

    def _on_overlong(self, size: int) -> None:
        self.counters["unrouted_lines"] += 1
        self.log.error("agent.line_dropped", bytes=size, bound=self.cfg.max_line_bytes)
        t = self.sched.turn
        if t is not None and t.phase != "switching" and not self.stopping:
            # The dropped line may have been the running turn's result (a result repeats the
            # reply's text): its end could then never be seen, and the holder has lost part
            # of its stream anyway. End the turn the way a dead agent ends it: restart, resume.
            self._feed(AgentExited(time.monotonic(), reason=f"output line of {size} bytes over the bound"))

    async def _restart(self, reason: str, model: str | None) -> None:
        old = self.agent
        self.agent = None
        self.uuid_turn.clear()
        self.pending_ctrl.clear()
        self._answer_relays_default()
        t0 = time.monotonic()
        if old is not None:
            await old.kill(timeout_s=self.cfg.stop_step_s)
        # Back off when the agent keeps dying right after start (the first time is
        # retried at once).
        if self.restart_failures > 1:
            await asyncio.sleep(min(10.0, 0.1 * 2 ** min(self.restart_failures, 7)))
        try:
            await self._spawn_agent()
        except OSError as exc:
            self.restart_failures += 1
            self.log.error("agent.spawn_failed", error=str(exc))
            self._feed(AgentExited(time.monotonic(), reason=f"spawn failed: {exc}"))
            return
        self.log.info("agent.restarted", reason=reason, model=model, ms=round((time.monotonic() - t0) * 1000, 1))

    def _write(self, data: bytes) -> bool:
        return self.agent is not None and self.agent.write(data)

    def _ctrl_id(self, what: str) -> str:
        self.ctrl_seq += 1
        return f"ts-{what}-{self.incarnation}-{self.ctrl_seq}"

    def _on_agent_line(self, line: bytes) -> None:
        now = time.monotonic()
        self.last_output_s = now
        try:
            obj = protocol.parse(line)
        except protocol.BadLine as exc:
            self.counters["unrouted_lines"] += 1
            self.log.error("agent.bad_line", error=str(exc), head=line[:200].decode(errors="replace"))
            return
        typ = obj.get("type")
        if self.stopping:
            if typ == "result":
                self._drained.set()
            return
        t = self.sched.turn
        delivering = t is not None and t.phase != "switching"
        if typ == "result":
            self._result_read_ns = time.perf_counter_ns()
            uuids = obj.get("user_message_uuids")
            turn_id = None
            if isinstance(uuids, list):
                for u in uuids:
                    if isinstance(u, str) and u in self.uuid_turn:
                        turn_id = self.uuid_turn.pop(u)
            elif delivering and t is not None and t.inited:
                # A CLI that does not list uuids: the one turn in flight, once it began
                # (a result before system/init is a start-up failure, no turn's answer).
                turn_id = t.id
            if turn_id is None or t is None or turn_id != t.id:
                self.counters["unrouted_lines"] += 1
                self.log.warning("agent.result_unrouted", uuids=uuids, turn=t.id if t else None)
                return
            self._deliver_event(t.request.client, t.request.req, t.id, line)
            sid = obj.get("session_id")
            if isinstance(sid, str) and sid and sid != self.agent_session_id:
                self._session_changed(sid)
            text = obj.get("result")
            self._feed(TurnResult(
                now, turn=t.id, is_error=bool(obj.get("is_error")), subtype=str(obj.get("subtype", "")),
                terminal_reason=obj.get("terminal_reason") if isinstance(obj.get("terminal_reason"), str) else None,
                text=text if isinstance(text, str) else "", session_id=self.agent_session_id,
            ))
            return
        if typ == "control_response":
            self._on_control_response(obj, now)
            return
        if typ == "control_request":
            self._on_agent_control_request(obj, now)
            return
        if typ == "control_cancel_request":
            rid = obj.get("request_id")
            if isinstance(rid, str):
                self.relays.pop(rid, None)
            return
        if typ == "system":
            sub = obj.get("subtype")
            sid = obj.get("session_id")
            if isinstance(sid, str) and sid and sid != self.agent_session_id:
                self._session_changed(sid)
            if sub == "init":
                self.agent_served = True
            if sub == "init" and not self.resume:
                # The conversation now exists: every later start continues it (--resume).
                self.resume = True
                self._save_session()
            if sub == "init" and delivering and t is not None and not t.inited:
                self._deliver_event(t.request.client, t.request.req, t.id, line)
                self._feed(TurnInit(now, t.id))
                return
        # Between a turn's user message and its system/init the agent may still be
        # printing the previous turn's tail (command_lifecycle "completed" follows
        # every result): that belongs to no turn. So does a lifecycle line naming
        # another message than the running turn's.
        if typ == "command_lifecycle" and t is not None and obj.get("command_uuid") != t.uuid:
            delivering = False
        if delivering and t is not None and t.inited and not obj.get("isReplay"):
            self._deliver_event(t.request.client, t.request.req, t.id, line)
        else:
            self.counters["unrouted_lines"] += 1
            self.log.debug("agent.unrouted", type=typ, subtype=obj.get("subtype"))

    def _session_changed(self, sid: str) -> None:
        self.log.info("agent.session_id", old=self.agent_session_id, new=sid)
        self.agent_session_id = sid
        self._save_session()
        self._mark_dirty()

    def _on_control_response(self, obj: dict[str, Any], now: float) -> None:
        cr = protocol.control_response(obj)
        what = self.pending_ctrl.pop(cr.request_id or "", None)
        if what == "set_model":
            model = cr.response.get("model") if cr.ok else None
            self._feed(ModelAnswered(now, ctrl_id=cr.request_id or "", ok=cr.ok,
                                     model=model if isinstance(model, str) else None, error=cr.error))
        elif what is None:
            self.log.debug("agent.control_response_unmatched", request_id=cr.request_id)

    def _on_agent_control_request(self, obj: dict[str, Any], now: float) -> None:
        rid = obj.get("request_id")
        req = obj.get("request")
        if not isinstance(rid, str) or not isinstance(req, dict):
            self.log.error("agent.control_request_malformed")
            return
        subtype = str(req.get("subtype", ""))
        t = self.sched.turn
        holder = self.clients.get(t.request.client) if t is not None else None
        if t is not None and holder is not None and subtype in holder.handles:
            self.relays[rid] = Relay(rid, subtype, holder.id, req, now + self.cfg.agent_request_timeout_s)
            self._send(holder.id, frames.AgentRequest(
                client=holder.id, req=t.request.req, turn=t.id, request_id=rid, subtype=subtype,
                data=protocol._json.encode(req),
            ))
            self._arm_timer(now + self.cfg.agent_request_timeout_s)
            self.log.info("agent.request_relayed", request_id=rid, subtype=subtype, client=holder.id)
            return
        self._answer_default(rid, subtype, req)

    def _answer_default(self, rid: str, subtype: str, req: dict[str, Any]) -> None:
        ok, body = protocol.default_answer(subtype, req)
        if ok and isinstance(body, dict):
            line = protocol.control_success(rid, body)
        else:
            line = protocol.control_error(rid, str(body))
        self._write(line)
        self.log.info("agent.request_default", request_id=rid, subtype=subtype, ok=ok)

    def _answer_relays_default(self, client: str | None = None) -> None:
        for rid, r in list(self.relays.items()):
            if client is None or r.client == client:
                del self.relays[rid]
                if client is not None:
                    self._answer_default(rid, r.subtype, r.request)

    # ================================================================ request queue

    def _on_rq_readable(self) -> None:
        rq = self.rq
        if rq is None or self.stopping:
            return
        for _ in range(BATCH):
            got = rq.receive_nowait()
            if got is None:
                return
            self._rq_received_ns = time.perf_counter_ns()
            self._on_message(got[0])
        # More may wait: come back after agent output had its turn.
        asyncio.get_running_loop().call_soon(self._on_rq_readable)

    def _on_message(self, data: bytes) -> None:
        now = time.monotonic()
        try:
            frame = frames.decode_request(data)
            if isinstance(frame, frames.Chunk):
                whole = self.reasm.add(frame, now)
                if whole is None:
                    return
                inner = frames.decode_request(whole)
                if inner.client != frame.client or isinstance(inner, frames.Chunk):
                    raise ProtocolError("chunk_sequence", "a chunk set must carry one frame of its own sender")
                frame = inner
            self._on_frame(frame, now)
        except ProtocolError as exc:
            client, req = frames.peek_sender(data)
            self._reject(client, req or "", exc)
        except Exception as exc:
            self.counters["rejected_frames"] += 1
            self.log.exception("frame.failed", error=repr(exc))

    def _reject(self, client: str | None, req: str, exc: TurnstileError) -> None:
        self.counters["rejected_frames"] += 1
        self._mark_dirty()
        self.log.warning("frame.rejected", client=client, req=req, error=str(exc))
        if client is None:
            return
        code = str(getattr(exc, "reason", exc.code))
        err = frames.Error(client=client, req=req, code=code, message=str(exc)[:4000])
        if client in self.clients:
            self._send(client, err)
            return
        # Not connected (yet): answer through its mailbox if a live owner holds one.
        owner = mailbox.read_owner(self.cfg.session, client)
        if owner is None or not names.is_alive(*owner):
            return
        try:
            writer = mailbox.MailboxWriter(self.cfg.session, client)
        except (OSError, IPCError):
            return
        with contextlib.suppress(ClientTooSlow):
            writer.send(frames.encode(err))
        writer.close()

    def _adopt(self, client: str, kind: frames.Kind | None, hello: frames.Hello | None = None) -> ClientConn | None:
        """Register a client from its hello, or from its mailbox header (frames a dead broker never read)."""
        session = self.cfg.session
        if hello is not None:
            pid, start = hello.pid, hello.start_time
        else:
            owner = mailbox.read_owner(session, client)
            if owner is None:
                return None
            pid, start = owner
        if kind is None:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # The pidfd now pins the process; checking the start time after opening it
        # makes sure it is the client, not a later process that reused the pid.
        if names.proc_start_time(pid) != start:
            os.close(pidfd)
            return None
        try:
            writer = mailbox.MailboxWriter(session, client, max_pending=self.cfg.client_buffer_bytes)
        except (OSError, IPCError) as exc:
            os.close(pidfd)
            self.log.warning("client.mailbox_refused", client=client, error=str(exc))
            return None
        if (writer.owner_pid, writer.owner_start) != (pid, start):
            writer.close()
            os.close(pidfd)
            self.log.warning("client.mailbox_owner_mismatch", client=client)
            return None
        conn = ClientConn(client, kind, pid, start, writer, pidfd, list(hello.handles) if hello else [])
        self.clients[client] = conn
        asyncio.get_running_loop().add_reader(pidfd, self._on_client_death, client)
        self._feed(Connected(time.monotonic(), client, kind))
        self._mark_dirty()
        self.log.info("client.connected", client=client, kind=kind, pid=pid, via="hello" if hello else "mailbox")
        return conn

    def _on_frame(self, frame: frames.RequestFrame, now: float) -> None:
        conn = self.clients.get(frame.client)
        if isinstance(frame, frames.Hello):
            if conn is not None:
                if conn.kind != frame.kind:
                    raise ProtocolError("kind_mismatch", f"client is a {conn.kind}, fixed at connect time")
                conn.handles = list(frame.handles)
                return
            if self._adopt(frame.client, frame.kind, frame) is None:
                self.log.warning("client.hello_refused", client=frame.client, pid=frame.pid)
            return
        if isinstance(frame, frames.Bye):
            if conn is not None:
                self._client_gone(conn.id, "bye")
            return
        if isinstance(frame, frames.Cancel) and frame.target is None:
            # A cancel by turn names its target fully and touches no request of the
            # sender: it needs no connected sender (`turnstile cancel` may be gone,
            # mailbox and all, before its frame is read).
            self._cancel_turn(frame, now)
            return
        kind = getattr(frame, "kind", None)
        if conn is None:
            conn = self._adopt(frame.client, kind if kind in frames.KINDS else None)
            if conn is None:
                self.counters["rejected_frames"] += 1
                self.log.warning("frame.unknown_client", client=frame.client, type=type(frame).__name__)
                return
        if kind is not None and kind != conn.kind:
            raise ProtocolError("kind_mismatch", f"client is a {conn.kind}, fixed at connect time; frame says {kind}")
        match frame:
            case frames.Prompt():
                self._feed(Submitted(
                    now, frame.client, frame.req, frame.kind, "prompt", content=frame.content, model=frame.model,
                    on_preempt=frame.on_preempt, resume_prompt=frame.resume_prompt,
                ))
            case frames.SetModel():
                self._feed(Submitted(now, frame.client, frame.req, frame.kind, "set_model", model=frame.model))
            case frames.Lease():
                self._feed(Submitted(now, frame.client, frame.req, frame.kind, "lease",
                                     lease_idle_s=frame.idle_timeout_s))
            case frames.Release():
                self._feed(Released(now, frame.client, frame.req))
            case frames.Cancel():
                self._feed(CancelAsked(now, frame.client, target=frame.target))
            case frames.ControlAnswer():
                self._on_answer(conn, frame)

    def _cancel_turn(self, frame: frames.Cancel, now: float) -> None:
        inc, turn = frame.incarnation, frame.turn
        if (inc is None or turn is None) and self.block is not None:
            inc, turn = self.block.read_cancel()  # a bare ring: the slot names the turn
        self._feed(CancelAsked(now, frame.client, incarnation=inc, turn=turn))
        if self.block is not None:
            self.block.clear_cancel()

    def _on_answer(self, conn: ClientConn, frame: frames.ControlAnswer) -> None:
        relay = self.relays.get(frame.request_id)
        if relay is None or relay.client != conn.id:
            self.log.info("client.answer_stale", client=conn.id, request_id=frame.request_id)
            return
        try:
            if frame.error is not None:
                line = protocol.control_error(relay.request_id, frame.error)
            else:
                answer = protocol.validate_answer(relay.subtype, frame.response)
                line = protocol.control_success(relay.request_id, answer)
        except (ValueError, TypeError) as exc:
            raise ProtocolError("invalid", f"answer to {relay.subtype}: {exc}") from None
        del self.relays[frame.request_id]
        self._write(line)
        self.log.info("agent.request_answered", request_id=relay.request_id, client=conn.id)

    # ================================================================ clients

    def _on_client_death(self, client: str) -> None:
        self._client_gone(client, "died")

    def _client_gone(self, client: str, why: str) -> None:
        conn = self.clients.get(client)
        if conn is None:
            return
        self.log.info("client.gone", client=client, kind=conn.kind, why=why)
        self._answer_relays_default(client)
        self.reasm.drop_client(client)
        self._feed(ClientGone(time.monotonic(), client, reason=why))

    def _close_client(self, conn: ClientConn) -> None:
        self.clients.pop(conn.id, None)
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(conn.pidfd)
        with contextlib.suppress(OSError):
            os.close(conn.pidfd)
        conn.writer.close()
        self._slow_clients.discard(conn.id)

    def _send(self, client: str, frame: frames.ReplyFrame) -> None:
        conn = self.clients.get(client)
        if conn is None:
            return
        try:
            conn.writer.send(frames.encode(frame))
        except ClientTooSlow as exc:
            self.counters["clients_failed_slow"] += 1
            self.log.error("client.too_slow", client=client, error=str(exc))
            self._client_gone(client, "client_too_slow")
            return
        if conn.writer.pending_bytes:
            self._slow_clients.add(client)
            self._arm_pump()

    def _arm_pump(self) -> None:
        # The client frees ring room without telling us: poll while it lags, rather
        # than leave its frames buffered until the next heartbeat.
        if self._pump_handle is None:
            self._pump_handle = asyncio.get_running_loop().call_later(PUMP_S, self._pump_slow)

    def _pump_slow(self) -> None:
        self._pump_handle = None
        for client in list(self._slow_clients):
            conn = self.clients.get(client)
            if conn is None or conn.writer.pump() == 0:
                self._slow_clients.discard(client)
        if self._slow_clients:
            self._arm_pump()

    def _deliver_event(self, client: str, req: str, turn: int, line: bytes) -> None:
        self._send(client, frames.Event(client=client, req=req, turn=turn, data=line))

    # ================================================================ scheduler glue

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
        deadline = self.sched.next_deadline()
        if deadline is not None:
            self._arm_timer(deadline)
        self._mark_dirty()

    def _mark_dirty(self) -> None:
        # Publish after the hot path, coalesced: the interrupt or prompt is written first.
        if not self._dirty:
            self._dirty = True
            asyncio.get_running_loop().call_soon(self._publish)

    def _do(self, d: Decision, cause: SchedEvent) -> None:
        match d:
            case WriteInterrupt():
                self._write(protocol.control_request(self._ctrl_id("int"), "interrupt"))
                us = (time.perf_counter_ns() - self._rq_received_ns) // 1000 if d.reason == "preempt" else 0
                if d.reason == "preempt" and isinstance(cause, Submitted):
                    self.latencies["last_preempt_signal_us"] = us
                self.log.info("turn.interrupt", turn=d.turn, reason=d.reason, broker_us=us or None)
            case WriteUser():
                ok = self._write(protocol.user_message(d.content, d.uuid))
                now_ns = time.perf_counter_ns()
                self.uuid_turn[d.uuid] = d.turn
                if isinstance(cause, TurnResult):
                    self.latencies["last_handoff_us"] = (now_ns - self._result_read_ns) // 1000
                elif isinstance(cause, Submitted):
                    self.latencies["last_submit_to_write_us"] = (now_ns - self._rq_received_ns) // 1000
                holder = self.sched.holder()
                self.log.info("turn.start", turn=d.turn, client=holder[0] if holder else None,
                              kind=holder[1] if holder else None, req=holder[2] if holder else None, written=ok)
            case WriteSetModel():
                self.pending_ctrl[d.ctrl_id] = "set_model"
                self._write(protocol.control_request(d.ctrl_id, "set_model", model=d.model))
                self.log.info("model.switch", model=d.model, ctrl_id=d.ctrl_id)
            case Deliver():
                self._send(d.client, d.frame)
                if isinstance(d.frame, frames.Result):
                    r = d.frame
                    self.log.info("request.result", client=d.client, req=r.req, status=r.status, turn=r.turn,
                                  queued_ms=r.queued_ms, turn_ms=r.turn_ms, error_code=r.error_code)
                elif isinstance(d.frame, frames.PreemptedNotice):
                    self.log.info("turn.preempted", client=d.client, req=d.frame.req, turn=d.frame.turn)
            case DropClient():
                conn = self.clients.get(d.client)
                if conn is not None:
                    self._close_client(conn)
                    mailbox.unlink(self.cfg.session, d.client)
            case RestartAgent():
                self.log.warning("agent.restart", reason=d.reason, model=d.model)
                self._restart_task = asyncio.ensure_future(self._restart(d.reason, d.model))

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
            # A stopping broker makes no more decisions: _drain ends the running turn, and
            # a deadline firing now (the drain timeout of a preempted turn) must neither
            # restart the agent nor answer a request its client will resubmit to the next broker.
            return
        self._feed(Tick(time.monotonic()))

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for rid, relay in list(self.relays.items()):
                if now >= relay.deadline:
                    del self.relays[rid]
                    self._answer_default(rid, relay.subtype, relay.request)
            for client in list(self._slow_clients):
                conn = self.clients.get(client)
                if conn is None or conn.writer.pump() == 0:
                    self._slow_clients.discard(client)
            expired = self.reasm.expire(now)
            for client, _cid in expired:
                self._reject(client, "", ProtocolError("chunk_timeout", "incomplete chunk set expired"))
            t = self.sched.turn
            if (t is not None and t.phase != "switching" and self.agent is not None
                    and now - self.last_output_s > self.cfg.idle_output_timeout_s):
                self.log.error("agent.wedged", silent_s=round(now - self.last_output_s, 1), turn=t.id)
                self._feed(AgentExited(now, reason="no output (wedged)"))
            self._feed(Tick(now))
            self._check_names()
            beats += 1
            if beats % SWEEP_EVERY == 0:
                self._sweep_dead_clients()
            self._publish()

    def _sweep_dead_clients(self) -> None:
        """Remove mailboxes of clients that died unwatched (while no broker ran, or before their hello)."""
        for r in sweep.sweep_dead_clients(self.cfg.session):
            if r.kind == "mailbox":
                self.log.info("client.mailbox_swept", name=r.name, why=r.reason)

    def _check_names(self) -> None:
        """Recreate the queue or state block if something removed their names (systemd RemoveIPC=yes)."""
        session = self.cfg.session
        if self.rq is not None and not rqueue.exists(session):
            old = self.rq
            loop = asyncio.get_running_loop()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(old.fileno())
            self.rq = rqueue.RequestQueue.create(
                session, max_messages=self.cfg.queue_max_messages, max_message_bytes=self.cfg.queue_message_bytes
            )
            while (got := old.receive_nowait()) is not None:
                self._on_message(got[0])
            old.close()
            loop.add_reader(self.rq.fileno(), self._on_rq_readable)
            self.log.error("ipc.recreated", object=self.rq.name, why="its name vanished (RemoveIPC?)")
        if self.block is not None and not state.exists(session):
            self.block.close()
            self.block = state.StateBlock.create(session)
            self.log.error("ipc.recreated", object=self.block.name, why="its name vanished (RemoveIPC?)")

    # ================================================================ state block

    def _record(self) -> state.StateRecord:
        s = self.sched
        holder = s.holder()
        counters = dict(self.counters)
        for k, v in s.counters.values.items():
            if k in counters:
                counters[k] += v
        agent = self.agent
        return state.StateRecord(
            broker_pid=os.getpid(),
            broker_start=self._broker_start,
            incarnation=self.incarnation,
            started_unix_ns=self.started_unix_ns,
            heartbeat_unix_ns=time.time_ns(),
            agent_pid=agent.pid if agent else 0,
            agent_state="up" if agent and s.agent_up else ("restarting" if s.restarting else "down"),
            session_id=self.agent_session_id,
            model=s.model or "",
            turn=s.turn.id if s.turn else 0,
            turn_state=s.turn.phase if s.turn else "idle",
            holder_client=holder[0] if holder else "",
            holder_kind=holder[1] if holder else "",
            holder_req=holder[2] if holder else "",
            lease_client=s.lease.client if s.lease else "",
            webhooks_queued=len(s.webhooks),
            workers_queued=len(s.workers),
            clients=len(self.clients),
            counters=counters,
            latencies=dict(self.latencies),
        )

    def _publish(self) -> None:
        if self.block is not None:
            self.block.write(self._record())
            self._dirty = False


def _client_side(d: Decision) -> bool:
    """Sort key: False for decisions that write to the agent, True for the rest."""
    return not isinstance(d, (WriteInterrupt, WriteUser, WriteSetModel))


def run(cfg: BrokerConfig) -> int:
    """Run a broker in this process until it is stopped; returns the exit code."""
    import uvloop

    blog.configure(cfg.log_format, cfg.log_level)
    broker = Broker(cfg)
    return uvloop.run(_serve(broker))


async def _serve(broker: Broker) -> int:
    loop = asyncio.get_running_loop()
    loop.call_soon(lambda: None)
    code = await broker.serve()
    return code


__all__ = ["AlreadyRunning", "Broker", "Path", "run"]
