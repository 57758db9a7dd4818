"""Example-based tests of the scheduler, one behaviour each.

Every event goes through :class:`tests.sched_model.World`, so besides what
each test asserts, every step also runs ``Scheduler.check()`` and the
tracker's contract rules (one turn in flight, no user message while one runs,
FIFO, one terminal reply per request, ...). A ``SchedulerBug`` raised by the
scheduler itself fails the test too: none of the sequences below may trigger
one.

The ``test_regression_*`` tests replay the bugs of the threaded design this
replaces (told in docs/architecture.md, "The historical bugs").
"""

from __future__ import annotations

from typing import Any

import pytest

from broker import scheduler as s
from ipc import frames
from tests import sched_model as m
from tests.sched_model import K2, W1, W2, W3, K

INC = m.INCARNATION


class H:
    """A scheduler driven through the checking world, with a clock and short helpers."""

    def __init__(self, *, start: bool = True, **config: Any) -> None:
        self.w = m.World(m.make_config(**config))
        self.log: list[s.Decision] = []
        for c in (K, K2, W1, W2, W3):
            self.ev(s.Connected(0.0, c, m.KINDS[c]))
        if start:
            self.ev(s.AgentStarted(0.0))

    @property
    def sched(self) -> s.Scheduler:
        return self.w.sched

    @property
    def now(self) -> float:
        return self.w.now

    def ev(self, event: s.SchedEvent) -> list[s.Decision]:
        out = self.w.step(event)
        self.log += out
        return out

    # client side
    def submit(self, client: str, req: str, **kw: Any) -> list[s.Decision]:
        kw.setdefault("content", f"do {req}")
        return self.ev(s.Submitted(self.now, client, req, m.KINDS[client], **kw))

    def lease(self, client: str, req: str, **kw: Any) -> list[s.Decision]:
        return self.submit(client, req, op="lease", **kw)

    def release(self, client: str) -> list[s.Decision]:
        return self.ev(s.Released(self.now, client))

    def cancel(self, client: str, **kw: Any) -> list[s.Decision]:
        return self.ev(s.CancelAsked(self.now, client, **kw))

    def gone(self, client: str) -> list[s.Decision]:
        return self.ev(s.ClientGone(self.now, client))

    # agent side
    def init(self, turn: int) -> list[s.Decision]:
        return self.ev(s.TurnInit(self.now, turn))

    def ok(self, turn: int, text: str = "done") -> list[s.Decision]:
        return self.ev(s.ResultRead(self.now, turn, subtype="success", terminal_reason="completed", text=text))

    def interrupted(self, turn: int) -> list[s.Decision]:
        return self.ev(m.interrupted_result(self.now, turn))

    def answer(self, ctrl_id: str, ok: bool = True, **kw: Any) -> list[s.Decision]:
        return self.ev(s.ModelAnswered(self.now, ctrl_id, ok=ok, **kw))

    def started(self) -> list[s.Decision]:
        return self.ev(s.AgentStarted(self.now))

    def exited(self, reason: str = "exited") -> list[s.Decision]:
        return self.ev(s.AgentExited(self.now, reason))

    def tick(self, dt: float) -> list[s.Decision]:
        return self.ev(s.Tick(self.now + dt))

    def run(self, turn: int) -> list[s.Decision]:
        """The agent inits the turn and finishes it."""
        return self.init(turn) + self.ok(turn)


def writes(out: list[s.Decision]) -> list[s.Decision]:
    """The decisions that write to the agent or restart it."""
    return [d for d in out if isinstance(d, s.WriteUser | s.WriteInterrupt | s.WriteSetModel | s.RestartAgent)]


def users(out: list[s.Decision]) -> list[s.WriteUser]:
    return [d for d in out if isinstance(d, s.WriteUser)]


def user(out: list[s.Decision]) -> s.WriteUser:
    """The one user message written."""
    (found,) = users(out)
    return found


def interrupts(out: list[s.Decision]) -> list[s.WriteInterrupt]:
    return [d for d in out if isinstance(d, s.WriteInterrupt)]


def sent(out: list[s.Decision], client: str | None = None, kind: type | None = None) -> list[Any]:
    """Frames delivered (to ``client``, of type ``kind``)."""
    return [d.frame for d in out if isinstance(d, s.Deliver)
            and (client is None or d.client == client) and (kind is None or isinstance(d.frame, kind))]


def result(out: list[s.Decision], client: str) -> frames.Result:
    found = sent(out, client, frames.Result)
    assert len(found) == 1, out
    r: frames.Result = found[0]
    return r


def started_req(out: list[s.Decision]) -> tuple[str, str] | None:
    st = sent(out, kind=frames.Started)
    return (st[0].client, st[0].req) if st else None


# ---------------------------------------------------------------- preemption


