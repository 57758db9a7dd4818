"""A model of the world around the scheduler, shared by its property test and its explorer.

:class:`World` holds a :class:`~broker.scheduler.Scheduler`, a clock and a
:class:`Tracker`. :meth:`World.step` feeds one event, runs
:meth:`Scheduler.check`, and hands the event and the decisions to the tracker,
which checks the contract from the outside: it rebuilds what it needs (the turn
in flight, the line, who holds the lease, which request got which reply) from
the events it fed and the decisions it saw, never from the scheduler's
internals. It uses three public methods: :meth:`Scheduler.holder` to attribute
a ``WriteSetModel`` (no decision names its request), and, as cross-checks,
:meth:`Scheduler.line` (must equal the line the tracker expects, in order) and
:meth:`Scheduler.next_deadline` (a drain or a model switch must be bounded).

:meth:`World.enabled` lists the events that can happen next over a bounded
alphabet (:class:`Alphabet`): the clients' scripted actions, what a plausible
agent would print, a few implausible agent lines (late results, duplicate
inits, foreign control answers) that must be ignored, and a ``Tick`` to the
next deadline. The explorer walks every interleaving of it; the property test
draws events at random and uses the same tracker.

Every broken rule raises :class:`InvariantBroken` naming the rule.
"""

from __future__ import annotations

import copyreg
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from broker import scheduler as s
from ipc import frames

Key = tuple[str, str]

INCARNATION = "00000000000000aa"
OTHER_INCARNATION = "00000000000000bb"
#: Short durations with ``lease idle < start < drain < unavailable < model``: a lease can
#: expire while a turn drains, which is exactly where lease bugs hide, and the wait bound for
#: an agent that cannot start can pass while a started one has yet to answer.
CONFIG = dict(
    incarnation=INCARNATION, drain_timeout_s=5.0, model_timeout_s=7.0, lease_idle_s=3.0, model="m1",
    start_timeout_s=4.0, unavailable_timeout_s=6.0, spawn_backoff_s=0.5, spawn_backoff_max_s=1.0,
)
REASON_RANK = {None: 0, "preempt": 1, "cancel": 2, "client_gone": 3}
BOGUS_CTRL = "ts-foreign-answer"
#: A turn id no broker hands out in these tests.
FUTURE_TURN = 10**6


def make_config(**over: Any) -> s.Config:
    """The scheduler settings the model assumes (overridable per test)."""
    return s.Config(**{**CONFIG, **over})


# The counters hold a defaultdict with a lambda factory, which pickle refuses;
# states are copied by pickling (several times faster than copy.deepcopy).
def _counters(values: dict[str, int]) -> s.Counters:
    c = s.Counters()
    c.values.update(values)
    return c


copyreg.pickle(s.Counters, lambda c: (_counters, (dict(c.values),)))


@dataclass(frozen=True)
class MutedStart(s.AgentStarted):
    """The agent process started (so the runtime reports ``AgentStarted``) but will never print a line."""


class InvariantBroken(AssertionError):
    """The scheduler broke a rule of its contract (the message names the rule)."""


def need(cond: object, rule: str) -> None:
    """Raise :class:`InvariantBroken` with ``rule`` unless ``cond`` holds."""
    if not cond:
        raise InvariantBroken(rule)


# ---------------------------------------------------------------- the tracker


@dataclass
class Req:
    """What the tracker knows of one accepted request."""

    client: str
    req: str
    kind: str
    op: str
    on_preempt: str
    model: str | None
    lease_idle_s: float | None
    seq: int
    #: waiting (in line) | picked (model switch under way) | running | done | dropped (client died)
    state: str = "waiting"
    promoted: int | None = None  # requeued at the head of its line (larger = more recently)
    terminals: int = 0
    cancel_asked: bool = False
    deaths: int = 0  # times the agent died under it (not counting preempt or cancel drains)
    last_frame: Any = None

    @property
    def key(self) -> Key:
        return (self.client, self.req)

    def rank(self) -> tuple[int, int]:
        """Where the request belongs among its client's: requeued ones first, newest requeue first, then FIFO."""
        return (0, -self.promoted) if self.promoted is not None else (1, self.seq)


@dataclass
class Flight:
    """The turn whose user message was written and whose result has not been read."""

    turn: int
    key: Key | None = None
    inited: bool = False
    wanted: str | None = None  # strongest interrupt reason the tracker knows was asked
    asked_at: float | None = None  # when the first interrupt reason was asked
    sent: bool = False
    start_by: float | None = None  # written to an agent not heard from since its start: system/init due by then


@dataclass
class LeaseView:
    client: str
    kind: str
    idle_s: float
    since: float  # granted or resumed at


