"""The link to the agent process: spawn, restart, the one stdin writer, and routing its output.

Everything that ties agent lines to turns lives here and nowhere else: the
``uuid`` stamped on each user message (a ``result`` lists the uuids it answers
in ``user_message_uuids``, so output is routed by that, never by "the next
result"), the ids of our own control requests awaiting a response, and the
agent's control requests relayed to the turn holder. Output that belongs to no
turn is counted and logged, never delivered. A restart forgets all three: the
new process knows none of those ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker import agent_messages as am
from broker import protocol
from broker.agentproc import AgentProcess
from broker.agents.base import AgentAdapter
from broker.config import BrokerConfig
from broker.publisher import Publisher
from broker.registry import Registry
from broker.scheduler import (
    AgentExited,
    AgentStarted,
    ModelAnswered,
    ResultRead,
    RunningTurn,
    SchedEvent,
    Scheduler,
    SpawnFailed,
    TurnInit,
)
from broker.session_store import SessionStore
from ipc import frames
from ipc.errors import ProtocolError

#: What the CLI says on stderr when ``--session-id`` names a conversation that already has a transcript.
ID_IN_USE = "already in use"

#: An agent that exits sooner than this after its start, before any turn, counts towards the restart back-off.
QUICK_EXIT_S = 5.0


@dataclass
class Relay:
    """An agent control request waiting for the turn holder's answer."""

    request_id: str
    subtype: str
    client: str
    request: dict[str, Any]
    deadline: float


class Relays:
    """The agent's own control requests (``can_use_tool``, ``hook_callback``, ...), each answered once.

    A request goes to the turn holder when it registered a handler for that
    subtype, and its answer is validated before it reaches the agent; otherwise,
    or when the holder goes or its deadline passes, the agent gets a safe
    default answer (:func:`broker.protocol.default_answer`). Never unanswered.
    """

    def __init__(
        self, timeout_s: float, log: Any, sched: Scheduler, registry: Registry, write: Callable[[bytes], bool],
        default_permission: str = "deny",
    ) -> None:
        self.timeout_s = timeout_s
        self.default_permission = default_permission
        self.log = log
        self.sched = sched
        self.registry = registry
        self._write = write
        self._waiting: dict[str, Relay] = {}

    def on_request(self, msg: am.ControlRequest, now: float) -> None:
        """Relay the request to the running turn's holder if it handles it, else answer it now."""
        rid, subtype = msg.request_id, msg.subtype
        t = self.sched.turn
        holder = self.registry.get(t.request.client) if t is not None else None
        if t is not None and holder is not None and subtype in holder.handles:
            self._waiting[rid] = Relay(rid, subtype, holder.id, msg.request, now + self.timeout_s)
            self.registry.send(holder.id, frames.AgentRequest(
                client=holder.id, req=t.request.req, turn=t.id, request_id=rid, subtype=subtype,
                data=protocol.encode(msg.request),
            ))
            self.log.info("agent.request_relayed", request_id=rid, subtype=subtype, client=holder.id)
            return
        self._answer_default(rid, subtype, msg.request)

    def answer(self, client: str, frame: frames.ControlAnswer) -> None:
        """The holder's answer to a relayed request: validated, then written to the agent."""
        relay = self._waiting.get(frame.request_id)
        if relay is None or relay.client != client:
            self.log.info("client.answer_stale", client=client, request_id=frame.request_id)
            return
        try:
            if frame.error is not None:
                line = protocol.control_error(relay.request_id, frame.error)
            else:
                answer = protocol.validate_answer(relay.subtype, frame.response)
                line = protocol.control_success(relay.request_id, answer)
        except (ValueError, TypeError) as exc:
            raise ProtocolError("invalid", f"answer to {relay.subtype}: {exc}") from None
        del self._waiting[frame.request_id]
        self._write(line)
        self.log.info("agent.request_answered", request_id=relay.request_id, client=client)

    def withdrawn(self, request_id: str) -> None:
        """The agent cancelled the request: a late answer to it is stale."""
        self._waiting.pop(request_id, None)

    def client_gone(self, client: str) -> None:
        """The holder went: the agent must not wait for its answers."""
        self._settle(lambda r: r.client == client, answer=True)

    def expire(self, now: float) -> None:
        """Default-answer the requests whose holder did not answer in time."""
        self._settle(lambda r: now >= r.deadline, answer=True)

    def forget_all(self) -> None:
        """The agent is being replaced: the new process asked none of these."""
        self._settle(lambda r: True, answer=False)

    def _settle(self, which: Callable[[Relay], bool], *, answer: bool) -> None:
        for rid, r in list(self._waiting.items()):
            if which(r):
                del self._waiting[rid]
                if answer:
                    self._answer_default(rid, r.subtype, r.request)

    def _answer_default(self, rid: str, subtype: str, req: dict[str, Any]) -> None:
        ok, body = protocol.default_answer(subtype, req, self.default_permission)
        if ok and isinstance(body, dict):
            line = protocol.control_success(rid, body)
        else:
            line = protocol.control_error(rid, str(body))
        self._write(line)
        self.log.info("agent.request_default", request_id=rid, subtype=subtype, ok=ok)