def test_webhook_preempts_a_running_worker_turn() -> None:
    h = H()
    assert user(h.submit(K, "k1")).turn == 1
    h.init(1)
    out = h.submit(W1, "w1")
    assert interrupts(out) == [s.WriteInterrupt(turn=1, reason="preempt", asked_at=h.now)]
    assert users(out) == []  # the webhook waits for the worker's result
    assert h.sched.counters.values["preempts"] == 1
    out = h.interrupted(1)
    assert sent(out, K, frames.PreemptedNotice) == [frames.PreemptedNotice(client=K, req="k1", turn=1, requeued=True)]
    assert started_req(out) == (W1, "w1")


def test_preempt_is_deferred_until_the_turn_inits() -> None:
    h = H()
    h.submit(K, "k1")
    assert interrupts(h.submit(W1, "w1")) == []  # before system/init an interrupt can be a silent no-op
    assert interrupts(h.init(1)) == [s.WriteInterrupt(turn=1, reason="preempt", asked_at=h.now)]


def test_interrupt_is_never_sent_twice() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    assert len(interrupts(h.submit(W1, "w1"))) == 1
    assert interrupts(h.submit(W2, "w2")) == []
    assert interrupts(h.cancel(K, target="k1")) == []  # a stronger reason, but the interrupt is out already
    assert interrupts(h.init(1)) == []  # a duplicate system/init
    assert h.sched.counters.values["preempts"] == 1


def test_interrupt_is_not_left_armed_after_the_turn_ends() -> None:
    h = H()
    h.submit(K, "k1")
    h.submit(W1, "w1")  # preempt asked before init: armed, not sent
    out = h.ok(1)  # the worker finished on its own before its init was even seen
    assert result(out, K).status == "ok"
    assert started_req(out) == (W1, "w1")
    assert interrupts(h.init(2)) == []  # the webhook's turn is not hit by the worker's preempt
    h.submit(K, "k2")
    assert interrupts(h.ok(2)) == []
    assert interrupts(h.init(3)) == []  # nor the next worker turn
    assert interrupts(h.init(1)) == []  # nor a late init of the old turn


def test_webhooks_fifo_and_before_workers() -> None:
    h = H(start=False)
    h.submit(K, "k1")
    h.submit(W1, "w1")
    h.submit(K2, "k2")
    h.submit(W2, "w2")
    h.submit(W3, "w3")
    assert [r.req for r in h.sched.line()] == ["w1", "w2", "w3", "k1", "k2"]
    order = [started_req(h.started())]
    for turn in range(1, 5):
        order.append(started_req(h.run(turn)))
    assert order == [(W1, "w1"), (W2, "w2"), (W3, "w3"), (K, "k1"), (K2, "k2")]


def test_clients_take_turns_within_a_kind_fifo_per_client() -> None:
    """One client's backlog holds another client's request back by one turn per waiting client, not by all of it."""
    h = H(start=False)
    for req in ("a", "b", "c"):
        h.submit(W1, req)
    (acc,) = sent(h.submit(W2, "x"), W2, frames.Accepted)
    assert acc.position == 1  # after W1's first request only
    (acc,) = sent(h.submit(W3, "y"), W3, frames.Accepted)
    assert acc.position == 2
    h.submit(K, "k1")
    h.submit(K, "k2")
    h.submit(K2, "k3")
    want = [(W1, "a"), (W2, "x"), (W3, "y"), (W1, "b"), (W1, "c"), (K, "k1"), (K2, "k3"), (K, "k2")]
    assert [r.key for r in h.sched.line()] == want
    order = [started_req(h.started())]
    for turn in range(1, len(want)):
        order.append(started_req(h.run(turn)))
    assert order == want


def test_a_client_that_queues_again_waits_for_its_turn_behind_the_others() -> None:
    h = H(start=False)
    h.submit(W1, "a")
    h.submit(W2, "x")
    h.submit(W2, "x2")
    h.started()  # a runs; W1 has nothing queued
    h.submit(W1, "b")  # W1 queues again: behind W2, whose turn it is
    assert [r.req for r in h.sched.line()] == ["x", "b", "x2"]


def test_preempted_worker_reruns_first_though_another_client_is_next_in_turn() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    h.submit(K, "k1b")
    h.submit(K2, "k3")  # K2 is next in turn among workers once k1 started
    h.submit(W1, "w1")
    out = h.interrupted(1)
    assert started_req(out) == (W1, "w1")
    assert [r.req for r in h.sched.workers] == ["k1", "k3", "k1b"]
    assert started_req(h.run(2)) == (K, "k1")
    assert started_req(h.run(3)) == (K2, "k3")
    assert started_req(h.run(4)) == (K, "k1b")