class Tracker:
    """Checks the contract from the events fed and the decisions seen."""

    def __init__(self, config: s.Config) -> None:
        self.config = config
        self.now = 0.0
        self.alive: dict[str, str] = {}
        self.dead: set[str] = set()
        self.reqs: dict[Key, Req] = {}
        self.seq = 0
        self.promote_seq = 0
        self.flight: Flight | None = None
        self.pending_ctrl: str | None = None
        self.old_ctrl: str | None = None  # an answered or abandoned control id (late duplicates use it)
        self.switch_key: Key | None = None
        self.agent = "down"  # down (never started) | up | restarting
        self.mute = False  # the explorer started an agent that will never print anything
        self.proven = False  # the running agent answered something since it started
        self.failures = 0  # failed starts since the agent last answered
        self.down_since: float | None = None  # first failed start of this run of failures, until the bound passed
        self.gave_up = False  # the bound passed: while no agent runs, requests end agent_unavailable
        self._start_failure = False  # this step's Tick found a turn past its start deadline
        self._refused_start = False  # this step's AgentExited says the agent refused its start
        #: Per kind, clients in the order they take turns (stale entries are skipped; a client
        #: that queues again after its line emptied goes to the back).
        self.rotation: dict[str, list[str]] = {"webhook": [], "worker": []}
        self.last_ended: int | None = None
        self.max_turn = 0
        self.lease: LeaseView | None = None
        self.suspended: LeaseView | None = None  # a worker lease waiting out a webhook lease
        self.last_busy = float("-inf")
        self.regrants: set[Key] = set()
        self.max_idle = max(config.lease_idle_s, 10.0)
        self._switch_since: tuple[str, float] | None = None
        # per step
        self._step_frames: dict[Key, list[Any]] = {}
        self._ended: Flight | None = None
        self._ended_by: str = ""
        self._restart_in_out = False
        self._expect_started: int | None = None

    # ------------------------------------------------------------ views

    @property
    def busy(self) -> bool:
        return self.flight is not None or self.pending_ctrl is not None

    def waiting(self, kind: str | None = None) -> list[Req]:
        return [
            r
            for r in self.reqs.values()
            if r.state == "waiting" and r.client in self.alive and (kind is None or r.kind == kind)
        ]

    def open_reqs(self, client: str) -> list[Req]:
        return [r for r in self.reqs.values() if r.client == client and r.state in ("waiting", "picked", "running")]

    def flight_req(self) -> Req | None:
        if self.flight is None or self.flight.key is None:
            return None
        return self.reqs[self.flight.key]

    def classify(self, ev: s.SchedEvent) -> str:
        """What the event should do: normal, ignored, stale_cancel, dup_open, dup_done."""
        f = self.flight
        match ev:
            case s.TurnInit():
                return "normal" if f is not None and ev.turn == f.turn and not f.inited else "ignored"
            case s.ResultRead():
                return "normal" if f is not None and ev.turn == f.turn else "ignored"
            case s.ModelAnswered():
                return "normal" if self.pending_ctrl is not None and ev.ctrl_id == self.pending_ctrl else "ignored"
            case s.AgentExited():
                return "ignored" if self.agent == "restarting" else "normal"
            case s.SpawnFailed():
                return "ignored" if self.agent == "up" else "normal"
            case s.CancelAsked():
                if ev.target is not None:
                    r = self.reqs.get((ev.client, ev.target))
                    return "normal" if r is not None and r.state in ("waiting", "picked", "running") else "stale_cancel"
                if ev.incarnation == self.config.incarnation and f is not None and ev.turn == f.turn:
                    return "normal"
                return "stale_cancel"
            case s.Submitted():
                r = self.reqs.get((ev.client, ev.req))
                if r is None:
                    return "normal"
                return "dup_done" if r.state == "done" else "dup_open"
            case s.Released():
                held = {lv.client for lv in (self.lease, self.suspended) if lv is not None}
                queued = [r for r in self.open_reqs(ev.client) if r.op == "lease"]
                return "normal" if ev.client in held or queued else "ignored"
        return "normal"

    # ------------------------------------------------------------ observing one step

    def observe(self, ev: s.SchedEvent, out: list[s.Decision], sched: s.Scheduler) -> None:
        """Check one step: ``ev`` was fed and ``out`` came back."""
        need(ev.now >= self.now, "time went backwards (test bug)")
        self.now = ev.now
        busy_before = self.busy
        self._step_frames = {}
        self._ended = None
        self._ended_by = ""
        self._restart_in_out = any(isinstance(d, s.RestartAgent) for d in out)
        self._expect_started = None
        self._cancelled_queued: Key | None = None
        self._released: str | None = None
        self._release_acked = False
        self._sched: s.Scheduler | None = sched
        self._busy_before = busy_before
        self._start_failure = False
        # The agent refused its command line before reading the turn: as after a failed start,
        # a turn it never began goes back to the head of its line (but the restart is at once).
        self._refused_start = isinstance(ev, s.AgentExited) and ev.refused_start
        crash = False

        match ev:
            case s.Connected():
                if ev.client not in self.dead:
                    self.alive[ev.client] = ev.kind
            case s.Submitted():
                if ev.client not in self.alive and ev.client not in self.dead:
                    self.alive[ev.client] = ev.kind
            case s.ClientGone():
                self._client_gone(ev.client)
            case s.CancelAsked():
                self._cancel_asked(ev)
            case s.TurnInit():
                f = self.flight
                if f is not None and ev.turn == f.turn and not f.inited:
                    f.inited = True
                    self._heard()
            case s.ResultRead():
                f = self.flight
                if f is not None and ev.turn == f.turn:
                    self._heard()
                    self._end_flight("result")
            case s.ModelAnswered():
                if self.pending_ctrl is not None and ev.ctrl_id == self.pending_ctrl:
                    self._heard()
                    self.old_ctrl, self.pending_ctrl = self.pending_ctrl, None
            case s.AgentStarted():
                need(self.agent != "up", "test bug: AgentStarted while the agent is up")
                self.agent = "up"
                self.proven = False
                self.mute = isinstance(ev, MutedStart)
            case s.AgentExited():
                crash = self.agent != "restarting"
            case s.SpawnFailed():
                if self.agent != "up":
                    self._failed_start()
            case s.Tick():
                if self.down_since is not None and ev.now >= self.down_since + self.config.unavailable_timeout_s:
                    self.down_since, self.gave_up = None, True
                f = self.flight
                if f is not None and not f.inited and f.start_by is not None and ev.now >= f.start_by:
                    self._start_failure = True
                    self._failed_start()
            case s.Released():
                self._released = ev.client

        for d in out:
            self._decision(ev, d)

        need(self._expect_started is None, "a user message was written but its client was not told Started")
        self._after_step(ev, out, busy_before, crash)
        self._sched = None

    # ------------------------------------------------------------ event effects

    def _client_gone(self, c: str) -> None:
        if c in self.alive:
            del self.alive[c]
        self.dead.add(c)
        for r in self.reqs.values():
            if r.client == c and r.state in ("waiting", "picked", "running"):
                r.state = "dropped" if r.state == "waiting" else r.state
        f = self.flight
        if f is not None and f.key is not None and f.key[0] == c:
            self._want("client_gone")
        self._lease_gone(c)

    def _cancel_asked(self, ev: s.CancelAsked) -> None:
        f = self.flight
        if ev.target is not None:
            r = self.reqs.get((ev.client, ev.target))
            if r is None or r.state not in ("waiting", "picked", "running"):
                return
            r.cancel_asked = True
            if r.state == "waiting":
                self._cancelled_queued = r.key
            elif r.state == "running":
                need(f is not None and f.key == r.key, "tracker bug: running request is not the flight")
                self._want("cancel")
            return
        if ev.incarnation == self.config.incarnation and f is not None and ev.turn == f.turn:
            assert f.key is not None
            self.reqs[f.key].cancel_asked = True
            self._want("cancel")

    def _want(self, reason: str) -> None:
        f = self.flight
        assert f is not None
        if f.asked_at is None:
            f.asked_at = self.now
        if REASON_RANK[reason] > REASON_RANK[f.wanted]:
            f.wanted = reason

    def _heard(self) -> None:
        """The agent answered: it can be started (and it is not mute)."""
        self.proven = True
        self.mute = False
        self.failures = 0
        self.down_since = None
        self.gave_up = False

    def _failed_start(self) -> None:
        self.failures += 1
        if self.down_since is None and not self.gave_up:
            self.down_since = self.now

    def refusing(self) -> bool:
        """Requests must end ``agent_unavailable`` rather than wait: starts failed past the bound, no agent runs."""
        return self.gave_up and self.agent != "up"

    def _end_flight(self, by: str) -> None:
        f = self.flight
        assert f is not None
        self.flight = None
        self._ended = f
        self._ended_by = by
        self.last_ended = f.turn
        if f.key is not None:
            r = self.reqs[f.key]
            if r.state == "running":
                r.state = "ended"  # until its frames of this step say what became of it

    def _lease_gone(self, c: str) -> None:
        if self.lease is not None and self.lease.client == c:
            self.lease, self.suspended = self.suspended, None
            if self.lease is not None:
                self.lease.since = self.now
        if self.suspended is not None and self.suspended.client == c:
            self.suspended = None

    # ------------------------------------------------------------ decisions

    def _decision(self, ev: s.SchedEvent, d: s.Decision) -> None:
        match d:
            case s.WriteUser():
                need(self.agent == "up", "user message written while the agent is down")
                need(
                    self.flight is None,
                    f"user message for turn {d.turn} while turn {self.flight and self.flight.turn} has no result",
                )
                need(self.pending_ctrl is None, "user message while a set_model control request is unanswered")
                need(d.turn > self.max_turn, f"turn id {d.turn} reused")
                self.max_turn = d.turn
                start_by = None if self.proven else self.now + self.config.start_timeout_s
                self.flight = Flight(turn=d.turn, start_by=start_by)
                self._expect_started = d.turn
            case s.WriteInterrupt():
                self._interrupt(ev, d)
            case s.WriteSetModel():
                need(self.agent == "up", "set_model written while the agent is down")
                need(self.flight is None, "set_model written while a turn runs")
                need(self.pending_ctrl is None, "two set_model requests outstanding")
                self._resolve_switch()  # the previous switch ended in this same step
                assert self._sched is not None
                h = self._sched.holder()
                need(h is not None, "set_model written for no request")
                assert h is not None
                r = self.reqs.get((h[0], h[2]))
                need(r is not None and r.state == "waiting", f"set_model for a request not waiting in line: {h}")
                assert r is not None
                need(d.model == r.model, "set_model names another model than the request")
                self._pick(r, "a model switch")
                r.state = "picked"
                self.switch_key = r.key
                self.pending_ctrl = d.ctrl_id
            case s.RestartAgent():
                need(
                    self.agent != "restarting" or isinstance(ev, s.SpawnFailed),
                    "agent restarted twice without starting (and without a failed start in between)",
                )
                if isinstance(ev, s.SpawnFailed) or self._start_failure:
                    need(
                        0 < d.delay_s <= self.config.spawn_backoff_max_s,
                        f"a failed start retried after {d.delay_s} s (bound {self.config.spawn_backoff_max_s})",
                    )
                else:
                    need(d.delay_s == 0, f"a restart after a crash waits {d.delay_s} s")
                self.mute = False
                if self.flight is not None:
                    self._end_flight("restart")
                if self.pending_ctrl is not None:
                    self.old_ctrl, self.pending_ctrl = self.pending_ctrl, None
                self.agent = "restarting"
            case s.DropClient():
                need(isinstance(ev, s.ClientGone) and ev.client == d.client, "a live client's mailbox dropped")
            case s.Deliver():
                self._frame(ev, d.client, d.frame)

    def _interrupt(self, ev: s.SchedEvent, d: s.WriteInterrupt) -> None:
        f = self.flight
        need(
            f is not None and d.turn == f.turn,
            f"interrupt for turn {d.turn}, which is not the turn in flight ({f and f.turn})",
        )
        assert f is not None
        need(not f.sent, f"interrupt sent twice for turn {d.turn}")
        need(f.inited, f"interrupt for turn {d.turn} written before its system/init")
        need(f.wanted is not None, f"interrupt for turn {d.turn} that nobody asked for (cause {type(ev).__name__})")
        need(d.reason == f.wanted, f"interrupt reason {d.reason}, expected {f.wanted}")
        # Only these events can make an interrupt due now.
        need(
            isinstance(ev, s.Submitted | s.CancelAsked | s.ClientGone | s.TurnInit),
            f"interrupt caused by {type(ev).__name__}",
        )
        f.sent = True

    def _frame(self, ev: s.SchedEvent, client: str, fr: Any) -> None:
        need(client in self.alive, f"{type(fr).__name__} delivered to dead or unknown client {client}")
        need(fr.client == client, "frame addressed to another client than its mailbox")
        key = (client, fr.req)
        self._step_frames.setdefault(key, []).append(fr)
        r = self.reqs.get(key)
        match fr:
            case frames.Accepted():
                need(isinstance(ev, s.Submitted) and (ev.client, ev.req) == key, "Accepted without a submission")
                assert isinstance(ev, s.Submitted)
                if r is None:
                    self.seq += 1
                    r = Req(
                        client=client,
                        req=fr.req,
                        kind=ev.kind,
                        op=ev.op,
                        on_preempt=ev.on_preempt,
                        model=ev.model,
                        lease_idle_s=ev.lease_idle_s,
                        seq=self.seq,
                    )
                    self.reqs[key] = r
                    if not [q for q in self.waiting(r.kind) if q.client == client and q is not r]:
                        self._to_back(r.kind, client)  # a client that queues anew waits for its turn
                    f = self.flight_req()
                    if r.kind == "webhook" and f is not None and f.kind == "worker":
                        self._want("preempt")
                else:
                    need(r.state not in ("done", "dropped"), f"Accepted again for finished request {key}")
            case frames.Started():
                need(
                    self._expect_started == fr.turn and self.flight is not None,
                    "Started without the user message written just before",
                )
                assert self.flight is not None
                self._expect_started = None
                need(r is not None, f"Started for unknown request {key}")
                assert r is not None
                need(r.state != "running", f"request {key} running twice at once")
                need(r.state in ("waiting", "picked"), f"Started for request {key} in state {r.state}")
                need(not r.cancel_asked, f"request {key} started again after its cancel was accepted")
                need(fr.incarnation == self.config.incarnation, "Started names another incarnation")
                self._pick(r, "its turn")
                if self.switch_key == key:
                    self.switch_key = None
                r.state = "running"
                self.flight.key = key
            case frames.PreemptedNotice():
                need(r is not None, f"PreemptedNotice for unknown request {key}")
                assert r is not None
                self._lost_if_running(r)
                need(
                    self._ended is not None and self._ended.key == key,
                    f"PreemptedNotice for {key}, whose turn did not just end",
                )
                # (on_preempt is checked against the cause in _check_ended: a crash requeues either way)
                need(
                    fr.requeued and r.kind == "worker" and r.op == "prompt",
                    f"PreemptedNotice(requeued={fr.requeued}) for {r.kind} {r.op}",
                )
                need(not r.cancel_asked, f"cancelled request {key} requeued")
                need(r.state == "ended", f"PreemptedNotice for request {key} in state {r.state}")
                self._promote(r)
            case frames.Result():
                need(r is not None, f"Result for unknown request {key}")
                assert r is not None
                self._terminal(ev, r, fr)
                if fr.status == "preempted":
                    need(r.on_preempt == "return", f"status preempted for {key}, which asked to be requeued")
            case frames.LeaseGranted():
                need(fr.incarnation == self.config.incarnation, "LeaseGranted names another incarnation")
                if r is None:
                    # A lease request from the holder: granted at once, never queued.
                    need(
                        isinstance(ev, s.Submitted)
                        and ev.op == "lease"
                        and (ev.client, ev.req) == key
                        and self.lease is not None
                        and self.lease.client == client,
                        f"LeaseGranted for unknown request {key}",
                    )
                    assert isinstance(ev, s.Submitted) and self.lease is not None
                    self.seq += 1
                    r = self.reqs[key] = Req(
                        client=client,
                        req=fr.req,
                        kind=ev.kind,
                        op="lease",
                        on_preempt=ev.on_preempt,
                        model=None,
                        lease_idle_s=ev.lease_idle_s,
                        seq=self.seq,
                    )
                    self.regrants.add(key)
                    self.lease.since = self.now
                    r.state = "regrant"
                else:
                    need(r.op == "lease", f"LeaseGranted for a {r.op} request")
                    if r.state == "waiting":
                        self._pick(r, "its lease")
                        self._grant(r)
                self._terminal(ev, r, fr)
            case frames.LeaseEnded():
                if r is not None and r.op == "lease" and r.state == "waiting":
                    need(
                        isinstance(ev, s.Released) and ev.client == client and fr.reason == "released",
                        f"queued lease request {key} ended by {type(ev).__name__}",
                    )
                    self._terminal(ev, r, fr)
                else:
                    self._lease_ended(ev, client, fr.reason)
            case _:
                need(False, f"unexpected frame {type(fr).__name__}")

    def _terminal(self, ev: s.SchedEvent, r: Req, fr: Any) -> None:
        need(
            r.terminals == 0 and r.state not in ("done", "dropped"),
            f"second terminal frame {type(fr).__name__} for request {r.key} (state {r.state})",
        )
        prev = r.state
        if prev == "waiting":
            status = getattr(fr, "status", None)
            if isinstance(fr, frames.Result) and status == "cancelled":
                need(self._cancelled_queued == r.key, f"queued request {r.key} cancelled without a cancel")
            elif isinstance(fr, frames.Result) and fr.error_code == "agent_unavailable":
                need(self.refusing(), f"queued request {r.key} failed agent_unavailable while the agent can be started")
            elif isinstance(fr, frames.Result):
                need(
                    r.op == "set_model" and status == "ok",
                    f"queued {r.op} request {r.key} answered {status} without running",
                )
                self._pick(r, "its model switch")
        elif prev == "running":
            self._lost_if_running(r)
        elif prev == "picked":
            need(r.key == self.switch_key, f"terminal frame for {r.key} in a switch it is not in")
            status = getattr(fr, "status", None)
            refused = isinstance(ev, s.ModelAnswered) and not ev.ok
            need(
                (status == "cancelled" and r.cancel_asked)
                or (status == "ok" and r.op == "set_model")
                # the switch timed out, so the agent restarts: one that cannot start fails what waits
                or (getattr(fr, "error_code", None) == "agent_unavailable" and self.refusing())
                # the agent refused the model: the request fails, the session keeps its model
                or (refused and status == "error" and getattr(fr, "error_code", None) == "model_refused"),
                f"{r.op} request {r.key} answered {status} during its model switch",
            )
            self.switch_key = None
        r.terminals += 1
        r.state = "done"
        r.last_frame = fr

    def _lost_if_running(self, r: Req) -> None:
        """A reply that ends the running request's turn: only a restart in this same step may cause it."""
        if r.state == "running":
            need(
                self._restart_in_out, f"reply for running request {r.key} without a result from the agent or a restart"
            )
            assert self.flight is not None and self.flight.key == r.key
            self._end_flight("restart")

    def _pick(self, r: Req, what: str) -> None:
        """``r`` leaves the line now: check that it was its turn."""
        if self.switch_key is not None and self.switch_key != r.key:
            # The agent does one thing at a time: another request's switch stepped back in this
            # same step (a webhook came), so it is back at the head before r is picked.
            self._resolve_switch()
        lease = self.lease
        if lease is not None and lease.client != r.client:
            need(
                r.kind == "webhook" and lease.kind == "worker",
                f"{r.kind} request {r.key} got {what} while {lease.client} holds a {lease.kind} lease",
            )
        if r.kind == "worker":
            hooks = self.waiting("webhook")
            need(not hooks, f"worker request {r.key} got {what} while webhook {hooks and hooks[0].key} waits")
        if r.state == "picked":
            return  # order was checked when the switch began
        head = self.order(r.kind)[:1]
        self._to_back(r.kind, r.client)
        if lease is not None and lease.client == r.client:
            return  # the holder's requests skip the line
        need(
            head == [r],
            f"{r.kind} request {r.key} got {what} before {head and head[0].key}, whose turn it is",
        )

    def _to_back(self, kind: str, client: str) -> None:
        rot = self.rotation[kind]
        if client in rot:
            rot.remove(client)
        rot.append(client)

    def _promote(self, r: Req) -> None:
        """``r`` goes back to the head of its line: it runs next among its kind."""
        self.promote_seq += 1
        r.state, r.promoted = "waiting", self.promote_seq
        rot = self.rotation[r.kind]
        if r.client in rot:
            rot.remove(r.client)
        rot.insert(0, r.client)

    def order(self, kind: str) -> list[Req]:
        """The waiting requests of ``kind`` in the order they must run: FIFO per client, clients in turn."""
        mine: dict[str, list[Req]] = {}
        for q in sorted(self.waiting(kind), key=Req.rank):
            mine.setdefault(q.client, []).append(q)
        queues = [mine[c] for c in self.rotation[kind] if c in mine]
        need(sum(map(len, queues)) == sum(map(len, mine.values())), "tracker bug: a waiting client is not in turn")
        out: list[Req] = []
        for i in range(max(map(len, queues), default=0)):
            out += [q[i] for q in queues if i < len(q)]
        return out

    def _grant(self, r: Req) -> None:
        lv = LeaseView(client=r.client, kind=r.kind, idle_s=r.lease_idle_s or self.config.lease_idle_s, since=self.now)
        cur = self.lease
        if cur is None or cur.client == r.client:
            self.lease = lv
            return
        need(
            cur.kind == "worker" and r.kind == "webhook" and self.suspended is None,
            f"lease granted to {r.client} while {cur.client} holds a {cur.kind} lease",
        )
        self.suspended, self.lease = cur, lv

    def _lease_ended(self, ev: s.SchedEvent, client: str, reason: str) -> None:
        if reason == "released":
            need(
                isinstance(ev, s.Released) and ev.client == client,
                f"LeaseEnded(released) for {client} without a release",
            )
            held = {lv.client for lv in (self.lease, self.suspended) if lv is not None}
            need(client in held, f"LeaseEnded(released) for {client}, which holds no lease")
            need(not self._release_acked, "lease end told twice")
            self._release_acked = True
            self._lease_gone(client)
        elif reason == "idle":
            lv = self.lease
            need(isinstance(ev, s.Tick), "LeaseEnded(idle) without a Tick")
            need(lv is not None and lv.client == client, f"LeaseEnded(idle) for {client}, which holds no lease")
            assert lv is not None
            need(not self._busy_before, "lease ended idle while a turn runs (it must not age while one does)")
            idle_from = max(lv.since, self.last_busy)
            need(
                self.now >= idle_from + lv.idle_s - 1e-9,
                f"lease ended idle at {self.now}, idle only since {idle_from} (idle_s {lv.idle_s})",
            )
            self._lease_gone(client)
        else:
            need(False, f"LeaseEnded with reason {reason}")

    # ------------------------------------------------------------ after the decisions

    def _after_step(self, ev: s.SchedEvent, out: list[s.Decision], busy_before: bool, crash: bool) -> None:
        if crash:
            need(self._restart_in_out, "the agent died and was not restarted")
        ended = self._ended
        if ended is not None and ended.key is not None:
            self._check_ended(ev, ended)
        elif ended is not None:
            need(False, "tracker bug: a turn ended that never started")
        self._resolve_switch()
        if self._cancelled_queued is not None:
            r = self.reqs[self._cancelled_queued]
            need(
                r.state == "done" and isinstance(r.last_frame, frames.Result) and r.last_frame.status == "cancelled",
                f"queued request {r.key} not cancelled",
            )
        if self._released is not None:
            c = self._released
            for r in self.reqs.values():
                need(
                    not (r.client == c and r.op == "lease" and r.state == "waiting"),
                    f"queued lease request {r.key} survived its release",
                )
            held = {lv.client for lv in (self.lease, self.suspended) if lv is not None}
            if c in held:
                need(False, f"{c} released its lease and was not told it ended")
        f = self.flight
        sched = self._sched
        assert sched is not None
        deadline = sched.next_deadline()
        if f is not None:
            fr = self.flight_req()
            if fr is not None and fr.kind == "worker" and self.waiting("webhook"):
                self._want("preempt")
            if f.inited and f.wanted is not None:
                need(f.sent, f"turn {f.turn} must be interrupted ({f.wanted}) and no interrupt was written")
            if f.asked_at is not None:
                # The drain is bounded: a wedged agent is restarted, never waited for forever.
                bound = f.asked_at + self.config.drain_timeout_s
                need(deadline is not None and deadline <= bound + 1e-9,
                     f"turn {f.turn} was asked to stop at {f.asked_at} and nothing fires by {bound} ({deadline})")
        if self.pending_ctrl is not None:
            if self._switch_since is None or self._switch_since[0] != self.pending_ctrl:
                self._switch_since = (self.pending_ctrl, self.now)
            bound = self._switch_since[1] + self.config.model_timeout_s
            need(deadline is not None and deadline <= bound + 1e-9,
                 f"a set_model is unanswered and nothing fires by {bound} ({deadline})")
        if f is not None and not f.inited and f.start_by is not None:
            # An agent that took a turn and stays mute is caught: nothing waits on it forever.
            need(deadline is not None and deadline <= f.start_by + 1e-9,
                 f"turn {f.turn} went to an agent not yet heard from and nothing fires by {f.start_by} ({deadline})")
        if self.refusing():
            need(not self.waiting(), f"{[r.key for r in self.waiting()]} wait for an agent that cannot start, "
                 f"past the {self.config.unavailable_timeout_s} s bound")
        elif self.failures and self.agent != "up" and self.waiting():
            assert self.down_since is not None
            bound = self.down_since + self.config.unavailable_timeout_s
            need(deadline is not None and deadline <= bound + 1e-9,
                 f"requests wait for an agent that cannot start and nothing fires by {bound} ({deadline})")
        if busy_before or self.busy:
            self.last_busy = self.now
        for r in self.reqs.values():
            need(r.state != "ended", f"request {r.key}: its turn ended and it got no reply")
        self._check_line(sched)

    def _resolve_switch(self) -> None:
        """A model switch that ended without its request starting or finishing: back at the head."""
        if self.switch_key is None or self.pending_ctrl is not None:
            return
        r = self.reqs[self.switch_key]
        self.switch_key = None
        if r.state == "picked":
            if r.client in self.alive:
                need(not r.cancel_asked, f"request {r.key} requeued although its cancel was accepted")
                self._promote(r)
            else:
                r.state = "dropped"

    def _check_line(self, sched: s.Scheduler) -> None:
        """The scheduler's line is the tracker's, in the same order; the session never idles while work waits."""
        want = [r.key for kind in ("webhook", "worker") for r in self.order(kind)]
        got = [r.key for r in sched.line()]
        need(got == want, f"the line is {got}, expected {want}")
        if self.agent != "up" or self.busy:
            return
        lv = self.lease
        for r in self.waiting():
            if lv is None or lv.client == r.client or (lv.kind == "worker" and r.kind == "webhook"):
                need(False, f"the session is idle while {r.key} could run (lease {lv and lv.client})")

    def _check_ended(self, ev: s.SchedEvent, f: Flight) -> None:
        assert f.key is not None
        r = self.reqs[f.key]
        got = self._step_frames.get(f.key, [])
        if r.client not in self.alive:
            need(not got, f"frames for dead client's request {f.key}")
            if r.state == "ended":
                r.state = "dropped"
            return
        if (self._start_failure or self._refused_start) and not f.inited and f.wanted != "cancel":
            # The agent never began the turn: it goes back to the head of its line, unannounced,
            # unless requests no longer wait for an agent that cannot start.
            if got:
                need(
                    self.refusing() and len(got) == 1 and getattr(got[0], "error_code", None) == "agent_unavailable",
                    f"turn {f.turn} of {f.key}, never begun by an agent that failed to start, answered {got}",
                )
                return
            need(r.state == "ended", f"tracker bug: {f.key} in state {r.state}")
            self._promote(r)
            return
        need(bool(got), f"turn {f.turn} of {f.key} ended ({self._ended_by}) with no reply")
        first = got[0]
        if self._ended_by == "result":
            assert isinstance(ev, s.ResultRead)
            interrupted = ev.subtype == "error_during_execution" or (ev.terminal_reason or "").startswith("aborted")
            if interrupted and f.wanted == "preempt":
                want = ("requeue",) if r.on_preempt == "requeue" else ("preempted",)
            elif interrupted and f.wanted == "cancel":
                want = ("cancelled",)
            elif ev.is_error:
                want = ("error",)
            else:
                want = ("ok",)
        else:
            if f.wanted == "cancel":
                want = ("cancelled",)
            elif f.wanted == "preempt":
                want = ("requeue",) if r.on_preempt == "requeue" else ("preempted",)
            else:
                r.deaths += 1
                if r.kind == "worker" and r.op == "prompt" and r.deaths < s.MAX_ATTEMPTS:
                    want = ("requeue",)
                else:
                    want = ("agent_restarted",)
        if isinstance(first, frames.PreemptedNotice):
            outcome = "requeue"
        elif isinstance(first, frames.Result):
            outcome = "agent_restarted" if first.error_code == "agent_restarted" else first.status
        else:
            outcome = type(first).__name__
        need(
            outcome in want,
            f"turn {f.turn} of {f.key} ended ({self._ended_by}, wanted {f.wanted}): got {outcome}, expected {want[0]}",
        )

    # ------------------------------------------------------------ quiescence

    def check_settled(self) -> None:
        """Nothing is pending: every live client's accepted request has had exactly one terminal reply."""
        need(not self.busy, "settled with a turn in flight")
        need(self.lease is None and self.suspended is None, "settled with a lease nobody can end")
        for r in self.reqs.values():
            if r.client in self.alive:
                need(
                    r.state == "done" and r.terminals == 1,
                    f"request {r.key} ({r.kind} {r.op}) never got its terminal reply (state {r.state})",
                )
            else:
                need(r.terminals <= 1, f"request {r.key} got {r.terminals} terminal replies")

    def summary(self) -> tuple[Any, ...]:
        """A canonical digest for de-duplicating explored states (ids and times made relative)."""
        order = sorted(self.reqs.values(), key=lambda r: r.seq)
        seq_rank = {r.key: i for i, r in enumerate(order)}
        promoted = sorted((r for r in self.reqs.values() if r.promoted is not None), key=lambda r: -(r.promoted or 0))
        prom_rank = {r.key: i for i, r in enumerate(promoted)}
        reqs = tuple(
            sorted(
                (
                    k,
                    r.state,
                    r.terminals,
                    r.cancel_asked,
                    r.deaths,
                    seq_rank[k],
                    prom_rank.get(k),
                    type(r.last_frame).__name__,
                    getattr(r.last_frame, "status", None),
                )
                for k, r in self.reqs.items()
            )
        )
        f = self.flight
        flight = None if f is None else (
            f.turn - self.max_turn, f.key, f.inited, f.wanted, f.sent,
            None if f.asked_at is None else f.asked_at - self.now,
            None if f.start_by is None else f.start_by - self.now,
        )
        rotation = tuple(
            tuple(c for c in self.rotation[kind] if any(r.client == c for r in self.waiting(kind)))
            for kind in ("webhook", "worker")
        )
        switch = None if self._switch_since is None else self._switch_since[1] - self.now

        def lease(lv: LeaseView | None) -> Any:
            return None if lv is None else (lv.client, lv.kind, lv.idle_s, max(lv.since - self.now, -self.max_idle))

        busy = max(self.last_busy - self.now, -self.max_idle)
        return (
            reqs,
            flight,
            self.pending_ctrl is not None,
            self.old_ctrl is not None,
            self.switch_key,
            self.agent,
            self.last_ended is not None,
            lease(self.lease),
            lease(self.suspended),
            busy,
            tuple(sorted(self.alive)),
            tuple(sorted(self.dead)),
            tuple(sorted(self.regrants)),
            switch,
            rotation,
            (self.mute, self.proven, self.failures, self.gave_up),
            None if self.down_since is None else self.down_since - self.now,
        )


