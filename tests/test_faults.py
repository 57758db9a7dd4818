"""Faults, injected into a real broker, the simulated agent and real client processes.

What `test_broker_integration.py` already covers is not repeated here (it is
referenced in ``docs/guarantees.md``): a client SIGKILLed mid-turn, while
queued, or holding a lease it never used; a broker SIGKILLed or SIGTERMed
under one running turn; the drain timeout of a preempted turn; an agent crash
under a webhook or a worker turn; a garbage line. This file adds the
combinations and the faults it leaves out: requests sitting in the request
queue when the broker dies, a broker killed while it restarts its agent or
stopped while it drains, a tool child holding the agent's stdout, an
over-long agent line, a full request queue, a client that stops reading, and
forged client identities.

Every client here is a separate process (the ``client`` fixture) running
``tests/client_proc.py``, which prints one JSON line per thing it saw,
stamped with ``time.monotonic()``.
Waits are on conditions with deadlines, never on fixed times.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time

import pytest

from clients import Client
from ipc import defaults, frames, mailbox, names, rqueue
from tests.support import (
    began,
    broker_log,
    group_members,
    home_of,
    rec,
    running,
    session_objects,
    sim_agents,
    sim_stats,
    vm_rss_kib,
    wait_completed_once,
    wait_until,
)

# ---------------------------------------------------------------- client death


def test_client_sigkill_while_queued_and_while_leasing_between_turns(broker_factory, client, tmp_path):
    """A queued client and a lease holder idle between its turns both die: neither blocks the next client."""
    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",))
    holder = client("worker", "LEASE-TURN-one", lease=True, lease_idle_s=600, hold_lease=True)
    assert holder.ev("result")["status"] == "ok"
    holder.ev("lease_idle")
    wait_until(lambda: rec(b).lease_client != "" and rec(b).turn == 0, what="lease held, idle between turns")
    queued = client("worker", "QUEUED-DOOMED-two")
    queued.ev("submitted")
    nxt = client("worker", "NEXT-IN-LINE-three")
    nxt.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 2, what="two workers queued behind the lease")
    queued.kill()
    wait_until(lambda: rec(b).workers_queued == 1, what="the dead client's request dropped")
    assert rec(b).lease_client != "", "a queued client's death ended someone else's lease"
    t_kill = time.monotonic()
    holder.kill()
    res = nxt.ev("result")
    assert res["status"] == "ok" and res["text"] == "sim: NEXT-IN-LINE-three"
    took_s = res["t"] - t_kill
    print(f"lease holder SIGKILL between turns -> next worker's result: {took_s * 1000:.1f} ms")
    assert took_s < 3.0, "the lease of a dead holder was not released promptly"
    assert nxt.finish() == 0
    r = rec(b)
    assert r.lease_client == "" and r.workers_queued == 0
    home = home_of(b)
    assert began(home, "QUEUED-DOOMED-two") == 0, "a dead client's queued request reached the agent"
    assert sim_stats(st)["user_messages"] == 2
    wait_until(lambda: rec(b).clients == 0, what="dead clients forgotten")
    wait_until(lambda: not [n for n in session_objects(b.session) if ".mb." in n or ".db." in n],
               what="no mailbox of the dead clients left")


# ---------------------------------------------------------------- broker death


def test_broker_sigkill_with_frames_in_the_queue_and_a_turn_in_flight(broker_factory, client, session_name):
    """Accepted, queued-in-the-mq and in-flight requests all survive a broker SIGKILL, each run once."""
    # Every turn of this first broker's agent lasts 60 s (a flag, not a directive: the next
    # broker's agent runs the same prompts at normal speed), so the in-flight turn is still
    # in flight however slow the machine.
    b = broker_factory(agent_args=("--turn-ms=60000",))
    inflight = client("worker", "INFLIGHT-a")
    in_mq = [client("worker", "IN-MQ-worker-c", go=True), client("webhook", "IN-MQ-webhook-d", go=True)]
    inflight.ev("event")
    wait_until(running(b, "worker"), what="the in-flight turn running")
    accepted = client("worker", "ACCEPTED-b")
    for c in in_mq:
        c.ev("connected")
    accepted.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="the second worker accepted and queued")
    # Freeze the broker: what the clients send now stays in the request queue.
    os.kill(b.pid, signal.SIGSTOP)
    try:
        rq = rqueue.RequestQueue.open(session_name)
        try:
            for c in in_mq:
                c.send()
                c.ev("submitted")
            assert rq.current_messages == 2, "the frozen broker read the queue"
        finally:
            rq.close()
        agent = rec(b).agent_pid
        b.kill()  # SIGKILL reaches a stopped process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(b.pid, signal.SIGCONT)
    wait_until(lambda: not group_members(agent), timeout_s=5, what="the old agent group gone")
    b2 = broker_factory()
    everyone = [inflight, accepted, *in_mq]
    for c in everyone:
        res = c.ev("result")
        token = c.lines[[o.get("ev") for o in c.lines].index("submitted")]["text"].split()[-1]
        assert res["status"] == "ok" and token in res["text"], res
    for c in everyone:
        assert c.finish() == 0
        assert len(c.results()) == 1, c.results()
    home = home_of(b2)
    for token in ("INFLIGHT-a", "ACCEPTED-b", "IN-MQ-worker-c", "IN-MQ-webhook-d"):
        wait_completed_once(home, token)
    # Four distinct requests reached the new broker; resubmissions were recognised, not rerun.
    r = rec(b2)
    assert r.counters["requests"] == 4, r.counters
    assert r.counters["results_ok"] == 4


def test_broker_sigkill_while_it_restarts_its_agent(broker_factory, client):
    """A broker killed in the middle of agent restarts leaves no agent behind; the next broker serves."""
    b = broker_factory()
    home = home_of(b)
    # A worker whose turn kills the agent is rerun (twice) after each restart: the broker
    # spends the next moments restarting its agent. Kill it right after the first crash.
    crasher = client("worker", "[sim:die] CRASHER", reconnect_timeout_s=30)
    wait_until(lambda: rec(b).counters["agent_restarts"] >= 1, what="the first agent restart", poll_s=0.001)
    agents_before = set(sim_agents(home))
    b.kill()
    phase = [e["event"] for e in broker_log(b) if e.get("event", "").startswith("agent.")][-1]
    print(f"broker SIGKILLed after {phase!r}; agent processes then: {sorted(agents_before)}")
    wait_until(lambda: not sim_agents(home), timeout_s=5, what="every agent of the dead broker gone")
    b2 = broker_factory()
    agent2 = rec(b2).agent_pid
    # The crasher is resubmitted to the new broker: it dies there too, and ends in a typed error.
    res = crasher.ev("result", timeout_s=30)
    assert res["status"] == "error" and res["error_code"] == "agent_restarted", res
    after = client("webhook", "AFTER-the-restarts")
    assert after.ev("result")["status"] == "ok"
    assert crasher.finish() == 0 and after.finish() == 0
    assert len(crasher.results()) == 1
    # Only the new broker's current agent runs.
    wait_until(lambda: set(sim_agents(home)) == {rec(b2).agent_pid}, timeout_s=5,
               what=f"only the new broker's agent (first {agent2}) left")


def test_broker_sigterm_during_a_drain_exits_in_bounded_time(broker_factory, client, session_name):
    """SIGTERM while a preempted turn that ignores interrupts drains: bounded exit, no orphan, nothing lost."""
    drain_s, step_s = 2.0, 2.0  # --drain-timeout-s; BrokerConfig.stop_step_s (not a serve option)
    b = broker_factory(extra_args=(f"--drain-timeout-s={drain_s}",))
    home = home_of(b)
    w = client("worker", prompts=[{"text": "[sim:ignore_interrupt] STUBBORN-worker", "resume_prompt": "RESUMED"}],
               reconnect_timeout_s=60)
    w.ev("event")
    wait_until(running(b, "worker"), what="the worker turn running")
    h = client("webhook", "URGENT-hook", reconnect_timeout_s=60)
    wait_until(running(b, "worker", phase="interrupting"), what="the worker turn draining")
    agent = rec(b).agent_pid
    t0 = time.monotonic()
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    rc = b.proc.wait(drain_s + 3 * step_s + 5)
    took_s = time.monotonic() - t0
    print(f"SIGTERM mid-drain -> exit {rc} in {took_s:.2f} s (drain {drain_s} s, stop step {step_s} s)")
    assert rc == 0
    assert took_s < drain_s + 2 * step_s + 2.0
    assert not group_members(agent), "the agent outlived its broker"
    assert not sim_agents(home), "an agent (or a restarted one) outlived the broker"
    log = [e.get("event") for e in broker_log(b)]
    after_signal = set(log[log.index("broker.signal") :])
    # A stopping broker decides nothing more: no restart, no requeue, no answer.
    assert not after_signal & {"agent.restart", "agent.started", "turn.preempted", "request.result"}, log
    left = session_objects(session_name)
    assert not [n for n in left if n.endswith((".rq", ".st"))], left
    # Neither request was answered by the stopped broker; both are served by the next one.
    assert w.results() == [] and h.results() == []
    b2 = broker_factory(extra_args=("--drain-timeout-s=0.5",))
    hres = h.ev("result")
    assert hres["status"] == "ok" and hres["text"] == "sim: URGENT-hook"
    # The worker's request reached the new broker too. If the webhook preempted it there, it
    # was rerun with its resume prompt and ended; otherwise it runs, ignoring interrupts
    # again: cancel it by turn (the short drain timeout ends it).
    wait_until(lambda: w.results() or running(b2, "worker")(), what="the worker's request on the new broker")
    r2 = rec(b2)
    # The rerun may be the short resume turn, which can end between the wait and this read
    # (turn 0 then): only a turn still running needs the cancel.
    if not w.results() and r2.turn:
        from clients import Client

        with Client(session_name, "webhook") as c:
            c.cancel_turn(r2.incarnation, r2.turn)
    wres = w.ev("result")
    assert wres["status"] == "cancelled" or (wres["status"] == "ok" and wres["text"] == "sim: RESUMED"), wres
    for c in (w, h):
        assert c.finish() == 0
        assert len(c.results()) == 1


def test_sighup_drains_like_sigterm(broker_factory, client, session_name):
    """SIGHUP (a foreground `serve` whose terminal closed) is a graceful stop: logged, drained, nothing left."""
    b = broker_factory()
    home = home_of(b)
    w = client("worker", prompts=[{"text": "[sim:turn_ms=8000] [sim:chunks=80] LONG-worker"}],
               reconnect_timeout_s=60)
    w.ev("event")
    wait_until(running(b, "worker"), what="the worker turn running")
    agent = rec(b).agent_pid
    assert b.proc is not None
    b.proc.send_signal(signal.SIGHUP)
    rc = b.proc.wait(15)
    assert rc == 0, f"SIGHUP ended the broker with {rc}, not a clean stop"
    log = broker_log(b)
    sig = [e for e in log if e.get("event") == "broker.signal"]
    assert sig and sig[0]["signal"] == "SIGHUP", log[-5:]
    events = [e.get("event") for e in log]
    assert "broker.drained" in events and "broker.stopped" in events, events[-10:]
    assert not group_members(agent), "the agent outlived its broker"
    assert not sim_agents(home)
    left = session_objects(session_name)
    assert not [n for n in left if n.endswith((".rq", ".st"))], left
    # The drained turn was not answered by the stopped broker: the next one serves it.
    assert w.results() == []
    broker_factory()
    assert w.ev("result", timeout_s=90)["status"] == "ok"
    assert w.finish() == 0 and len(w.results()) == 1


# ---------------------------------------------------------------- agent faults


def test_broker_killed_before_it_saved_resumable_next_broker_resumes(broker_factory, client):
    """Killed after the agent wrote its first turn, before session.json said ``resumable``: the
    next broker's ``--session-id`` start is refused ("already in use"), so it resumes instead."""
    b1 = broker_factory()
    first = client("webhook", "[sim:history] FIRST")
    r1 = first.ev("result")
    assert r1["status"] == "ok" and first.finish() == 0
    b1.kill()
    saved = b1.state_dir / b1.session / "session.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "resumable": False}))

    b2 = broker_factory()
    second = client("webhook", "[sim:history] SECOND")
    r2 = second.ev("result")
    assert r2["status"] == "ok", (r2, b2.log_text()[-2000:])
    assert r2["session_id"] == r1["session_id"] and "[history=1]" in r2["text"]
    assert second.finish() == 0
    assert rec(b2).counters["agent_restarts"] <= 1
    assert json.loads(saved.read_text())["resumable"] is True
    assert any(e.get("event") == "agent.session_id_in_use" for e in broker_log(b2))


