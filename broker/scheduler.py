"""The scheduler: a pure state machine that grants the session turn by turn.

Events in, decisions out. No I/O and no clock of its own: every event carries
``now`` (monotonic seconds) and the caller feeds :class:`Tick` events to let
deadlines fire. Everything racy in the threaded design becomes a sequence of
events here, which the tests drive exhaustively.

Invariants kept after every event (checked by :meth:`Scheduler.check`):

* at most one turn in flight, and the agent is never sent a user message
  while one runs;
* webhooks always run before any worker (a worker lease yields to queued
  webhooks between turns, a running worker turn is interrupted);
* within a kind, each client's requests run first-in first-out and clients
  take turns (round-robin), so one client's backlog cannot hold back another's
  request by more than one turn per waiting client;
* a cancel acts only on the turn it names;
* a preempted worker request goes back to the head of the worker line (or is
  answered ``preempted`` when it asked for that), never lost, never running
  twice at once;
* every accepted request ends in exactly one terminal reply to its client,
  unless that client died;
* an agent that cannot be started (spawn failed, or started and never
  answered within ``start_timeout_s``) is retried with bounded back-off, and
  no request waits for it longer than ``unavailable_timeout_s``: it ends with
  an ``agent_unavailable`` error; the first start that succeeds resumes service.
"""

from __future__ import annotations

import collections
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from ipc import defaults, frames

Op = Literal["prompt", "set_model", "lease"]
Phase = Literal["switching", "running", "interrupting"]
Reason = Literal["preempt", "cancel", "client_gone"]

#: A worker request that was running when the agent died this many times is failed, not rerun.
MAX_ATTEMPTS = 3
RESUME_NOTE = (
    "[turnstile: your previous answer to this request was interrupted by an urgent request "
    "and may be incomplete. Continue, and answer the request below in full.]\n\n"
)


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Connected:
    """A client said hello."""

    now: float
    client: str
    kind: frames.Kind


@dataclass(frozen=True)
class Submitted:
    """A client asked for a turn (prompt), a model switch, or a lease."""

    now: float
    client: str
    req: str
    kind: frames.Kind
    op: Op = "prompt"
    content: str | list[dict[str, Any]] = ""
    model: str | None = None
    on_preempt: frames.OnPreempt = "requeue"
    resume_prompt: str | None = None
    lease_idle_s: float | None = None


@dataclass(frozen=True)
class Released:
    """A client ended its lease."""

    now: float
    client: str
    req: str = ""


@dataclass(frozen=True)
class CancelAsked:
    """A cancel naming a turn (incarnation, turn) or one of the sender's requests."""

    now: float
    client: str
    incarnation: str | None = None
    turn: int | None = None
    target: str | None = None


@dataclass(frozen=True)
class AgentStarted:
    """The agent process is up and can take input."""

    now: float


@dataclass(frozen=True)
class TurnInit:
    """The agent printed ``system/init`` for the running turn: it is now interruptible.

    ``model`` is the model the init line names: the one the turn runs on.
    """

    now: float
    turn: int
    model: str | None = None


@dataclass(frozen=True)
class ResultRead:
    """The agent printed the ``result`` that answers the running turn's user message."""

    now: float
    turn: int
    is_error: bool = False
    subtype: str = "success"
    terminal_reason: str | None = None
    text: str = ""
    session_id: str | None = None
    raw: bytes | None = None

    @property
    def interrupted(self) -> bool:
        """The turn ended because it was interrupted (not because it finished first)."""
        return self.subtype == "error_during_execution" or (self.terminal_reason or "").startswith("aborted")


@dataclass(frozen=True)
class ModelAnswered:
    """The agent answered a ``set_model`` control request (matched by nested request id)."""

    now: float
    ctrl_id: str
    ok: bool
    model: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class SpawnFailed:
    """The runtime could not start the agent process it was told to (re)start."""

    now: float
    error: str


@dataclass(frozen=True)
class AgentExited:
    """The agent process died (or stopped producing output and was declared wedged)."""

    now: float
    reason: str = "exited"
    #: It refused its command line before it read any turn (nothing reached the model):
    #: a turn it had not begun runs again on the next agent instead of failing.
    refused_start: bool = False


@dataclass(frozen=True)
class ClientGone:
    """A client process died or said bye."""

    now: float
    client: str
    reason: str = "died"  # "died", "bye", "client_too_slow"


@dataclass(frozen=True)
class Tick:
    """Time passed; deadlines may fire."""

    now: float