#: Fields that only feed timings in replies and logs: no decision depends on them.
TIMING_FIELDS = frozenset({"submitted_at", "started_at", "preempt_asked_at", "queued_ms", "last_preempt_signal_s"})
#: Fields that are absolute times: compared to ``now`` only.
TIME_FIELDS = frozenset({"deadline", "start_deadline", "unavailable_deadline"})


def sched_summary(sc: s.Scheduler, now: float) -> tuple[Any, ...]:
    """A canonical digest of the scheduler's state.

    Generic over the scheduler's attributes (a field added later is included
    by default): timing-only fields dropped, deadlines relative to ``now``,
    turn and control ids relative to their counters, counters left out.
    """

    def ctrl(cid: str) -> int:
        return int(cid.rsplit("-", 1)[1]) - sc.ctrl_seq

    def digest(name: str, v: Any) -> Any:
        if name in TIME_FIELDS and isinstance(v, float | int):
            return round(v - now, 6)
        if name == "id" and isinstance(v, int):
            return v - sc.turn_seq
        if name == "ctrl_id" and isinstance(v, str):
            return ctrl(v)
        if isinstance(v, s.Request):
            return v.key
        if isinstance(v, s.RunningTurn | s.LeaseState):
            return tuple((k, digest(k, x)) for k, x in sorted(vars(v).items())
                         if k not in TIMING_FIELDS and k != "uuid")
        if isinstance(v, dict | list):
            return repr(v)
        return v

    def request(r: s.Request) -> tuple[Any, ...]:
        return tuple((k, digest(k, x)) for k, x in sorted(vars(r).items()) if k not in TIMING_FIELDS)

    out: list[Any] = [tuple(sorted(request(r) for r in sc.requests.values()))]
    for name, v in sorted(vars(sc).items()):
        if name in TIMING_FIELDS or name in ("config", "counters", "requests", "_out", "turn_seq", "ctrl_seq"):
            continue
        if name == "finished":
            out.append(tuple(sorted((k, type(fr).__name__, getattr(fr, "status", None)) for k, fr in v.items())))
        elif name == "clients":
            out.append(tuple(sorted(v.items())))
        elif isinstance(v, s.Line):
            out.append((name, tuple((c, tuple(r.key for r in q)) for c, q in v.queues.items())))
        else:
            out.append((name, digest(name, v)))
    return tuple(out)