def test_agent_sigkill_mid_webhook_turn_fails_it_and_the_next_runs_resumed(broker_factory, client):
    """The agent killed from outside under a webhook turn: a typed error for it, the queued worker runs next."""
    b = broker_factory()
    first = client("webhook", "[sim:history] FIRST")
    r1 = first.ev("result")
    assert r1["status"] == "ok" and "[history=0]" in r1["text"]
    h = client("webhook", "[sim:turn_ms=5000] DOOMED-hook")
    h.wait_for(lambda o: o.get("ev") == "event" and o["data"].get("type") == "assistant")
    w = client("worker", "[sim:history] QUEUED-worker")
    w.ev("submitted")
    wait_until(lambda: rec(b).workers_queued == 1, what="worker queued behind the webhook")
    agent = rec(b).agent_pid
    os.killpg(agent, signal.SIGKILL)
    hres = h.ev("result")
    assert hres["status"] == "error" and hres["error_code"] == "agent_restarted", hres
    wres = w.ev("result")
    assert wres["status"] == "ok" and wres["session_id"] == r1["session_id"]
    assert "[history=2]" in wres["text"], "the restarted agent did not resume the conversation"
    r = rec(b)
    assert r.agent_pid != agent and r.counters["agent_restarts"] == 1
    for c in (first, h, w):
        assert c.finish() == 0
        assert len(c.results()) == 1