class AgentLink:
    """Owns the agent process and every id that ties its output to a turn."""

    def __init__(
        self,
        cfg: BrokerConfig,
        log: Any,
        adapter: AgentAdapter,
        *,
        incarnation: str,
        sched: Scheduler,
        store: SessionStore,
        registry: Registry,
        publisher: Publisher,
        feed: Callable[[SchedEvent], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.adapter = adapter
        self.incarnation = incarnation
        self.sched = sched
        self.store = store
        self.registry = registry
        self.publisher = publisher
        self.feed = feed
        self.stopping = stopping
        self.agent: AgentProcess | None = None
        #: Running turn's user-message uuid → turn id (a result names the uuids it answers).
        self._uuid_turn: dict[str, int] = {}
        #: Our control requests awaiting the agent's response: id → what it was.
        self._pending_ctrl: dict[str, str] = {}
        #: The agent's control requests awaiting the turn holder's answer.
        self.relays = Relays(cfg.agent_request_timeout_s, log, sched, registry, self._write,
                             default_permission=cfg.default_permission)
        self._ctrl_seq = 0
        self._last_output_s = time.monotonic()
        self._started_s = 0.0
        self._served = False  # the running agent began a turn (printed system/init)
        self._restart_failures = 0
        # A --session-id start was refused because the conversation exists: the next start resumes it.
        self._id_in_use = False
        self._exit_task: asyncio.Task[None] | None = None  # an exit reported once its stderr is read
        self._restart_task: asyncio.Task[None] | None = None
        #: When the last result was read (perf_counter ns): where a handoff's latency starts.
        self.result_read_ns = 0
        self._drained = asyncio.Event()
        registry.gone_hooks.append(self.relays.client_gone)

    @property
    def pid(self) -> int:
        """The running agent's pid (0 when there is none)."""
        return self.agent.pid if self.agent is not None else 0

    # ---------------------------------------------------------------- process

    async def spawn(self) -> None:
        """Start an agent process on the session's conversation (``--resume`` once it exists)."""
        store = self.store
        launch = self.adapter.launch(session_id=store.session_id, resume=store.resumable, model=self.sched.model)

        def on_line(line: bytes) -> None:
            if self.agent is agent:  # lines of a killed predecessor belong to no turn
                self._on_line(line)

        def on_overlong(size: int) -> None:
            if self.agent is agent:
                self._on_overlong(size)

        fresh = not store.resumable

        def on_stderr(data: bytes) -> None:
            self._on_stderr(data, fresh=fresh)

        agent = AgentProcess(
            launch,
            on_line=on_line,
            on_exit=self._on_exit,
            on_overlong=on_overlong,
            on_stderr=on_stderr,
            max_line_bytes=self.cfg.max_line_bytes,
            on_line_error=self._on_line_error,
        )
        await agent.start()
        self.agent = agent
        if launch.initialize is not None:
            # First on stdin, so it is read before any prompt: registers the hooks whose
            # hook_callback requests then reach the broker (as the Agent SDK does).
            self._write(protocol.control_request(self._ctrl_id("init"), "initialize", **launch.initialize))
        self._last_output_s = self._started_s = time.monotonic()
        self._served = False
        try:
            store.record_agent(agent.pid, agent.start_time)
        except OSError as exc:
            # A full disk must not strand a running agent the scheduler was never told of:
            # the records only help reap orphans and resume after a broker crash.
            self.log.error("agent.record_failed", pid=agent.pid, error=str(exc))
        store.save(self.sched.model)  # never raises: a failed save is retried every tick
        self.log.info("agent.started", pid=agent.pid, session_id=store.session_id, model=self.sched.model)
        self.feed(AgentStarted(time.monotonic()))

    def _on_exit(self, agent: AgentProcess, rc: int | None) -> None:
        if agent is not self.agent or self.stopping():
            return
        if not self._served and not agent.stderr_closed.is_set():
            # Its exit can be seen before its last stderr bytes, which may say why it could not
            # start (ID_IN_USE): read them first (bounded), then report the exit.
            self._exit_task = asyncio.ensure_future(self._exit_after_stderr(agent, rc))
            return
        self._exited(agent, rc)

    async def _exit_after_stderr(self, agent: AgentProcess, rc: int | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.stderr_closed.wait(), self.cfg.stop_step_s)
        if agent is self.agent and not self.stopping():
            self._exited(agent, rc)

    def _exited(self, agent: AgentProcess, rc: int | None) -> None:
        self.log.warning("agent.exited", pid=agent.pid, returncode=rc)
        # An agent that keeps dying right after start, before it began any turn (a
        # bad binary, a bad flag, a session it cannot resume), must not be respawned
        # in a tight loop. One that died in a turn is restarted at once.
        if not self._served and time.monotonic() - self._started_s < QUICK_EXIT_S:
            self._restart_failures += 1
        else:
            self._restart_failures = 0
        agent.kill_group()  # a tool child may still hold the pipes
        self.feed(AgentExited(time.monotonic(), reason=f"exited rc={rc}", refused_start=self._id_in_use))

    def _on_stderr(self, data: bytes, *, fresh: bool) -> None:
        text = data.decode(errors="replace").strip()
        if text:
            self.log.info("agent.stderr", text=text[:2000])
        if fresh and ID_IN_USE in text:
            # The previous broker died after the agent wrote the conversation's first turn
            # but before session.json said so: the id exists, and only --resume opens it.
            self._id_in_use = True

    def _on_line_error(self, exc: Exception, line: bytes) -> None:
        # A bug or a failure while handling one line (the reader itself goes on): count
        # and log it with its traceback. What failed for one client was that client's.
        self.publisher.count("unrouted_lines")
        self.log.error("agent.line_failed", error=repr(exc), bytes=len(line),
                       head=line[:200].decode(errors="replace"), exc_info=exc)

    def _on_overlong(self, size: int) -> None:
        self.publisher.count("unrouted_lines")
        self.log.error("agent.line_dropped", bytes=size, bound=self.cfg.max_line_bytes)
        t = self.sched.turn
        if t is not None and t.phase != "switching" and not self.stopping():
            # The dropped line may have been the running turn's result (a result repeats the
            # reply's text): its end could then never be seen, and the holder has lost part
            # of its stream anyway. End the turn the way a dead agent ends it: restart, resume.
            self.feed(AgentExited(time.monotonic(), reason=f"output line of {size} bytes over the bound"))

    def restart(self, reason: str, model: str | None, delay_s: float = 0.0) -> None:
        """Kill the agent's group and start a new one after ``delay_s`` (in the background; the loop goes on)."""
        self.log.warning("agent.restart", reason=reason, model=model, delay_s=delay_s or None)
        self._restart_task = asyncio.ensure_future(self._restart(reason, model, delay_s))

    async def _restart(self, reason: str, model: str | None, delay_s: float) -> None:
        old = self.agent
        self.agent = None
        # The new process knows none of the old one's ids.
        self._uuid_turn.clear()
        self._pending_ctrl.clear()
        self.relays.forget_all()
        t0 = time.monotonic()
        if old is not None:
            await old.kill(timeout_s=self.cfg.stop_step_s)
        if self._id_in_use:
            self._id_in_use = False
            self.store.resumable = True
            self.store.save(self.sched.model)
            self._restart_failures = 0  # not a failing agent: resume at once, no back-off
            self.log.warning("agent.session_id_in_use", session_id=self.store.session_id, next="--resume")
        # Back off when the agent keeps dying right after start (the first time is
        # retried at once); the scheduler sets the back-off after a failed start.
        if self._restart_failures > 1:
            delay_s = max(delay_s, min(10.0, 0.1 * 2 ** min(self._restart_failures, 7)))
        if delay_s:
            await asyncio.sleep(delay_s)
        try:
            await self.spawn()
        except Exception as exc:
            # ENOENT (the binary moved away), EACCES, EMFILE (uvloop reports some as errno -1), ...
            self.log.error("agent.spawn_failed", error=str(exc) or repr(exc), reason=reason)
            self.feed(SpawnFailed(time.monotonic(), error=str(exc) or repr(exc)))
            return
        self.log.info("agent.restarted", reason=reason, model=model, ms=round((time.monotonic() - t0) * 1000, 1))

    async def drain(self) -> None:
        """Interrupt the running turn and wait for its result or the agent's exit (bounded)."""
        t = self.sched.turn
        agent = self.agent
        if t is None or agent is None or t.phase == "switching":
            return
        self._drained.clear()
        self.interrupt()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.wait([asyncio.ensure_future(self._drained.wait()), asyncio.ensure_future(agent.exited.wait())],
                             return_when=asyncio.FIRST_COMPLETED),
                self.cfg.drain_timeout_s,
            )
        self.log.info("broker.drained", turn=t.id, finished=self._drained.is_set())

    async def stop(self) -> None:
        """Cancel a restart under way and stop the agent in bounded steps."""
        for task in (self._restart_task, self._exit_task):
            if task is not None:
                task.cancel()
        if self.agent is not None:
            await self.agent.stop(self.cfg.stop_step_s)

    def kill_now(self) -> None:
        """SIGKILL the agent's group at once (the second signal)."""
        if self.agent is not None:
            self.agent.kill_group()

    # ---------------------------------------------------------------- writing (the only writer)

    def _write(self, data: bytes) -> bool:
        return self.agent is not None and self.agent.write(data)

    def _ctrl_id(self, what: str) -> str:
        self._ctrl_seq += 1
        return f"ts-{what}-{self.incarnation}-{self._ctrl_seq}"

    def interrupt(self) -> None:
        """Write an ``interrupt`` control request."""
        self._write(protocol.control_request(self._ctrl_id("int"), "interrupt"))

    def write_user(self, turn: int, uuid: str, content: str | list[dict[str, Any]]) -> bool:
        """Write a turn's user message; its result will be routed to ``turn`` by ``uuid``."""
        ok = self._write(protocol.user_message(content, uuid))
        self._uuid_turn[uuid] = turn
        return ok

    def set_model(self, ctrl_id: str, model: str) -> None:
        """Write a ``set_model`` control request; the scheduler hears the response by ``ctrl_id``."""
        self._pending_ctrl[ctrl_id] = "set_model"
        self._write(protocol.control_request(ctrl_id, "set_model", model=model))

    # ---------------------------------------------------------------- reading

    def _on_line(self, line: bytes) -> None:
        now = time.monotonic()
        self._last_output_s = now
        try:
            msg = am.decode(line)
        except am.BadLine as exc:
            self.publisher.count("unrouted_lines")
            self.log.error("agent.bad_line", error=str(exc), head=line[:200].decode(errors="replace"))
            return
        if self.stopping():
            if isinstance(msg, am.Result):
                self._drained.set()
            return
        t = self.sched.turn
        running = t if t is not None and t.phase != "switching" else None
        match msg:
            case am.Result():
                self._on_result(msg, t, running, now)
            case am.Init():
                self._on_init(msg, running, now)
            case am.System():
                self._saw_session_id(msg.session_id)
                self._deliver_or_drop(msg.raw, running, msg.is_replay, "system", msg.subtype)
            case am.CommandLifecycle():
                # Between a turn's user message and its system/init the agent may still be
                # printing the previous turn's tail ("completed" follows every result): that
                # belongs to no turn. So does a lifecycle line naming another message.
                mine = running if t is not None and msg.command_uuid == t.uuid else None
                self._deliver_or_drop(msg.raw, mine, msg.is_replay, "command_lifecycle", msg.subtype)
            case am.ControlResponse():
                self._on_control_response(msg.reply, now)
            case am.ControlRequest():
                self.relays.on_request(msg, now)
            case am.BadControlRequest():
                self.log.error("agent.control_request_malformed")
            case am.ControlCancelRequest():
                if msg.request_id is not None:
                    self.relays.withdrawn(msg.request_id)
            case am.Other():
                self._deliver_or_drop(msg.raw, running, msg.is_replay, msg.type, msg.subtype)

    def _deliver(self, t: RunningTurn, line: bytes) -> None:
        r = t.request
        self.registry.send(r.client, frames.Event(client=r.client, req=r.req, turn=t.id, data=line))

    def _deliver_or_drop(self, line: bytes, running: RunningTurn | None, replay: bool, typ: Any, subtype: Any) -> None:
        if running is not None and running.inited and not replay:
            self._deliver(running, line)
        else:
            self.publisher.count("unrouted_lines")
            self.log.debug("agent.unrouted", type=typ, subtype=subtype)

    def _on_result(self, msg: am.Result, t: RunningTurn | None, running: RunningTurn | None, now: float) -> None:
        self.result_read_ns = time.perf_counter_ns()
        turn_id = None
        if msg.uuids is not None:
            for u in msg.uuids:
                if u in self._uuid_turn:
                    turn_id = self._uuid_turn.pop(u)
        elif running is not None and running.inited:
            # A CLI that does not list uuids: the one turn in flight, once it began
            # (a result before system/init is a start-up failure, no turn's answer).
            turn_id = running.id
        if turn_id is None or t is None or turn_id != t.id:
            self.publisher.count("unrouted_lines")
            self.log.warning("agent.result_unrouted", uuids=msg.uuids, turn=t.id if t else None)
            return
        self._saw_session_id(msg.session_id)
        ended = ResultRead(
            now, turn=t.id, is_error=msg.is_error, subtype=msg.subtype, terminal_reason=msg.terminal_reason,
            text=msg.text, session_id=self.store.session_id,
        )
        if ended.interrupted and t.reason == "preempt" and t.request.on_preempt == "requeue":
            # The preempted attempt's own result (error_during_execution) is not the request's:
            # in the stream it would read as its end. The preempted notice, then the rerun, follow.
            self.log.info("turn.attempt_result_withheld", turn=t.id, subtype=msg.subtype,
                          terminal_reason=msg.terminal_reason)
        else:
            self._deliver(t, msg.raw)
        self.feed(ended)

    def _on_init(self, msg: am.Init, running: RunningTurn | None, now: float) -> None:
        self._saw_session_id(msg.session_id)
        self._served = True
        if not self.store.resumable:
            # The conversation now exists: every later start continues it (--resume).
            self.store.resumable = True
            self.store.save(self.sched.model)
        if running is not None and not running.inited:
            self._deliver(running, msg.raw)
            self.feed(TurnInit(now, running.id, model=msg.model))
            return
        self._deliver_or_drop(msg.raw, running, msg.is_replay, "system", "init")

    def _saw_session_id(self, sid: str | None) -> None:
        # The CLI can change its conversation id (conversation_reset): resume that one next time.
        if sid and sid != self.store.session_id:
            self.log.info("agent.session_id", old=self.store.session_id, new=sid)
            self.store.session_id = sid
            self.store.save(self.sched.model)
            self.publisher.mark_dirty()

    def _on_control_response(self, cr: protocol.ControlResponse, now: float) -> None:
        what = self._pending_ctrl.pop(cr.request_id or "", None)
        if what == "set_model":
            model = cr.response.get("model") if cr.ok else None
            self.feed(ModelAnswered(now, ctrl_id=cr.request_id or "", ok=cr.ok,
                                    model=model if isinstance(model, str) else None, error=cr.error))
        elif what is None:
            self.log.debug("agent.control_response_unmatched", request_id=cr.request_id)

    def tick(self, now: float) -> None:
        """Periodic work: default-answer relays past their deadline; declare a silent agent wedged."""
        self.relays.expire(now)
        t = self.sched.turn
        if (t is not None and t.phase != "switching" and self.agent is not None
                and now - self._last_output_s > self.cfg.idle_output_timeout_s):
            self.log.error("agent.wedged", silent_s=round(now - self._last_output_s, 1), turn=t.id)
            self.feed(AgentExited(now, reason="no output (wedged)"))