# ---------------------------------------------------------------- the world


class World:
    """A scheduler, the tracker watching it and the clock; :meth:`step` feeds one event and checks everything."""

    def __init__(self, config: s.Config | None = None) -> None:
        self.config = config or make_config()
        self.sched = s.Scheduler(self.config)
        self.tracker = Tracker(self.config)
        self.now = 0.0
        self.used: frozenset[str] = frozenset()
        self.steps = 0

    def clone(self) -> World:
        w: World = pickle.loads(pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))
        return w

    def step(self, ev: s.SchedEvent) -> list[s.Decision]:
        """Feed ``ev``; check :meth:`Scheduler.check` and every rule of the contract."""
        t = self.tracker
        kind = t.classify(ev)
        before = sched_summary(self.sched, ev.now) if kind != "normal" else None
        stale_before = self.sched.counters.values["stale_cancels"]
        out = self.sched.handle(ev)
        self.sched.check()
        self.now = ev.now
        self.steps += 1
        if kind in ("ignored", "stale_cancel"):
            need(out == [], f"{type(ev).__name__} that must be ignored ({kind}) produced {out}")
        if kind == "dup_done":
            r = t.reqs[(ev.client, ev.req)]  # type: ignore[union-attr]
            need(
                out == [s.Deliver(r.client, r.last_frame)],
                f"duplicate of finished request {r.key} answered {out}, expected its stored reply again",
            )
        elif kind == "dup_open":
            need(
                len(out) == 1 and isinstance(out[0], s.Deliver) and isinstance(out[0].frame, frames.Accepted),
                f"duplicate of queued/running request answered {out}, expected Accepted only",
            )
        else:
            t.observe(ev, out, self.sched)
        if before is not None:
            need(sched_summary(self.sched, ev.now) == before, f"{kind} {type(ev).__name__} changed the scheduler")
        if kind == "stale_cancel":
            need(self.sched.counters.values["stale_cancels"] == stale_before + 1, "stale cancel not counted")
        return out

    def key(self) -> tuple[Any, ...]:
        """Identity of the state for de-duplication."""
        return (sched_summary(self.sched, self.now), self.tracker.summary(), self.used)

    # ------------------------------------------------------------ what a plausible agent does next

    def agent_events(self) -> list[tuple[str, s.SchedEvent]]:
        """The events a well-behaved agent (and the clock) could produce now."""
        t, now = self.tracker, self.now
        evs: list[tuple[str, s.SchedEvent]] = []
        if t.agent != "up":
            evs.append(("agent started", s.AgentStarted(now)))
        if t.mute:
            pass  # an agent that started and will never print a line: only the clock moves
        elif t.flight is not None:
            f = t.flight
            if not f.inited:
                evs.append((f"init {f.turn}", s.TurnInit(now, f.turn)))
            evs.append((f"result {f.turn} ok", ok_result(now, f.turn)))
            if f.sent:
                evs.append((f"result {f.turn} interrupted", interrupted_result(now, f.turn)))
        if t.pending_ctrl is not None and not t.mute:
            evs.append(("model answered", s.ModelAnswered(now, t.pending_ctrl, ok=True, model=None)))
        dl = self.sched.next_deadline()
        f = t.flight
        if f is not None and f.start_by is not None and not f.inited and not t.mute and dl is not None \
                and dl >= f.start_by:
            # A plausible agent prints its first turn's system/init before the start deadline:
            # only a mute one (the explorer's "agent starts mute") lets that deadline pass.
            dl = None
        if dl is not None:
            evs.append((f"tick {dl:g}", s.Tick(max(dl, now))))
        return evs

    def settled(self) -> bool:
        """Nothing is pending on the agent's side or the clock's."""
        return not self.agent_events()

    def enabled(self, alphabet: Alphabet) -> list[Move]:
        """Every event the alphabet allows now."""
        return [Move(lb, ev) for lb, ev in self.agent_events()] + alphabet.events(self)

    def fire(self, label: str, ev: s.SchedEvent, budget: str | None = None) -> list[s.Decision]:
        if budget is not None:
            self.used = self.used | {budget}
        try:
            return self.step(ev)
        except InvariantBroken as exc:
            raise InvariantBroken(f"{exc}\n  at step {self.steps + 1}: {label}: {ev!r}") from None

    def settle(self, limit: int = 500) -> None:
        """Let the agent finish everything (no new submissions), then check the terminal-reply rule."""
        for _ in range(limit):
            evs = self.agent_events()
            if not evs:
                self.tracker.check_settled()
                return
            prefer = [e for e in evs if e[0].startswith(("agent started", "init", "model answered"))]
            interrupted = [e for e in evs if "interrupted" in e[0]]
            results = [e for e in evs if e[0].startswith("result")]
            label, ev = (prefer or interrupted or results or evs)[0]
            self.fire(label, ev)
        raise InvariantBroken(f"no quiescence after {limit} agent events")