def test_cancel_of_a_turn_that_ignores_interrupts_restarts_the_agent(broker_factory, client, session_name):
    """A cancel the agent never answers: drain timeout, restart, ``cancelled``; the next turn runs."""
    from clients import Client

    b = broker_factory(extra_args=("--drain-timeout-s=0.5",))
    pid0 = rec(b).agent_pid
    w = client("worker", "[sim:ignore_interrupt] DEAF-worker")
    w.ev("event")
    wait_until(running(b, "worker"), what="the deaf turn running")
    r = rec(b)
    t0 = time.monotonic()
    with Client(session_name, "webhook") as c:
        c.cancel_turn(r.incarnation, r.turn)
    res = w.ev("result")
    assert res["status"] == "cancelled" and res["turn"] == r.turn, res
    assert res["t"] - t0 < 0.5 + 4.5, "the drain timeout did not bound the cancel"
    nxt = client("worker", "NEXT-after-deaf")
    assert nxt.ev("result")["status"] == "ok"
    r2 = rec(b)
    assert r2.counters["drain_timeouts"] == 1 and r2.counters["agent_restarts"] == 1 and r2.agent_pid != pid0
    assert r2.counters["results_cancelled"] == 1
    assert w.finish() == 0 and nxt.finish() == 0


def test_tool_children_of_every_rerun_are_killed_with_their_groups(broker_factory, client):
    """A worker turn whose agent dies leaving a tool child on its stdout, three times: no child survives.

    (test_broker_integration.py::test_tool_child_holding_stdout_does_not_wedge_session covers one
    webhook turn; here the worker's request is rerun after each death, each rerun leaving a child,
    and every generation's group must go, not just the first.)
    """
    b = broker_factory()
    home = home_of(b)
    w = client("worker", "[sim:tool_child=60] TOOL-CHILD-worker")
    res = w.ev("result", timeout_s=30)
    assert res["status"] == "error" and res["error_code"] == "agent_restarted", res
    notices = [o for o in w.lines if o.get("ev") == "event" and o["data"].get("subtype") == "preempted"]
    assert len(notices) == 2, "the worker's request was not rerun after each agent death"
    # (The new agent shows its argv once it has exec'd: wait for that, not for a fixed time.)
    wait_until(lambda: set(sim_agents(home)) == {rec(b).agent_pid}, timeout_s=5,
               what="only the current agent left (no tool child of any dead one)")
    after = client("webhook", "AFTER-tool-children")
    assert after.ev("result")["status"] == "ok"
    assert w.finish() == 0 and after.finish() == 0
    assert rec(b).counters["agent_restarts"] == 3