def test_preempted_worker_is_requeued_at_the_head_and_rerun_with_the_resume_note() -> None:
    h = H()
    h.submit(K, "k1", content="long task")
    h.init(1)
    h.submit(K2, "k2")  # another worker, queued behind k1
    h.submit(W1, "w1")
    out = h.interrupted(1)
    assert sent(out, K, frames.PreemptedNotice)[0].requeued
    assert [r.req for r in h.sched.workers] == ["k1", "k2"]
    assert started_req(out) == (W1, "w1")
    out = h.run(2)
    assert started_req(out) == (K, "k1")
    rerun = user(out)
    assert rerun.turn == 3
    assert rerun.content == s.RESUME_NOTE + "long task"
    assert result(h.run(3), K).status == "ok"


def test_preempted_rerun_uses_the_clients_resume_prompt_and_keeps_block_content() -> None:
    h = H()
    h.submit(K, "k1", content="task", resume_prompt="carry on please")
    blocks = [{"type": "text", "text": "blocks"}]
    h.submit(K2, "k2", content=blocks)
    h.init(1)
    h.submit(W1, "w1")
    h.interrupted(1)
    assert user(h.run(2)).content == "carry on please"
    h.ok(3)
    h.init(4)  # k2 runs
    h.submit(W2, "w2")
    h.interrupted(4)
    assert user(h.run(5)).content == [{"type": "text", "text": s.RESUME_NOTE}, *blocks]


def test_on_preempt_return_gives_a_preempted_result() -> None:
    h = H()
    h.submit(K, "k1", on_preempt="return")
    h.init(1)
    h.submit(W1, "w1")
    out = h.interrupted(1)
    r = result(out, K)
    assert (r.status, r.turn) == ("preempted", 1)
    assert sent(out, K, frames.PreemptedNotice) == []
    assert not h.sched.workers


def test_preempted_turn_that_finished_anyway_is_ok() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    h.submit(W1, "w1")
    out = h.ok(1, text="all done")  # the result raced the interrupt
    assert (result(out, K).status, result(out, K).text) == ("ok", "all done")


# ---------------------------------------------------------------- cancel


def test_cancel_by_turn_hits_exactly_that_turn() -> None:
    h = H()
    h.submit(W1, "w1")
    h.init(1)
    out = h.cancel(W2, incarnation=INC, turn=1)  # any client may name the running turn
    assert interrupts(out) == [s.WriteInterrupt(turn=1, reason="cancel", asked_at=h.now)]
    assert result(h.interrupted(1), W1).status == "cancelled"


@pytest.mark.parametrize("incarnation, turn", [
    (m.OTHER_INCARNATION, 2),  # stale incarnation, right turn id
    (INC, 1),  # a finished turn
    (INC, 3),  # a future turn
    (None, None),  # names nothing
])
def test_stale_cancel_is_counted_and_writes_nothing(incarnation: str | None, turn: int | None) -> None:
    h = H()
    h.submit(W1, "w1")
    h.run(1)
    h.submit(W1, "w2")
    h.init(2)
    before = h.sched.counters.values["stale_cancels"]
    assert h.cancel(W1, incarnation=incarnation, turn=turn) == []
    assert h.sched.counters.values["stale_cancels"] == before + 1
    assert result(h.ok(2), W1).status == "ok"


def test_cancel_own_queued_request() -> None:
    h = H()
    h.submit(W1, "w1")
    h.submit(K, "k1")
    out = h.cancel(K, target="k1")
    assert writes(out) == []
    assert result(out, K).status == "cancelled"
    assert h.sched.line() == []
    assert started_req(h.run(1)) is None  # k1 never runs
    assert h.sched.counters.values["cancels"] == 1


def test_cancel_own_running_request() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    assert interrupts(h.cancel(K, target="k1")) == [s.WriteInterrupt(turn=1, reason="cancel", asked_at=h.now)]
    assert result(h.interrupted(1), K).status == "cancelled"


def test_cancel_target_that_is_not_the_senders_is_stale() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    assert h.cancel(W1, target="k1") == []  # W1 has no request k1
    assert h.cancel(K, target="nope") == []
    assert h.sched.counters.values["stale_cancels"] == 2


def test_cancel_before_init_is_sent_at_init() -> None:
    h = H()
    h.submit(W1, "w1")
    assert interrupts(h.cancel(W1, target="w1")) == []
    assert interrupts(h.init(1)) == [s.WriteInterrupt(turn=1, reason="cancel", asked_at=h.now)]


# ---------------------------------------------------------------- leases


def test_lease_grant_lets_the_holders_prompts_skip_the_line() -> None:
    h = H()
    out = h.lease(K, "L")
    assert sent(out, K, frames.LeaseGranted) == [frames.LeaseGranted(client=K, req="L", incarnation=INC)]
    h.submit(K, "k1")
    h.submit(K2, "x")  # another worker waits while K holds the lease
    out = h.run(1)
    assert started_req(out) is None
    assert started_req(h.submit(K, "k2")) == (K, "k2")  # the holder's next prompt runs straight away
    h.run(2)
    out = h.release(K)
    assert sent(out, K, frames.LeaseEnded) == [frames.LeaseEnded(client=K, reason="released")]
    assert started_req(out) == (K2, "x")