def ok_result(now: float, turn: int) -> s.ResultRead:
    return s.ResultRead(now, turn, is_error=False, subtype="success", terminal_reason="completed", text=f"t{turn}")


def interrupted_result(now: float, turn: int) -> s.ResultRead:
    return s.ResultRead(now, turn, is_error=True, subtype="error_during_execution", terminal_reason="aborted_streaming")


def api_error_result(now: float, turn: int) -> s.ResultRead:
    return s.ResultRead(now, turn, is_error=True, subtype="success", terminal_reason="api_error", text="API 500")


# ---------------------------------------------------------------- the bounded alphabet

# Client ids (16 hex digits, as on the wire).
K = "aaaaaaaaaaaaaaa1"  # worker
K2 = "aaaaaaaaaaaaaaa2"  # second worker
W1 = "bbbbbbbbbbbbbbb1"  # webhooks
W2 = "bbbbbbbbbbbbbbb2"
W3 = "bbbbbbbbbbbbbbb3"
NAMES = {K: "K", K2: "K2", W1: "W1", W2: "W2", W3: "W3"}
KINDS: dict[str, frames.Kind] = {K: "worker", K2: "worker", W1: "webhook", W2: "webhook", W3: "webhook"}

EventMaker = Callable[[World], s.SchedEvent | None]