def test_non_json_and_over_long_agent_lines_are_logged_and_the_broker_stays_up(broker_factory, client, tmp_path):
    """A garbage line is skipped; a line over --max-line-bytes is dropped, and the turn it broke is restarted."""
    bound = 64 * 1024
    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",), extra_args=(f"--max-line-bytes={bound}",))
    pid0 = rec(b).agent_pid
    # Under the bound: garbage is logged, the turn completes.
    g = client("webhook", "[sim:garbage] [sim:huge=50000] GARBAGE-then-big")
    gres = g.ev("result")
    assert gres["status"] == "ok" and len(gres["text"]) > 40_000
    # Over the bound: the assistant line and the result line (which repeats its text) are
    # both dropped. The turn's end can no longer be seen, so the broker must not wait for it.
    t0 = time.monotonic()
    o = client("webhook", f"[sim:huge={bound * 2}] OVERLONG")
    ores = o.ev("result", timeout_s=20)
    print(f"over-long line -> result {ores['status']}/{ores['error_code']} in {ores['t'] - t0:.2f} s")
    assert ores["status"] == "error" and ores["error_code"] == "agent_restarted", ores
    after = client("webhook", "AFTER-overlong")
    assert after.ev("result")["status"] == "ok"
    for c in (g, o, after):
        assert c.finish() == 0
        assert len(c.results()) == 1
    # Nothing over the bound reached a client.
    assert all(len(json.dumps(o["data"])) <= bound for c in (g, o) for o in c.lines if o.get("ev") == "event")
    events = [e.get("event") for e in broker_log(b)]
    assert "agent.bad_line" in events and "agent.line_dropped" in events
    r = rec(b)
    assert b.proc is not None and b.proc.poll() is None
    assert r.counters["agent_restarts"] == 1 and r.agent_pid != pid0
    assert sim_stats(st).get("malformed_lines", 0) == 0