SchedEvent = (
    Connected | Submitted | Released | CancelAsked | AgentStarted | TurnInit | ResultRead
    | ModelAnswered | AgentExited | SpawnFailed | ClientGone | Tick
)


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class WriteUser:
    """Write one user message to the agent (stamped with ``uuid``)."""

    turn: int
    uuid: str
    content: str | list[dict[str, Any]]
    submitted_at: float


@dataclass(frozen=True)
class WriteInterrupt:
    """Write an ``interrupt`` control request for the running turn."""

    turn: int
    reason: Reason
    asked_at: float


@dataclass(frozen=True)
class WriteSetModel:
    """Write a ``set_model`` control request."""

    ctrl_id: str
    model: str


@dataclass(frozen=True)
class RestartAgent:
    """Kill the agent's process group (if alive) and start it again with ``--resume``.

    ``delay_s`` is the back-off to wait before starting: 0 after a crash, growing
    (bounded by ``Config.spawn_backoff_max_s``) while starts keep failing.
    """

    reason: str
    model: str | None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Deliver:
    """Send a reply frame to a client's mailbox."""

    client: str
    frame: frames.ReplyFrame


@dataclass(frozen=True)
class DropClient:
    """Forget a client: close and remove its mailbox."""

    client: str


Decision = WriteUser | WriteInterrupt | WriteSetModel | RestartAgent | Deliver | DropClient


# ---------------------------------------------------------------- state


@dataclass
class Request:
    """One accepted request, queued or running."""

    client: str
    req: str
    kind: frames.Kind
    op: Op
    content: str | list[dict[str, Any]]
    model: str | None
    on_preempt: frames.OnPreempt
    resume_prompt: str | None
    lease_idle_s: float | None
    submitted_at: float
    attempts: int = 0
    preemptions: int = 0
    lost: int = 0  # runs lost with the agent (crash, drain timeout) and rerun

    @property
    def key(self) -> tuple[str, str]:
        return (self.client, self.req)


class Line:
    """The queued requests of one kind: first-in first-out per client, round-robin between clients.

    ``queues`` maps each client with queued requests to them, in the order the
    clients take their turns (a dict keeps insertion order). A client whose
    request leaves to run goes to the back of that order; a request put back at
    the head (a preempted or lost worker turn, a switch that stepped back) takes
    its client to the front, so it runs next.
    """

    def __init__(self) -> None:
        self.queues: dict[str, collections.deque[Request]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def __bool__(self) -> bool:
        return bool(self.queues)

    def __iter__(self) -> Iterator[Request]:
        return iter(self.order())

    def append(self, r: Request) -> int:
        """Queue ``r`` behind its client's other requests; return how many of this kind run before it."""
        q = self.queues.setdefault(r.client, collections.deque())
        mine = len(q)
        q.append(r)
        # r runs in round ``mine``: every other client runs up to ``mine`` requests before it,
        # and one more if it comes before r's client in the order.
        ahead, before = mine, True
        for client, other in self.queues.items():
            if client == r.client:
                before = False
            else:
                ahead += min(len(other), mine + 1 if before else mine)
        return ahead

    def appendleft(self, r: Request) -> None:
        """Put ``r`` back at the head: it runs next among its kind."""
        q = self.queues.pop(r.client, collections.deque())
        q.appendleft(r)
        self.queues = {r.client: q, **self.queues}

    def head(self) -> Request | None:
        """The request that runs next, if any."""
        for q in self.queues.values():
            return q[0]
        return None

    def first_of(self, client: str) -> Request | None:
        """``client``'s oldest queued request (a lease holder's next request skips the order)."""
        q = self.queues.get(client)
        return q[0] if q else None

    def take(self, r: Request) -> None:
        """``r`` leaves the line to run: its client goes to the back of the order."""
        q = self.queues.pop(r.client)
        q.remove(r)
        if q:
            self.queues[r.client] = q

    def remove(self, r: Request) -> None:
        """``r`` leaves the line without running (cancelled, failed, its client gone)."""
        q = self.queues[r.client]
        q.remove(r)
        if not q:
            del self.queues[r.client]

    def order(self) -> list[Request]:
        """Every queued request, in the order they would run."""
        queues = [list(q) for q in self.queues.values()]
        out: list[Request] = []
        for i in range(max((len(q) for q in queues), default=0)):
            out.extend(q[i] for q in queues if i < len(q))
        return out

    def check(self) -> None:
        """Raise :class:`SchedulerBug` if a client's queue is empty or holds another client's request."""
        for client, q in self.queues.items():
            if not q or any(r.client != client for r in q):
                raise SchedulerBug(f"client {client}'s queue is empty or holds another client's request")


@dataclass
class RunningTurn:
    """The one request the agent is working on."""

    id: int
    request: Request
    uuid: str
    phase: Phase
    started_at: float
    inited: bool = False
    reason: Reason | None = None
    interrupt_sent: bool = False
    deadline: float | None = None  # the drain or model-switch bound
    start_deadline: float | None = None  # an agent not yet heard from must print system/init by then
    ctrl_id: str | None = None
    target_model: str | None = None
    preempt_asked_at: float | None = None
    queued_ms: float = 0.0


@dataclass
class LeaseState:
    """Who holds the session across turns."""

    client: str
    kind: frames.Kind
    idle_s: float
    deadline: float


@dataclass
class Config:
    """Scheduler settings (all durations in seconds)."""

    incarnation: str = "0" * 16
    drain_timeout_s: float = defaults.DRAIN_TIMEOUT_S
    model_timeout_s: float = defaults.MODEL_TIMEOUT_S
    lease_idle_s: float = defaults.LEASE_IDLE_S
    model: str | None = None
    remembered_results: int = 1024
    #: ... holding at most this many bytes of result text and raw result lines: a reply can be
    #: megabytes, and 1024 of them would be gigabytes. (A duplicate of a forgotten request runs again.)
    remembered_result_bytes: int = 32 * 1024 * 1024
    #: An agent that has not answered anything since it started must print ``system/init``
    #: for its first turn (or answer its first ``set_model``) this soon, or it counts as a failed start.
    start_timeout_s: float = defaults.AGENT_START_TIMEOUT_S
    #: While the agent cannot be started, no request waits longer than this for it.
    unavailable_timeout_s: float = defaults.AGENT_UNAVAILABLE_TIMEOUT_S
    #: Back-off between failed starts: doubles from the first value up to the second.
    spawn_backoff_s: float = defaults.SPAWN_BACKOFF_S
    spawn_backoff_max_s: float = defaults.SPAWN_BACKOFF_MAX_S


@dataclass
class Counters:
    """What happened, for the state block and logs."""

    values: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))

    def inc(self, name: str, by: int = 1) -> None:
        self.values[name] += by