class Move(NamedTuple):
    """One enabled event."""

    label: str
    event: s.SchedEvent
    budget: str | None = None  # the once-per-path action it uses up
    free: bool = False  # a line the scheduler must ignore: the state stays as it was


@dataclass(frozen=True)
class Action:
    """An event of the alphabet, enabled once its ``after`` actions happened.

    A normal action happens at most once per path. A ``free`` one (a line the
    scheduler must ignore) may happen at every state: it leaves the state as it
    was (the tracker checks that), so it costs one transition per state and no
    new states.
    """

    label: str
    make: EventMaker
    after: tuple[str, ...] = ()
    client: str | None = None
    free: bool = False


def submit(client: str, req: str, **kw: Any) -> EventMaker:
    return lambda w: s.Submitted(w.now, client, req, KINDS[client], content=f"do {req}", **kw)


def cancel_target(client: str, req: str) -> EventMaker:
    return lambda w: s.CancelAsked(w.now, client, target=req)


def cancel_running(client: str) -> EventMaker:
    """Another client's cancel naming the turn in flight by (incarnation, turn)."""
    return lambda w: (
        None
        if w.tracker.flight is None
        else s.CancelAsked(w.now, client, incarnation=INCARNATION, turn=w.tracker.flight.turn)
    )


def stale_cancel(client: str) -> EventMaker:
    """A cancel that names no running turn, whichever kind fits the state best.

    With a turn in flight: its id under another incarnation if no turn ended
    yet, else the turn that ended last (a cancel arriving after its turn ended,
    while the next holder runs). With none: a finished or a future turn.
    """

    def make(w: World) -> s.SchedEvent:
        t = w.tracker
        if t.flight is not None and t.last_ended is None:
            return s.CancelAsked(w.now, client, incarnation=OTHER_INCARNATION, turn=t.flight.turn)
        if t.last_ended is not None:
            return s.CancelAsked(w.now, client, incarnation=INCARNATION, turn=t.last_ended)
        return s.CancelAsked(w.now, client, incarnation=INCARNATION, turn=FUTURE_TURN)

    return make