def test_worker_lease_yields_to_webhooks_between_turns_and_resumes() -> None:
    h = H()
    h.lease(K, "L")
    h.submit(K2, "x")
    assert started_req(h.submit(W1, "w1")) == (W1, "w1")  # the idle lease yields
    assert started_req(h.submit(K, "k1")) is None  # the holder waits for the webhook
    out = h.run(1)
    assert started_req(out) == (K, "k1")  # the lease resumes: K before K2
    assert h.sched.lease is not None and h.sched.lease.client == K


def test_worker_lease_running_turn_is_preempted() -> None:
    h = H()
    h.lease(K, "L")
    h.submit(K, "k1")
    h.init(1)
    assert interrupts(h.submit(W1, "w1"))[0].reason == "preempt"
    out = h.interrupted(1)
    assert sent(out, K, frames.PreemptedNotice)
    assert started_req(out) == (W1, "w1")
    assert started_req(h.run(2)) == (K, "k1")


def test_lease_idle_timeout_ends_it() -> None:
    h = H(lease_idle_s=3.0)
    h.lease(K, "L")
    h.submit(K2, "x")
    assert h.sched.next_deadline() == 3.0
    assert h.tick(2.9) == []
    out = h.tick(0.1)
    assert sent(out, K, frames.LeaseEnded) == [frames.LeaseEnded(client=K, reason="idle")]
    assert started_req(out) == (K2, "x")


def test_lease_idle_clock_restarts_after_each_holder_turn() -> None:
    h = H(lease_idle_s=3.0)
    h.lease(K, "L", lease_idle_s=5.0)
    h.submit(K, "k1")
    h.init(1)
    h.tick(10)  # a long turn: the lease does not age during it
    h.ok(1)
    assert h.sched.next_deadline() == h.now + 5.0


def test_lease_is_released_when_its_client_dies() -> None:
    h = H()
    h.lease(K, "L")
    h.submit(K2, "x")
    out = h.gone(K)
    assert s.DropClient(K) in out
    assert sent(out, K) == []
    assert started_req(out) == (K2, "x")


def test_queued_lease_request_released_before_its_grant() -> None:
    h = H()
    h.submit(W1, "w1")
    h.lease(K, "L")
    out = h.release(K)
    assert sent(out, K) == [frames.LeaseEnded(client=K, req="L", reason="released")]
    assert h.sched.line() == []


def test_webhook_lease_is_not_preempted_and_holds_everyone_else() -> None:
    h = H()
    h.lease(W1, "L")
    h.submit(W1, "a")
    h.init(1)
    assert interrupts(h.submit(W2, "w2")) == []
    h.submit(K, "k1")
    assert started_req(h.ok(1)) is None  # W2 and K wait for the lease holder
    out = h.release(W1)
    assert started_req(out) == (W2, "w2")


def test_lease_request_by_the_holder_is_granted_at_once() -> None:
    h = H()
    h.lease(K, "L1")
    out = h.lease(K, "L2")
    assert sent(out, K) == [frames.LeaseGranted(client=K, req="L2", incarnation=INC)]


# Regression: a webhook lease granted while a worker lease was held replaced it
# without a word; K's release then got no LeaseEnded and its lease never resumed.
def test_worker_lease_resumes_after_a_webhook_lease() -> None:
    h = H()
    h.lease(K, "L")
    out = h.lease(W1, "WL")
    assert sent(out, W1, frames.LeaseGranted)
    h.submit(K, "k1")
    h.submit(K2, "x")
    assert started_req(h.submit(W1, "w")) == (W1, "w")
    assert started_req(h.ok(1)) is None  # the webhook lease still holds the session
    out = h.release(W1)
    assert started_req(out) == (K, "k1")  # K's lease is back: K before K2
    h.ok(2)
    out = h.release(K)
    assert sent(out, K, frames.LeaseEnded) == [frames.LeaseEnded(client=K, reason="released")]
    assert started_req(out) == (K2, "x")


def test_suspended_worker_lease_released_or_dead() -> None:
    h = H()
    h.lease(K, "L")
    h.lease(W1, "WL")
    out = h.release(K)  # released while suspended: told at once, never resumes
    assert sent(out, K, frames.LeaseEnded) == [frames.LeaseEnded(client=K, reason="released")]
    h.release(W1)
    assert h.sched.lease is None
    h.lease(K2, "L2")
    h.lease(W2, "WL2")
    h.gone(K2)
    h.release(W2)
    assert h.sched.lease is None