def test_line_splitter_bounds_a_whole_line_that_arrives_in_one_read():
    """The bound holds for a complete line in one piece, and for one spread over many."""
    from broker.agentproc import LineSplitter

    lines: list[bytes] = []
    dropped: list[int] = []
    sp = LineSplitter(lines.append, dropped.append, max_line_bytes=10)
    sp.feed(b"short\n" + b"x" * 11 + b"\nok\n")
    assert lines == [b"short", b"ok"] and dropped == [11]
    for _ in range(5):
        sp.feed(b"y" * 4)
    sp.feed(b"\nafter\n")
    assert lines == [b"short", b"ok", b"after"] and dropped == [11, 20]


# ---------------------------------------------------------------- request queue full


def test_full_request_queue_gives_queue_full_and_loses_nothing_sent_before(broker_factory, client, session_name):
    """Broker frozen: sends fill the queue, the next one fails typed and bounded; nothing before it is lost."""
    b = broker_factory()
    home = home_of(b)
    f = client("worker", go=True, fill=40, fill_text="FILL", send_timeout_s=1.0, then=[{"text": "TAIL"}])
    f.ev("connected")
    wait_until(lambda: rec(b).clients == 1, what="the filler's hello read")
    rq = rqueue.RequestQueue.open(session_name)
    try:
        capacity = rq.max_messages
        os.kill(b.pid, signal.SIGSTOP)
        try:
            f.send()
            full = f.ev("queue_full", timeout_s=20)
            assert rq.current_messages == capacity
        finally:
            os.kill(b.pid, signal.SIGCONT)
    finally:
        rq.close()
    sent = [o for o in f.lines if o.get("ev") == "submitted"]
    print(f"queue of {capacity}: {len(sent)} sends went in, the next waited {full['waited_s']:.2f} s: "
          f"{full['message']}")
    assert len(sent) == capacity
    assert full["error"] == "QueueFull" and full["code"] == "queue_full"
    assert 0.9 <= full["waited_s"] < 3.0, "the send to a full queue did not wait its bounded time"
    # The broker catches up: every request sent before the overflow gets its one result.
    for i in range(capacity):
        res = f.wait_for(lambda o, i=i: o.get("ev") == "result" and o["text"] == f"sim: FILL fill-{i}")
        assert res["status"] == "ok"
    assert len(f.results()) == capacity
    for i in range(capacity):
        wait_completed_once(home, f"fill-{i}")
    # The refused request was never sent, and must never be: not even when the client
    # resubmits what it has in flight to a new broker.
    assert b.stop() == 0
    b2 = broker_factory()
    f.send()  # one more prompt: the client finds the new broker and resubmits what it thinks is in flight
    tail = f.wait_for(lambda o: o.get("ev") == "result" and o["text"] == "sim: TAIL")
    assert tail["status"] == "ok"
    assert began(home, f"fill-{capacity}") == 0, "a request refused with QueueFull ran later"
    assert rec(b2).counters["requests"] == 1
    assert f.finish() == 0