def late_result(w: World) -> s.SchedEvent | None:
    return None if w.tracker.last_ended is None else ok_result(w.now, w.tracker.last_ended)


def dup_init(w: World) -> s.SchedEvent | None:
    f = w.tracker.flight
    return s.TurnInit(w.now, f.turn) if f is not None and f.inited else None


def wrong_answer(w: World) -> s.SchedEvent | None:
    if w.tracker.pending_ctrl is None and w.tracker.old_ctrl is None:
        return None
    return s.ModelAnswered(w.now, w.tracker.old_ctrl or BOGUS_CTRL, ok=True, model="m-wrong")


def switching_init(w: World) -> s.SchedEvent | None:
    """A system/init naming the id of the turn still in its model switch (no user message written yet)."""
    return s.TurnInit(w.now, w.sched.turn_seq) if w.tracker.pending_ctrl is not None else None


def model_refused(w: World) -> s.SchedEvent | None:
    t = w.tracker
    return None if t.pending_ctrl is None else s.ModelAnswered(w.now, t.pending_ctrl, ok=False, error="no such model")


def api_error(w: World) -> s.SchedEvent | None:
    f = w.tracker.flight
    return None if f is None else api_error_result(w.now, f.turn)


def crash(w: World) -> s.SchedEvent | None:
    return s.AgentExited(w.now, "exited") if w.tracker.agent == "up" else None