# Regression: the lease aged while a webhook it yielded to ran (Tick expired it mid-turn).
def test_worker_lease_does_not_age_while_a_webhook_runs() -> None:
    h = H(lease_idle_s=3.0)
    h.lease(K, "L")
    h.submit(W1, "w1")
    h.init(1)
    assert h.sched.next_deadline() is None  # nothing to time out while the webhook runs
    assert sent(h.tick(10), K) == []
    assert h.sched.lease is not None
    h.ok(1)
    assert sent(h.tick(2.9), K) == []
    assert sent(h.tick(0.1), K) == [frames.LeaseEnded(client=K, reason="idle")]


# Regression: when the holder's turn was lost (drain timeout, crash, model
# failure) the stale deadline ended the lease in the same Tick.
def test_lease_survives_the_loss_of_its_holders_turn() -> None:
    h = H(lease_idle_s=3.0, drain_timeout_s=5.0)
    h.lease(K, "L")
    h.submit(K, "k1")
    h.init(1)
    h.cancel(K, target="k1")
    out = h.tick(5.0)  # no result: drain timeout
    assert s.RestartAgent(reason="drain_timeout", model="m1") in out
    assert sent(out, K, frames.LeaseEnded) == []
    assert h.sched.lease is not None and h.sched.lease.deadline == h.now + 3.0


# ---------------------------------------------------------------- model switch


def test_model_switch_then_user_message() -> None:
    h = H()
    out = h.submit(K, "k1", model="m2")
    assert writes(out) == [s.WriteSetModel(ctrl_id=f"ts-{INC}-1", model="m2")]
    out = h.answer(f"ts-{INC}-1", model="m2")
    assert users(out)
    assert sent(out, K, frames.Started)[0].model == "m2"
    assert h.sched.model == "m2"


def test_model_answer_with_another_ctrl_id_is_ignored() -> None:
    h = H()
    h.submit(K, "k1", model="m2")
    assert h.answer("ts-other-1") == []
    assert h.answer(f"ts-{INC}-1", ok=False, error="nope") != []  # the right id still matters


def test_switch_to_the_current_model_sends_nothing() -> None:
    h = H()
    out = h.submit(K, "k1", model="m1")
    assert [type(d) for d in writes(out)] == [s.WriteUser]


def test_model_switch_without_answer_restarts_the_agent_with_the_new_model() -> None:
    h = H(model_timeout_s=7.0)
    h.submit(W1, "w1", model="m2")
    assert h.tick(6.9) == []
    out = h.tick(0.1)
    (restart,) = writes(out)
    assert isinstance(restart, s.RestartAgent) and restart.model == "m2"
    out = h.started()
    assert user(out).turn == 2  # no second switch: the agent runs on m2 now
    assert result(h.run(2), W1).status == "ok"


# Regression: a refused model (the CLI answers set_model with an error) restarted the agent
# with --model set to it, so the refused model stuck, across broker restarts too.
@pytest.mark.parametrize("op", ["prompt", "set_model"])
def test_refused_model_fails_the_request_and_the_session_keeps_its_model(op: str) -> None:
    h = H()
    h.submit(W1, "w1", op=op, model="bad")
    h.submit(W2, "w2")
    out = h.answer(f"ts-{INC}-1", ok=False, error="Model 'bad' not found")
    r = result(out, W1)
    assert (r.status, r.error_code, r.model) == ("error", "model_refused", "m1")
    assert not any(isinstance(d, s.RestartAgent) for d in out)
    assert h.sched.model == "m1"
    assert user(out).turn == 2  # the next request runs at once, on the old model
    assert sent(out, W2, frames.Started)[0].model == "m1"


def test_set_model_op() -> None:
    h = H()
    out = h.submit(K, "sm", op="set_model", model="m2")
    assert writes(out) == [s.WriteSetModel(ctrl_id=f"ts-{INC}-1", model="m2")]
    r = result(h.answer(f"ts-{INC}-1", model="m2"), K)
    assert (r.status, r.model) == ("ok", "m2")
    assert [type(d) for d in writes(h.submit(K, "k1", model="m2"))] == [s.WriteUser]
    h.submit(W1, "same", op="set_model", model="m2")  # queued while k1 (turn 2: the switch had turn 1) runs
    out = h.ok(2)
    assert writes(out) == []  # already on m2: nothing to write
    assert result(out, W1).status == "ok"


# Regression: a system/init naming the id of a turn still waiting for its model
# switch was taken as that turn's init, and wrote an interrupt for a turn whose
# user message was never written.
def test_init_for_a_turn_still_switching_is_ignored() -> None:
    h = H()
    h.submit(K, "k1", model="m2")
    h.submit(W1, "w1")  # asks for a preempt, which waits for the switch to end
    assert h.init(1) == []
    out = h.answer(f"ts-{INC}-1", model="m2")
    assert users(out) and started_req(out) == (W1, "w1")  # k1 steps back, unwritten


# ---------------------------------------------------------------- drain and agent death