@pytest.mark.timeout(120)
def test_connect_outlasts_a_full_request_queue_up_to_its_own_timeout(broker_factory, session_name):
    """A live broker that has not drained its queue yet (a burst of hellos on a loaded box, as in
    the soak's start) delays a client's connect; it does not fail it with QueueFull after the 5 s
    send wait while ``connect_timeout_s`` has not passed."""
    b = broker_factory()
    rq = rqueue.RequestQueue.open(session_name)
    outcome: dict[str, object] = {}

    def connect() -> None:
        try:
            c = Client(session_name, "worker", connect_timeout_s=60)
        except Exception as exc:  # reported to the test thread
            outcome["error"] = exc
        else:
            outcome["client"] = c

    t = threading.Thread(target=connect, daemon=True)
    try:
        os.kill(b.pid, signal.SIGSTOP)
        try:
            while rq.current_messages < rq.max_messages:
                rq.send_bytes(b"not a frame", frames.PRIORITY["worker"], timeout_s=1.0)
            t.start()
            # The queue stays full past the hello's own send wait (the fault's duration, not a
            # synchronisation); a client that gives up early is seen at once.
            until = time.monotonic() + defaults.SEND_TIMEOUT_S + 1.0
            wait_until(lambda: "error" in outcome or time.monotonic() > until, timeout_s=30,
                       what="the queue to stay full past one send wait")
        finally:
            os.kill(b.pid, signal.SIGCONT)
        t.join(30)
        assert not t.is_alive(), "the client did not connect once the broker drained its queue"
        assert "error" not in outcome, f"connect failed before connect_timeout_s: {outcome['error']!r}"
        c = outcome["client"]
        assert isinstance(c, Client)
        with c:
            wait_until(lambda: rec(b).clients == 1, what="the client's hello read")
    finally:
        rq.close()
    assert b.stop() == 0