def refused_start(w: World) -> s.SchedEvent | None:
    """The agent exits refusing its command line (its --session-id already in use) before any turn."""
    return s.AgentExited(w.now, "exited rc=1", refused_start=True) if w.tracker.agent == "up" else None


def spawn_fails(w: World) -> s.SchedEvent | None:
    """The runtime's attempt to (re)start the agent failed (the binary moved away, EMFILE, ...)."""
    return s.SpawnFailed(w.now, "[Errno 2] No such file or directory") if w.tracker.agent == "restarting" else None


def muted_start(w: World) -> s.SchedEvent | None:
    """The agent process starts and never answers anything (a wrapper that hangs, a full disk)."""
    return MutedStart(w.now) if w.tracker.agent != "up" else None


def late_exit(w: World) -> s.SchedEvent | None:
    return s.AgentExited(w.now, "exited") if w.tracker.agent == "restarting" else None


@dataclass
class Alphabet:
    """The bounded set of once-per-path events the explorer interleaves in every order."""

    name: str
    clients: tuple[str, ...]
    actions: tuple[Action, ...]

    def events(self, w: World) -> list[Move]:
        """The alphabet's events enabled in ``w``."""
        out: list[Move] = []
        for a in self.actions:
            if a.label in w.used or any(x not in w.used for x in a.after):
                continue
            if a.client is not None and a.client not in w.tracker.alive:
                continue
            ev = a.make(w)
            if ev is not None:
                out.append(Move(a.label, ev, None if a.free else a.label, a.free))
        return out

    def world(self, config: s.Config | None = None) -> World:
        w = World(config)
        for c in self.clients:
            w.fire(f"connect {NAMES[c]}", s.Connected(0.0, c, KINDS[c]))
        return w


def _act(label: str, make: EventMaker, after: tuple[str, ...] = (), client: str | None = None) -> Action:
    return Action(label, make, after, client)


def _free(label: str, make: EventMaker, client: str | None = None) -> Action:
    return Action(label, make, (), client, free=True)


def small_alphabet() -> Alphabet:
    """The default bound: a worker with a lease and model switches, two webhooks, every fault once."""
    acts = (
        _act("K sub k1", submit(K, "k1"), client=K),
        _act("K sub kL (lease)", submit(K, "kL", op="lease"), ("K sub k1",), K),
        _act("K sub k2 (model m2, return)", submit(K, "k2", model="m2", on_preempt="return"), ("K sub kL (lease)",), K),
        _act("K cancel k2", cancel_target(K, "k2"), ("K sub k2 (model m2, return)",), K),
        _act("K release", lambda w: s.Released(w.now, K), ("K sub kL (lease)",), K),
        _act("W1 sub w1", submit(W1, "w1"), client=W1),
        _act("W2 sub w2", submit(W2, "w2"), client=W2),
        _act("W2 dies", lambda w: s.ClientGone(w.now, W2), ("W2 sub w2",), W2),
        _act("agent crashes", crash),
        _free("W1 stale cancel", stale_cancel(W1), W1),
        _free("foreign model answer", wrong_answer),
        _free("late result", late_result),
        _free("duplicate init", dup_init),
        _free("init for a turn still switching", switching_init),
        _free("late exit", late_exit),
    )
    return Alphabet("default", (K, W1, W2), acts)


def _large_actions() -> tuple[Action, ...]:
    return (
        *small_alphabet().actions,
        _act("K cancel k1", cancel_target(K, "k1"), ("K sub k1",), K),
        _act("W1 resubmit w1", submit(W1, "w1"), ("W1 sub w1",), W1),
        _act("W1 cancel running turn", cancel_running(W1), client=W1),
        _act("W3 sub w3 (model m2)", submit(W3, "w3", model="m2"), client=W3),
        _act("W3 sub w3L (lease)", submit(W3, "w3L", op="lease"), ("W3 sub w3 (model m2)",), W3),
        _act("W3 release", lambda w: s.Released(w.now, W3), ("W3 sub w3L (lease)",), W3),
        _act("model refused", model_refused),
    )


def large_alphabet() -> Alphabet:
    """``TURNSTILE_EXPLORE=large``: a third webhook with a model and a lease, more cancels and faults."""
    return Alphabet("large", (K, W1, W2, W3), _large_actions())


def large_starts_alphabet() -> Alphabet:
    """:func:`large_alphabet` with the failed and mute starts of :func:`starts_alphabet`, and a second failed start.

    It branches about four times per depth, so ``make verify`` takes it less deep than the
    large alphabet alone (a second failed start lets the back-off grow).
    """
    # Less the starts alphabet's refused start and second crash: with them depth 8 would
    # not fit in make verify's hour; `starts` itself explores them in every `make test`.
    deaths = ("agent crashes again", "agent refuses its start")
    acts = (
        *_large_actions(),
        *(a for a in starts_alphabet().actions if a.label not in deaths),
        _act("spawn fails again", spawn_fails, ("spawn fails",)),
    )
    return Alphabet("large+starts", (K, K2, W1, W2, W3), tuple({a.label: a for a in acts}.values()))


def starts_alphabet() -> Alphabet:
    """Failed and mute agent starts, and clients taking turns: two clients per kind, one with two requests.

    A start that fails, an agent that starts and never answers, one that refuses its
    start (its --session-id in use), two crashes (a worker is failed at its third); a
    worker request that is preempted and must rerun before the other worker's,
    though that one's client is next in turn. (``large`` adds a second failed
    start, so the back-off grows, and the rest of the default alphabet.)
    """
    acts = (
        _act("K sub k1", submit(K, "k1"), client=K),
        _act("K2 sub k3", submit(K2, "k3"), client=K2),
        _act("W1 sub w1", submit(W1, "w1"), client=W1),
        _act("W1 sub w1b", submit(W1, "w1b"), ("W1 sub w1",), W1),
        _act("W2 sub w2", submit(W2, "w2"), client=W2),
        _act("agent crashes", crash),
        _act("agent crashes again", crash, ("agent crashes",)),
        _act("agent refuses its start", refused_start),
        _act("spawn fails", spawn_fails),
        _act("agent starts mute", muted_start),
        _free("late exit", late_exit),
    )
    return Alphabet("starts", (K, K2, W1, W2), acts)