def test_drain_timeout_restarts_and_requeues_the_worker() -> None:
    h = H(drain_timeout_s=5.0)
    h.submit(K, "k1")
    h.init(1)
    h.submit(W1, "w1")
    assert h.sched.next_deadline() == 5.0
    assert writes(h.tick(4.9)) == []
    out = h.tick(0.1)
    assert writes(out) == [s.RestartAgent(reason="drain_timeout", model="m1")]
    assert sent(out, K, frames.PreemptedNotice)[0].requeued
    assert h.sched.counters.values["drain_timeouts"] == 1
    assert started_req(h.started()) == (W1, "w1")
    assert started_req(h.run(2)) == (K, "k1")
    assert h.init(1) == [] and h.ok(1) == []  # the killed agent's late lines are ignored


def test_drain_timeout_of_a_cancelled_webhook_turn() -> None:
    h = H(drain_timeout_s=5.0)
    h.submit(W1, "w1")
    h.init(1)
    h.cancel(W1, target="w1")
    out = h.tick(5.0)
    assert s.RestartAgent(reason="drain_timeout", model="m1") in out
    assert result(out, W1).status == "cancelled"


def test_agent_exit_mid_turn_requeues_a_worker_up_to_max_attempts() -> None:
    h = H()
    h.submit(K, "k1")
    turn = 1
    for _ in range(s.MAX_ATTEMPTS - 1):
        h.init(turn)
        out = h.exited()
        assert writes(out) == [s.RestartAgent(reason="exited", model="m1")]
        assert sent(out, K, frames.PreemptedNotice)[0].requeued
        assert user(h.started()).turn == turn + 1
        turn += 1
    out = h.exited()
    r = result(out, K)
    assert (r.status, r.error_code) == ("error", "agent_restarted")


# Regression: preempted runs counted towards MAX_ATTEMPTS, so a worker that
# webhooks had preempted twice was failed on the agent's first death.
def test_preemptions_do_not_count_as_agent_deaths() -> None:
    h = H()
    h.submit(K, "k1")
    for turn, hook in ((1, "a"), (3, "b")):
        h.init(turn)
        h.submit(W1, hook)
        h.interrupted(turn)
        h.run(turn + 1)
    h.init(5)
    out = h.exited()
    assert sent(out, K, frames.PreemptedNotice), "one agent death must not fail a twice-preempted worker"


def test_agent_exit_mid_turn_fails_a_webhook_with_agent_restarted() -> None:
    h = H()
    h.submit(W1, "w1")
    h.init(1)
    r = result(h.exited(), W1)
    assert (r.status, r.error_code) == ("error", "agent_restarted")


def test_agent_that_refused_its_start_reruns_the_turn_it_never_began() -> None:
    # The CLI refused --session-id of an existing conversation before reading the turn:
    # nothing reached the model, so the webhook runs on the resumed agent instead of failing.
    h = H()
    out = h.submit(W1, "w1")
    first = user(out)
    out = h.ev(s.AgentExited(h.now, "exited rc=1", refused_start=True))
    assert sent(out, W1, frames.Result) == []
    again = user(h.started())
    assert again.content == first.content
    assert result(h.run(again.turn), W1).status == "ok"


# Regression (found by tests/test_scheduler_props.py): a start the agent refused counted as
# one of the worker's MAX_ATTEMPTS, so crash, refused start, crash failed it with
# agent_restarted where two deaths must still requeue it.
def test_a_refused_start_is_not_one_of_the_workers_attempts() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    assert sent(h.exited(), K, frames.PreemptedNotice)[0].requeued  # death 1
    user(h.started())
    h.ev(s.AgentExited(h.now, "exited rc=1", refused_start=True))  # never began turn 2
    turn = user(h.started()).turn
    h.init(turn)
    out = h.exited()  # death 2 of 3
    assert sent(out, K, frames.Result) == [], "a worker that died with the agent twice was failed"
    assert sent(out, K, frames.PreemptedNotice)[0].requeued


def test_a_refused_start_after_the_turn_began_still_fails_it() -> None:
    h = H()
    h.submit(W1, "w1")
    h.init(1)
    r = result(h.ev(s.AgentExited(h.now, "exited rc=1", refused_start=True)), W1)
    assert (r.status, r.error_code) == ("error", "agent_restarted")


def test_agent_exit_while_restarting_is_ignored_and_nothing_runs_until_started() -> None:
    h = H()
    h.exited()
    assert h.exited() == []
    assert users(h.submit(W1, "w1")) == []
    assert users(h.started())


# Regression: a cancel accepted while the request waited for its model switch
# was forgotten when the agent died then: the request was requeued and ran.
def test_cancel_during_a_model_switch_survives_an_agent_death() -> None:
    h = H()
    h.submit(K, "k1", model="m2")
    h.cancel(K, target="k1")
    out = h.exited()
    assert result(out, K).status == "cancelled"
    assert users(h.started()) == []


# ---------------------------------------------------------------- client death