# ---------------------------------------------------------------- a client that stops reading

def test_client_that_stops_reading_is_failed_and_others_are_served(broker_factory, client):
    """A client whose mailbox stays full is failed with client_too_slow; another client is served meanwhile."""
    bound = 256 * 1024
    b = broker_factory(extra_args=(f"--client-buffer-bytes={bound}",))
    home = home_of(b)
    # A bare connection with a small mailbox, reading nothing until told (the client fixture reaps it).
    slow = client("webhook", role="slow_reader", capacity=64 * 1024,
                  text="[sim:turn_ms=10000] [sim:chunks=200] [sim:bytes=2000000] SLOW-reader",
                  late_text="LATE-after-failure")
    slow.ev("submitted")
    wait_until(running(b, "webhook"), what="the slow reader's turn streaming")
    t0 = time.monotonic()
    fast = client("webhook", "FAST-hook")
    res = fast.ev("result")
    took_s = res["t"] - t0
    print(f"client_too_slow -> another webhook's result {took_s * 1000:.0f} ms after it was started")
    assert res["status"] == "ok" and res["text"] == "sim: FAST-hook"
    # The slow reader's turn would stream for 10 s; failing it frees the session long before.
    assert took_s < 7.0
    r = rec(b)
    assert r.counters["clients_failed_slow"] == 1
    assert any(e.get("event") == "client.too_slow" for e in broker_log(b))
    slow.send()
    failed = slow.ev("too_slow")
    assert failed["error"] == "ClientTooSlow" and failed["code"] == "client_too_slow"
    slow.ev("late_sent")
    barrier = client("webhook", "BARRIER")
    assert barrier.ev("result")["status"] == "ok"
    assert began(home, "LATE-after-failure") == 0, "a failed client's later frame was served"
    assert rec(b).counters["rejected_frames"] >= 1
    assert fast.finish() == 0 and barrier.finish() == 0


# ---------------------------------------------------------------- forged identities


def _send_raw(session: str, *fs: frames.RequestFrame) -> None:
    rq = rqueue.RequestQueue.open(session)
    try:
        for f in fs:
            rq.send_frame(f)
    finally:
        rq.close()


def _ring_start_time(box: mailbox.MailboxReader, start: int) -> None:
    """Overwrite the owner start time recorded in a mailbox header (offset: magic, layout, capacity, pid)."""
    box._mm[24:32] = start.to_bytes(8, "little")


def test_a_live_pid_with_the_wrong_start_time_is_not_adopted(broker_factory, client, session_name, tmp_path):
    """A mailbox (or hello) naming a live pid whose start time does not match is refused: pid reuse."""
    st = tmp_path / "sim-stats.json"
    b = broker_factory(agent_args=(f"--stats-file={st}",))
    home = home_of(b)
    pid, start = names.self_identity()
    forged = names.new_client_id()
    box = mailbox.MailboxReader(session_name, forged)
    try:
        _ring_start_time(box, start + 4242)
        assert mailbox.read_owner(session_name, forged) == (pid, start + 4242)
        _send_raw(
            session_name,
            frames.Hello(client=forged, kind="worker", pid=pid, start_time=start + 4242),
            frames.Prompt(client=forged, req="forged-1", kind="worker", content="FORGED-start-time"),
        )
        barrier = client("worker", "BARRIER")
        assert barrier.ev("result")["status"] == "ok"
        assert box.read_frames() == [], "the broker answered a client it should not have adopted"
        log = broker_log(b)
        assert any(e.get("event") == "client.hello_refused" and e.get("client") == forged for e in log)
        assert any(e.get("event") == "frame.unknown_client" and e.get("client") == forged for e in log)
        assert began(home, "FORGED-start-time") == 0
        assert sim_stats(st)["user_messages"] == 1
        assert rec(b).counters["rejected_frames"] >= 1
        assert barrier.finish() == 0
    finally:
        box.close()