class SchedulerBug(AssertionError):
    """An invariant was broken: a bug in the scheduler, never a user error."""


class Scheduler:
    """Grants the session: feed events with :meth:`handle`, carry out the decisions it returns."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or Config()
        self.incarnation = self.config.incarnation
        self.model: str | None = self.config.model
        self.clients: dict[str, frames.Kind] = {}
        self.requests: dict[tuple[str, str], Request] = {}
        self.webhooks = Line()
        self.workers = Line()
        self.turn: RunningTurn | None = None
        self.lease: LeaseState | None = None
        self.suspended_lease: LeaseState | None = None  # a worker lease waiting out a webhook lease
        self.agent_up = False
        self.agent_busy = False  # a user message was written and its result not read
        self.restarting = False
        # Agent availability. proven: the running agent answered something since it started.
        # failures: starts that failed in a row (spawn error, or no answer by the start deadline).
        # unavailable_deadline: when requests stop waiting for an agent that keeps failing;
        # gave_up: that time passed, so while no agent runs every request fails at once.
        self.agent_proven = False
        self.failures = 0
        self.agent_error = ""
        self.unavailable_deadline: float | None = None
        self.gave_up = False
        self.turn_seq = 0
        self.ctrl_seq = 0
        self.counters = Counters()
        self.finished: collections.OrderedDict[tuple[str, str], frames.ReplyFrame] = collections.OrderedDict()
        self._finished_bytes = 0  # _reply_bytes() of everything in finished
        self.last_preempt_signal_s: float | None = None
        self._out: list[Decision] = []

    # ------------------------------------------------------------ public

    def handle(self, event: SchedEvent) -> list[Decision]:
        """Apply one event; return what to do, in order."""
        self._out = []
        busy = self.turn is not None
        match event:
            case Connected():
                self.clients[event.client] = event.kind
            case Submitted():
                self._submitted(event)
            case Released():
                self._released(event)
            case CancelAsked():
                self._cancel(event)
            case AgentStarted():
                self.agent_up = True
                self.restarting = False
                self.agent_busy = False
                self.agent_proven = False
            case TurnInit():
                self._turn_init(event)
            case ResultRead():
                self._turn_result(event)
            case ModelAnswered():
                self._model_answered(event)
            case AgentExited():
                self._agent_exited(event.now, event.reason, event.refused_start)
            case SpawnFailed():
                self._spawn_failed(event)
            case ClientGone():
                self._client_gone(event)
            case Tick():
                self._tick(event.now)
        if busy and self.turn is None and self.lease is not None:
            # A lease does not age while a turn runs (its holder's, or one it yields to):
            # its idle clock starts when the session falls idle, however the turn ended.
            self.lease.deadline = max(self.lease.deadline, event.now + self.lease.idle_s)
        self._dispatch(event.now)
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        """The earliest time a :class:`Tick` could change anything."""
        times = []
        if self.turn is not None:
            times += [d for d in (self.turn.deadline, self.turn.start_deadline) if d is not None]
        if self.lease is not None and self.turn is None:
            times.append(self.lease.deadline)
        if self.unavailable_deadline is not None:
            times.append(self.unavailable_deadline)
        return min(times) if times else None

    def agent_state(self) -> str:
        """``up``, ``restarting``, ``unavailable`` (starts are failing: see :attr:`agent_error`) or ``down``."""
        if self.agent_up:
            return "up"
        if self.failures:
            return "unavailable"
        return "restarting" if self.restarting else "down"

    def holder(self) -> tuple[str, frames.Kind, str] | None:
        """(client, kind, request id) of the running turn, if any."""
        if self.turn is None:
            return None
        r = self.turn.request
        return r.client, r.kind, r.req

    def line(self) -> list[Request]:
        """Queued requests in the order they would run (ignoring leases)."""
        return [*self.webhooks.order(), *self.workers.order()]

    def check(self) -> None:
        """Raise :class:`SchedulerBug` if an invariant is broken (tests call this after every event)."""
        seen: set[tuple[str, str]] = set()
        for r in self.line():
            if r.key in seen:
                raise SchedulerBug(f"request {r.key} queued twice")
            seen.add(r.key)
            if self.requests.get(r.key) is not r:
                raise SchedulerBug(f"queued request {r.key} not in the request table")
        if self.turn is not None:
            if self.turn.request.key in seen:
                raise SchedulerBug(f"request {self.turn.request.key} queued and running at once")
            if self.requests.get(self.turn.request.key) is not self.turn.request:
                raise SchedulerBug("running request not in the request table")
            seen.add(self.turn.request.key)
        for key in self.requests:
            if key not in seen:
                raise SchedulerBug(f"request {key} is neither queued nor running")
        if any(r.kind != "webhook" for r in self.webhooks.order()) or any(
            r.kind != "worker" for r in self.workers.order()
        ):
            raise SchedulerBug("a request is in the wrong line")
        self.webhooks.check()
        self.workers.check()
        if self.gave_up and not self.agent_up and self.line():
            raise SchedulerBug("requests wait for an agent the scheduler gave up on")
        if self.agent_busy and (self.turn is None or self.turn.phase == "switching"):
            raise SchedulerBug("agent busy with no turn")
        if self.suspended_lease is not None and (
            self.suspended_lease.kind != "worker" or self.lease is None or self.lease.kind != "webhook"
        ):
            raise SchedulerBug("a lease is suspended by something other than a webhook lease")

    # ------------------------------------------------------------ helpers

    def _emit(self, d: Decision) -> None:
        if isinstance(d, WriteUser):
            if self.agent_busy:
                raise SchedulerBug("user message while a turn runs")
            if not self.agent_up:
                raise SchedulerBug("user message while the agent is down")
            self.agent_busy = True
        self._out.append(d)

    def _reply(self, r: Request, frame: frames.ReplyFrame, *, terminal: bool) -> None:
        if r.client in self.clients:
            self._emit(Deliver(r.client, frame))
        if terminal:
            self.requests.pop(r.key, None)
            old = self.finished.pop(r.key, None)
            if old is not None:
                self._finished_bytes -= _reply_bytes(old)
            self.finished[r.key] = frame
            self._finished_bytes += _reply_bytes(frame)
            while len(self.finished) > self.config.remembered_results or (
                self._finished_bytes > self.config.remembered_result_bytes and len(self.finished) > 1
            ):
                _key, dropped = self.finished.popitem(last=False)
                self._finished_bytes -= _reply_bytes(dropped)

    def _result(self, r: Request, status: frames.Status, **kw: Any) -> None:
        self.counters.inc(f"results_{'error' if status == 'error' else status}")
        self._reply(r, frames.Result(client=r.client, req=r.req, status=status, model=self.model, **kw), terminal=True)

    def _error(self, r: Request, code: str, message: str) -> None:
        self.counters.inc("results_error")
        self._reply(r, frames.Result(
            client=r.client, req=r.req, status="error", error_code=code, error=message, model=self.model,
        ), terminal=True)

    def _uuid(self, turn: int) -> str:
        # Deterministic (no hidden randomness): the incarnation makes it unique across brokers.
        return str(uuidlib.UUID(hex=f"{self.incarnation[:16]:0>16}{turn:016x}"))

    def _line_of(self, r: Request) -> Line:
        return self.webhooks if r.kind == "webhook" else self.workers

    def _remove_queued(self, r: Request) -> None:
        self._line_of(r).remove(r)

    # ------------------------------------------------------------ event handlers

    def _submitted(self, e: Submitted) -> None:
        key = (e.client, e.req)
        if e.client not in self.clients:
            self.clients[e.client] = e.kind
        if key in self.requests:
            # A resubmission (client saw a broker change, or a duplicate): answer, don't rerun.
            self._emit(Deliver(e.client, frames.Accepted(client=e.client, req=e.req, incarnation=self.incarnation)))
            return
        if key in self.finished:
            self._emit(Deliver(e.client, self.finished[key]))
            return
        self.counters.inc("requests")
        r = Request(
            client=e.client, req=e.req, kind=e.kind, op=e.op, content=e.content, model=e.model,
            on_preempt=e.on_preempt, resume_prompt=e.resume_prompt, lease_idle_s=e.lease_idle_s,
            submitted_at=e.now,
        )
        if e.op == "lease" and self.lease is not None and self.lease.client == e.client:
            self.lease.deadline = e.now + self.lease.idle_s
            self._emit(Deliver(e.client, frames.LeaseGranted(client=e.client, req=e.req, incarnation=self.incarnation)))
            return
        self.requests[key] = r
        position = self._line_of(r).append(r)
        self._emit(Deliver(e.client, frames.Accepted(
            client=e.client, req=e.req, incarnation=self.incarnation, position=position,
        )))

    def _released(self, e: Released) -> None:
        for r in [r for r in self.line() if r.client == e.client and r.op == "lease"]:
            self._remove_queued(r)
            self._reply(r, frames.LeaseEnded(client=r.client, req=r.req, reason="released"), terminal=True)
        if self.suspended_lease is not None and self.suspended_lease.client == e.client:
            self.suspended_lease = None
            self._emit(Deliver(e.client, frames.LeaseEnded(client=e.client, req=e.req, reason="released")))
        if self.lease is not None and self.lease.client == e.client:
            self._end_lease(e.now)
            self._emit(Deliver(e.client, frames.LeaseEnded(client=e.client, req=e.req, reason="released")))

    def _cancel(self, e: CancelAsked) -> None:
        t = self.turn
        if e.target is not None:
            r = self.requests.get((e.client, e.target))
            if r is None:
                self.counters.inc("stale_cancels")
                return
            self.counters.inc("cancels")
            if t is not None and t.request is r:
                self._interrupt(t, "cancel", e.now)
            else:
                self._remove_queued(r)
                self._result(r, "cancelled")
            return
        if t is None or e.incarnation != self.incarnation or e.turn != t.id:
            # A cancel for another incarnation or a finished turn: never let it touch a later turn.
            self.counters.inc("stale_cancels")
            return
        self.counters.inc("cancels")
        self._interrupt(t, "cancel", e.now)

    def _interrupt(self, t: RunningTurn, reason: Reason, now: float) -> None:
        """Ask the agent to stop the running turn; stronger reasons override weaker ones."""
        rank = {None: 0, "preempt": 1, "cancel": 2, "client_gone": 3}
        if rank[reason] <= rank[t.reason]:
            return
        t.reason = reason
        if t.phase == "switching":
            return  # nothing written yet: handled when the model answer comes
        if t.deadline is None:
            t.deadline = now + self.config.drain_timeout_s
        # A turn that was not yet answered at all may still hit its start deadline first.
        if t.inited and not t.interrupt_sent:
            self._send_interrupt(t, now)

    def _send_interrupt(self, t: RunningTurn, now: float) -> None:
        t.interrupt_sent = True
        t.phase = "interrupting"
        if t.reason == "preempt":
            self.counters.inc("preempts")
        self._emit(WriteInterrupt(turn=t.id, reason=t.reason or "cancel", asked_at=now))

    def _turn_init(self, e: TurnInit) -> None:
        t = self.turn
        if t is None or t.id != e.turn or t.inited or t.phase == "switching":
            return  # (a switching turn has no user message written: no system/init can be its)
        t.inited = True
        t.start_deadline = None
        self._proven()
        if e.model:
            # The agent's word for the model this turn runs on (the broker may not have
            # named one), so the turn's result says it.
            self.model = e.model
        # An interrupt asked before the turn started is sent now (an interrupt
        # written before system/init can be a silent no-op).
        if t.reason is not None and not t.interrupt_sent:
            self._send_interrupt(t, e.now)

    def _turn_result(self, e: ResultRead) -> None:
        t = self.turn
        if t is None or t.id != e.turn or t.phase == "switching":
            return
        self.turn = None
        self.agent_busy = False
        self._proven()
        r = t.request
        interrupted = e.interrupted
        timing = {"turn": t.id, "queued_ms": t.queued_ms, "turn_ms": round((e.now - t.started_at) * 1000, 3)}
        if self.lease is not None and self.lease.client == r.client:
            self.lease.deadline = e.now + self.lease.idle_s
        if t.reason == "client_gone" or r.client not in self.clients:
            self.requests.pop(r.key, None)
            return
        if interrupted and t.reason == "preempt":
            self._preempted(t, e.now)
            return
        if interrupted and t.reason == "cancel":
            self._result(r, "cancelled", text=e.text, session_id=e.session_id, raw=e.raw, **timing)
            return
        if e.is_error:
            self._result(
                r, "error", text=e.text, session_id=e.session_id, raw=e.raw,
                error_code=e.terminal_reason or e.subtype, error=e.text or e.subtype, **timing,
            )
            return
        self._result(r, "ok", text=e.text, session_id=e.session_id, raw=e.raw, **timing)

    def _preempted(self, t: RunningTurn, now: float) -> None:
        r = t.request
        if r.on_preempt == "return":
            self._result(r, "preempted", turn=t.id, turn_ms=round((now - t.started_at) * 1000, 3))
            return
        r.preemptions += 1
        self.counters.inc("requeues")
        self.workers.appendleft(r)
        self._reply(r, frames.PreemptedNotice(client=r.client, req=r.req, turn=t.id, requeued=True), terminal=False)

    def _proven(self) -> None:
        """The agent answered: it can be started, so requests wait for it again."""
        self.agent_proven = True
        self.failures = 0
        self.agent_error = ""
        self.unavailable_deadline = None
        self.gave_up = False

    def _model_answered(self, e: ModelAnswered) -> None:
        t = self.turn
        if t is None or t.phase != "switching" or t.ctrl_id != e.ctrl_id:
            return  # a late or foreign answer: matched by id, never by order
        self._proven()
        if not e.ok:
            self._model_refused(t, e.error or "set_model refused")
            return
        self.model = e.model or t.target_model
        self.counters.inc("model_switches")
        self._after_switch(t, e.now)

    def _model_refused(self, t: RunningTurn, why: str) -> None:
        # The agent answered no (an unknown model: the CLI probes the API first) and kept
        # its model: so does the session. The request fails; restarting the agent with
        # --model would make the refused model stick, across broker restarts too.
        r = t.request
        self.turn = None
        if t.reason == "client_gone" or r.client not in self.clients:
            self.requests.pop(r.key, None)
        elif t.reason == "cancel":
            self._result(r, "cancelled")
        else:
            self._error(r, "model_refused", f"model {t.target_model!r} refused by the agent: {why}")

    def _model_failed(self, t: RunningTurn, now: float, why: str) -> None:
        # Restart with --model: the conversation survives (--resume) on the new model. (An
        # agent that is mute from its start is caught at its first turn, by the start deadline.)
        self.turn = None
        self.model = t.target_model
        self._requeue_unless_ended(t)
        self._restart(now, f"model switch failed: {why}")

    def _after_switch(self, t: RunningTurn, now: float) -> None:
        r = t.request
        if r.op == "set_model":
            self.turn = None
            self._result(r, "ok", turn=t.id)
            return
        if t.reason == "client_gone" or r.client not in self.clients:
            self.turn = None
            self.requests.pop(r.key, None)
            return
        if t.reason == "cancel":
            self.turn = None
            self._result(r, "cancelled")
            return
        if t.reason == "preempt" or (r.kind == "worker" and self.webhooks):
            # Nothing was written yet: step back in line without counting a preemption.
            self.turn = None
            self._requeue_front(r)
            return
        self._write_user(t, now)

    def _requeue_front(self, r: Request) -> None:
        self._line_of(r).appendleft(r)

    def _requeue_unless_ended(self, t: RunningTurn) -> None:
        """A turn the agent never began (no system/init): back at the head, or ended if cancelled or orphaned."""
        r = t.request
        if t.reason == "client_gone" or r.client not in self.clients:
            self.requests.pop(r.key, None)
        elif t.reason == "cancel":
            self._result(r, "cancelled", turn=t.id if t.phase != "switching" else 0)
        else:
            self._requeue_front(r)

    def _agent_exited(self, now: float, reason: str, refused_start: bool = False) -> None:
        if not self.agent_up and self.restarting:
            return
        t = self.turn
        self.turn = None
        self.agent_busy = False
        if t is not None and refused_start and not t.inited:
            t.request.attempts -= 1  # a run the agent never began is no attempt (MAX_ATTEMPTS counts deaths)
            self._requeue_unless_ended(t)
        elif t is not None:
            self._turn_lost(t, now, reason)
        self._restart(now, reason)

    def _turn_lost(self, t: RunningTurn, now: float, reason: str) -> None:
        """The agent died or was killed under a turn: end or requeue it."""
        r = t.request
        if t.reason == "client_gone" or r.client not in self.clients:
            self.requests.pop(r.key, None)
        elif t.reason == "cancel":
            self._result(r, "cancelled", turn=t.id)
        elif t.phase == "switching":
            self._requeue_front(r)
        elif t.reason == "preempt":
            self._preempted(t, now)
        elif r.kind == "worker" and r.op == "prompt" and r.attempts - r.preemptions < MAX_ATTEMPTS:
            # attempts counts every run; runs that ended preempted are not deaths of the agent.
            # The resumed conversation holds the lost prompt: the rerun carries the note.
            r.lost += 1
            self.counters.inc("requeues")
            self.workers.appendleft(r)
            self._reply(r, frames.PreemptedNotice(client=r.client, req=r.req, turn=t.id, requeued=True,
                                                  reason="agent_restarted"), terminal=False)
        else:
            self._error(r, "agent_restarted", f"the agent stopped during this turn ({reason}) and was restarted")

    def _restart(self, now: float, reason: str, delay_s: float = 0.0) -> None:
        self.agent_up = False
        self.restarting = True
        self.agent_busy = False
        self.counters.inc("agent_restarts")
        self._emit(RestartAgent(reason=reason, model=self.model, delay_s=delay_s))

    def _spawn_failed(self, e: SpawnFailed) -> None:
        if self.agent_up:
            return  # a report about a start the scheduler no longer waits for
        self._start_failed(e.now, e.error)

    def _start_failed(self, now: float, error: str) -> None:
        """A start failed: retry after a bounded back-off; requests wait for it at most a bounded time."""
        self.failures += 1
        self.agent_error = error
        self.counters.inc("agent_start_failures")
        if self.unavailable_deadline is None and not self.gave_up:
            self.unavailable_deadline = now + self.config.unavailable_timeout_s
        delay = min(self.config.spawn_backoff_max_s, self.config.spawn_backoff_s * 2 ** min(self.failures - 1, 30))
        self._restart(now, f"start failed: {error}", delay_s=delay)

    def _fail_unavailable(self) -> None:
        """The agent cannot be started and the wait bound passed: end every queued request."""
        for r in self.line():
            self._remove_queued(r)
            self._error(r, "agent_unavailable", f"the agent cannot be started ({self.agent_error})")

    def _client_gone(self, e: ClientGone) -> None:
        c = e.client
        for r in [r for r in self.line() if r.client == c]:
            self._remove_queued(r)
            self.requests.pop(r.key, None)
        if self.suspended_lease is not None and self.suspended_lease.client == c:
            self.suspended_lease = None
        if self.lease is not None and self.lease.client == c:
            self._end_lease(e.now)
        if c in self.clients:
            if e.reason != "bye":
                self.counters.inc("client_deaths")
            del self.clients[c]
        t = self.turn
        if t is not None and t.request.client == c:
            if t.phase == "switching":
                t.reason = "client_gone"
            else:
                self._interrupt(t, "client_gone", e.now)
        self._emit(DropClient(c))

    def _tick(self, now: float) -> None:
        t = self.turn
        if self.unavailable_deadline is not None and now >= self.unavailable_deadline:
            self.unavailable_deadline = None
            self.gave_up = True
        if t is not None and t.start_deadline is not None and now >= t.start_deadline:
            # The agent took the user message and printed nothing: it failed to start.
            # It never began the turn, so the request goes back to the head of its line.
            self.turn = None
            self.agent_busy = False
            t.request.attempts -= 1  # a run the agent never began is no attempt (MAX_ATTEMPTS counts deaths)
            self._requeue_unless_ended(t)
            self._start_failed(now, f"no output within {self.config.start_timeout_s:g} s of its first turn")
        elif t is not None and t.deadline is not None and now >= t.deadline:
            if t.phase == "switching":
                self._model_failed(t, now, "no answer in time")
            else:
                # The agent did not finish the interrupted turn in time: kill it, resume, go on.
                self.counters.inc("drain_timeouts")
                self._agent_exited(now, "drain_timeout")
        if self.lease is not None and now >= self.lease.deadline and t is None:
            lease = self.lease
            self._end_lease(now)
            if lease.client in self.clients:
                self._emit(Deliver(lease.client, frames.LeaseEnded(client=lease.client, reason="idle")))

    def _end_lease(self, now: float) -> None:
        """The lease ends; a worker lease it had suspended resumes with a fresh idle clock."""
        self.lease, self.suspended_lease = self.suspended_lease, None
        if self.lease is not None:
            self.lease.deadline = max(self.lease.deadline, now + self.lease.idle_s)

    # ------------------------------------------------------------ granting

    def _next(self) -> Request | None:
        lease = self.lease
        if lease is not None:
            if lease.kind == "worker" and self.webhooks:
                return self.webhooks.head()  # a worker lease yields to webhooks between turns
            mine = (self.webhooks if lease.kind == "webhook" else self.workers).first_of(lease.client)
            if mine is not None:
                return mine
            if lease.kind == "webhook" or not self.webhooks:
                return None  # the holder keeps the session while it thinks
        return self.webhooks.head() or self.workers.head()

    def _dispatch(self, now: float) -> None:
        t = self.turn
        if t is not None:
            if t.request.kind == "worker" and self.webhooks and t.reason is None:
                self.last_preempt_signal_s = now
                t.preempt_asked_at = now
                self._interrupt(t, "preempt", now)
            return
        if not self.agent_up:
            if self.gave_up:
                self._fail_unavailable()
            return
        while self.turn is None:
            r = self._next()
            if r is None:
                return
            self._line_of(r).take(r)
            self._start(r, now)

    def _start(self, r: Request, now: float) -> None:
        if r.op == "lease":
            idle = r.lease_idle_s or self.config.lease_idle_s
            if self.lease is not None and self.lease.client != r.client:
                # Only a worker lease lets another client's (webhook) lease in: it resumes after it.
                self.suspended_lease = self.lease
            self.lease = LeaseState(client=r.client, kind=r.kind, idle_s=idle, deadline=now + idle)
            self._reply(r, frames.LeaseGranted(client=r.client, req=r.req, incarnation=self.incarnation), terminal=True)
            return
        self.turn_seq += 1
        t = RunningTurn(id=self.turn_seq, request=r, uuid=self._uuid(self.turn_seq), phase="running", started_at=now)
        self.turn = t
        if r.model is not None and r.model != self.model:
            self.ctrl_seq += 1
            t.phase = "switching"
            t.ctrl_id = f"ts-{self.incarnation}-{self.ctrl_seq}"
            t.target_model = r.model
            t.deadline = now + self.config.model_timeout_s
            self._emit(WriteSetModel(ctrl_id=t.ctrl_id, model=r.model))
            return
        self._after_switch(t, now)

    def _write_user(self, t: RunningTurn, now: float) -> None:
        r = t.request
        t.phase = "running"
        t.deadline = None
        t.started_at = now
        r.attempts += 1
        if not self.agent_proven:
            t.start_deadline = now + self.config.start_timeout_s
        content = r.content
        if r.preemptions or r.lost:
            content = r.resume_prompt or _with_note(content)
        self.counters.inc("turns")
        queued_ms = t.queued_ms = round((now - r.submitted_at) * 1000, 3)
        self._emit(WriteUser(turn=t.id, uuid=t.uuid, content=content, submitted_at=r.submitted_at))
        self._reply(r, frames.Started(
            client=r.client, req=r.req, incarnation=self.incarnation, turn=t.id, model=self.model,
            queued_ms=queued_ms,
        ), terminal=False)


def _reply_bytes(frame: frames.ReplyFrame) -> int:
    """The bytes a remembered reply holds beyond its fixed fields: its text and raw result line."""
    if isinstance(frame, frames.Result):
        return len(frame.text) + len(frame.raw or b"")
    return 0


def _with_note(content: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return RESUME_NOTE + content
    return [{"type": "text", "text": RESUME_NOTE}, *content]