def test_client_gone_while_queued_is_dropped_without_reply() -> None:
    h = H()
    h.submit(W1, "w1")
    h.submit(K, "k1")
    out = h.gone(K)
    assert out == [s.DropClient(K)]
    assert h.sched.line() == []
    assert sent(h.run(1), K) == []


def test_client_gone_while_running_interrupts_and_discards_the_result() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    h.submit(K2, "x")
    out = h.gone(K)
    assert interrupts(out) == [s.WriteInterrupt(turn=1, reason="client_gone", asked_at=h.now)]
    assert s.DropClient(K) in out
    out = h.interrupted(1)
    assert sent(out, K) == []
    assert started_req(out) == (K2, "x")
    assert h.sched.requests.keys() == {(K2, "x")}


def test_client_gone_while_switching() -> None:
    h = H()
    h.submit(K, "k1", model="m2")
    h.submit(K2, "x")
    assert h.gone(K) == [s.DropClient(K)]
    out = h.answer(f"ts-{INC}-1", model="m2")
    assert sent(out, K) == []
    assert started_req(out) == (K2, "x")


# ---------------------------------------------------------------- duplicates


def test_duplicate_submission_is_not_run_twice() -> None:
    h = H()
    h.submit(W1, "w1")
    h.submit(K, "k1")
    for req in ("w1", "k1"):  # running, queued
        out = h.submit(W1 if req == "w1" else K, req)
        assert [type(f) for f in sent(out)] == [frames.Accepted] and writes(out) == []
    h.run(1)
    h.run(2)
    assert h.sched.counters.values["turns"] == 2


def test_duplicate_after_completion_resends_the_stored_result() -> None:
    h = H()
    h.submit(W1, "w1")
    first = result(h.run(1), W1)
    out = h.submit(W1, "w1")
    assert out == [s.Deliver(W1, first)]


# ---------------------------------------------------------------- the scheduler's own guard


def test_user_message_while_busy_is_a_scheduler_bug() -> None:
    h = H()
    h.submit(K, "k1")
    with pytest.raises(s.SchedulerBug):
        h.sched._emit(s.WriteUser(turn=9, uuid="u", content="x", submitted_at=0.0))


def test_check_catches_a_corrupted_state() -> None:
    h = H(start=False)
    h.submit(W1, "w1")
    h.submit(W2, "w2")
    h.sched.webhooks.queues[W1].append(h.sched.webhooks.queues[W2][0])  # w2 queued twice
    with pytest.raises(s.SchedulerBug):
        h.sched.check()


# ---------------------------------------------------------------- regressions of the threaded design


def test_regression_a_cancel_for_an_ended_turn_never_touches_the_next_one() -> None:
    h = H()
    h.submit(W1, "first")
    h.submit(W1, "second")  # the same client holds the next turn
    h.run(1)
    assert h.cancel(W1, incarnation=INC, turn=1) == []
    assert interrupts(h.init(2)) == []
    assert result(h.ok(2), W1).status == "ok"
    # The preempter's own first turn is not aborted by the preempt it caused.
    h.submit(K, "k1")
    h.init(3)
    h.submit(W2, "w2")
    out = h.interrupted(3)
    assert started_req(out) == (W2, "w2")
    assert interrupts(h.init(4)) == []
    assert result(h.ok(4), W2).status == "ok"


def test_regression_b_worker_never_jumps_queued_webhooks_at_handoff() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    h.submit(W1, "w1")
    h.submit(W2, "w2")
    order = [started_req(h.interrupted(1))]
    order.append(started_req(h.run(2)))
    order.append(started_req(h.run(3)))
    assert order == [(W1, "w1"), (W2, "w2"), (K, "k1")]


def test_regression_c_kind_comes_from_each_submission() -> None:
    h = H()
    h.submit(K, "k1")
    h.init(1)
    assert interrupts(h.submit(K2, "k2")) == []  # a worker does not preempt
    assert interrupts(h.submit(W1, "w1")) != []  # a webhook does
    h.submit(K, "k3")
    h.submit(W2, "w2")
    assert [(r.req, r.kind) for r in h.sched.line()] == [
        ("w1", "webhook"), ("w2", "webhook"), ("k2", "worker"), ("k3", "worker")
    ]
    out = h.interrupted(1)
    assert started_req(out) == (W1, "w1")
    assert h.sched.holder() == (W1, "webhook", "w1")


def test_regression_d_model_answer_matched_by_ctrl_id_and_the_deadline_restarts() -> None:
    h = H(model_timeout_s=7.0)
    (switch,) = writes(h.submit(W1, "w1", model="m2"))
    assert isinstance(switch, s.WriteSetModel)
    # Answers whose id is not the nested request id of our set_model: never a match.
    for wrong in ("", "ts-00000000000000aa-2", "w1", "1"):
        assert h.answer(wrong, model="m2") == []
    assert h.sched.next_deadline() == 7.0  # it cannot hang: a deadline is armed
    out = h.tick(7.0)
    assert writes(out) == [s.RestartAgent(reason="model switch failed: no answer in time", model="m2")]
    assert h.answer(switch.ctrl_id) == []  # the late real answer changes nothing
    assert users(h.started())