def test_frames_naming_a_dead_client_are_not_served(broker_factory, client, session_name):
    """After a client died, frames naming its id are refused, even with a mailbox recreated in its name."""
    b = broker_factory()
    home = home_of(b)
    dead = client("worker", "ALIVE-once", linger=True)
    assert dead.ev("result")["status"] == "ok"
    cid, pid = dead.ev("connected")["client"], dead.ev("connected")["pid"]
    start = names.proc_start_time(pid)
    assert start is not None
    dead.kill()
    wait_until(lambda: mailbox.read_owner(session_name, cid) is None, what="the dead client's mailbox removed")
    # 1. No mailbox at all: nowhere to answer, nobody to adopt.
    _send_raw(session_name, frames.Prompt(client=cid, req="ghost-1", kind="worker", content="GHOST-no-mailbox"))
    # 2. A mailbox recreated under its id, naming the dead process's identity.
    box = mailbox.MailboxReader(session_name, cid)
    try:
        box._mm[16:24] = pid.to_bytes(8, "little")
        _ring_start_time(box, start)
        assert mailbox.read_owner(session_name, cid) == (pid, start)
        _send_raw(
            session_name,
            frames.Hello(client=cid, kind="worker", pid=pid, start_time=start),
            frames.Prompt(client=cid, req="ghost-2", kind="worker", content="GHOST-recreated"),
        )
        barrier = client("worker", "BARRIER")
        assert barrier.ev("result")["status"] == "ok"
        assert box.read_frames() == []
        assert began(home, "GHOST-no-mailbox") == 0 and began(home, "GHOST-recreated") == 0
        unknown = [e for e in broker_log(b) if e.get("event") == "frame.unknown_client" and e.get("client") == cid]
        assert len(unknown) == 2
        assert barrier.finish() == 0
    finally:
        box.close()


def test_a_client_that_died_while_no_broker_ran_leaves_no_mailbox(broker_factory, client, session_name):
    """The next broker never hears of a client that died while no broker ran: it must still clean up."""
    b = broker_factory()
    c = client("worker", "ONCE", linger=True)
    assert c.ev("result")["status"] == "ok"
    cid = c.ev("connected")["client"]
    b.kill()
    c.kill()  # dies while no broker runs: nobody watches its pidfd
    assert mailbox.read_owner(session_name, cid) is not None
    b2 = broker_factory()
    wait_until(lambda: mailbox.read_owner(session_name, cid) is None, timeout_s=10,
               what="the dead client's mailbox removed by the next broker")
    assert [n for n in session_objects(session_name) if cid in n] == []
    assert b2.stop() == 0
    assert session_objects(session_name) == []


# ---------------------------------------------------------------- memory


def test_broker_memory_stays_bounded_over_many_large_replies(broker_factory, session_name):
    """The broker remembers finished results (to answer a duplicate again) within a byte bound, not only a count."""
    from clients import Client

    b = broker_factory()
    n, size = 100, 1_000_000
    with Client(session_name, "webhook") as c:
        assert c.prompt("warm-up").result(timeout_s=10).ok
        rss0 = vm_rss_kib(b.pid)
        for i in range(n):
            res = c.prompt(f"[sim:bytes={size}] big-{i}").result(timeout_s=30)
            assert res.ok and len(res.text) == size
        rss1 = vm_rss_kib(b.pid)
    grown_mib = (rss1 - rss0) / 1024
    print(f"{n} replies of {size} bytes: broker VmRSS {rss0} -> {rss1} KiB (+{grown_mib:.0f} MiB)")
    # Keeping every result's text and raw line would hold ~2 MB per reply (~190 MiB here).
    assert grown_mib < 100, f"the broker kept {grown_mib:.0f} MiB after {n} large replies"