def test_regression_e_stdin_writes_never_interleave() -> None:
    h = H()
    in_flight: int | None = None
    # Submissions land between the agent's lines; the agent works through everything.
    script = [(K, "k1", None), (W1, "a", None), (K2, "k2", None), (W2, "b", None), (W3, "c", "m2"),
              (K, "k3", None), (W1, "d", None)]
    for i in range(60):
        if i % 2 == 0 and script:
            client, req, model = script.pop(0)
            h.submit(client, req, model=model)
            continue
        evs = h.w.agent_events()
        if not evs:
            break
        h.ev(next((e for lb, e in evs if "interrupted" in lb), evs[0][1]))
    writes_seen = 0
    for d in h.log:
        if isinstance(d, s.WriteUser):
            assert in_flight is None, f"user message for turn {d.turn} while turn {in_flight} runs"
            in_flight = d.turn
            writes_seen += 1
        elif isinstance(d, s.RestartAgent):
            in_flight = None
        elif isinstance(d, s.Deliver) and isinstance(d.frame, frames.Result | frames.PreemptedNotice):
            if d.frame.turn == in_flight:
                in_flight = None
        elif isinstance(d, s.WriteSetModel):
            assert in_flight is None
    assert writes_seen >= 7
    assert h.sched.line() == [] and h.sched.turn is None


@pytest.mark.parametrize("why", ["preempt", "cancel", "client_gone"])
def test_regression_f_every_interrupt_has_a_bounded_drain(why: str) -> None:
    h = H(drain_timeout_s=5.0)
    h.submit(K, "k1")
    h.init(1)
    if why == "preempt":
        h.submit(W1, "w1")
    elif why == "cancel":
        h.cancel(K, incarnation=INC, turn=1)
    else:
        h.gone(K)
    assert interrupts(h.log)[-1].reason == why
    assert h.sched.next_deadline() == 5.0
    out = h.tick(5.0)
    assert [d for d in out if isinstance(d, s.RestartAgent)] == [s.RestartAgent(reason="drain_timeout", model="m1")]


# ---------------------------------------------------------------- an agent that cannot start


def restarts(out: list[s.Decision]) -> list[s.RestartAgent]:
    return [d for d in out if isinstance(d, s.RestartAgent)]


def test_failed_starts_are_retried_with_bounded_back_off_then_requests_end_agent_unavailable() -> None:
    h = H(unavailable_timeout_s=6.0, spawn_backoff_s=0.5, spawn_backoff_max_s=1.0)
    assert restarts(h.exited()) == [s.RestartAgent(reason="exited", model="m1", delay_s=0.0)]
    h.submit(W1, "w1")
    delays = [d.delay_s for _ in range(3) for d in restarts(h.ev(s.SpawnFailed(h.now, "[Errno 2] gone")))]
    assert delays == [0.5, 1.0, 1.0]
    assert h.sched.agent_state() == "unavailable" and h.sched.agent_error == "[Errno 2] gone"
    assert h.sched.next_deadline() == 6.0  # the bound counts from the first failed start
    assert h.tick(5.9) == []
    r = result(h.tick(0.1), W1)
    assert (r.status, r.error_code) == ("error", "agent_unavailable") and "[Errno 2] gone" in (r.error or "")
    # While no agent runs, a new request does not wait at all.
    r = result(h.submit(W2, "w2"), W2)
    assert r.error_code == "agent_unavailable"
    # The first start that succeeds resumes service.
    h.started()
    assert h.sched.agent_state() == "up"
    assert user(h.submit(W1, "w3")).turn == 1
    h.init(1)
    assert h.sched.failures == 0 and not h.sched.gave_up


def test_an_agent_that_starts_and_never_answers_is_a_failed_start() -> None:
    h = H(start_timeout_s=4.0, spawn_backoff_s=0.5)
    assert user(h.submit(W1, "w1")).turn == 1  # the agent was never heard from: a start deadline runs
    assert h.sched.next_deadline() == 4.0
    out = h.tick(4.0)
    assert restarts(out) == [s.RestartAgent(reason="start failed: no output within 4 s of its first turn",
                                            model="m1", delay_s=0.5)]
    assert sent(out, W1) == []  # never begun: back at the head of the line, unannounced
    assert [r.key for r in h.sched.line()] == [(W1, "w1")]
    out = h.started()
    assert user(out).turn == 2 and started_req(out) == (W1, "w1")
    assert result(h.run(2), W1).status == "ok"
    assert user(h.submit(W1, "w2")).turn == 3
    assert h.sched.next_deadline() is None  # heard from: no start deadline any more
